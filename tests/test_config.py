"""TrainConfig: validation messages, JSON round trip, migrations, presets, and the CLI derived from it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_trainer import cli, presets
from lora_trainer import config as c
from lora_trainer.errors import ConfigError, UserError


def test_defaults_are_valid_and_every_field_is_documented():
    c.validate(c.TrainConfig())
    for spec in c.fields():
        assert spec.help and spec.group, spec.name
        if spec.choices is not None:
            assert spec.default in spec.choices, spec.name


def test_json_round_trip(tmp_path):
    cfg = c.TrainConfig(network_module="loha", conv_dim=4, unet_lr=2e-4, optimizer_args=["weight_decay=0.1"],
                        resolution="768,512", v_parameterization=True, json_load_skip_list=["output_dir"])
    path = tmp_path / "cfg.json"
    c.save_json(cfg, str(path))
    assert json.loads(path.read_text())["config_version"] == c.CONFIG_VERSION
    assert c.load_json(str(path)) == cfg


@given(dim=st.integers(1, 512), alpha=st.floats(0.1, 512, allow_nan=False), lr=st.floats(1e-7, 1e-2),
       batch=st.integers(1, 64), shuffle=st.booleans(), clip=st.one_of(st.none(), st.integers(1, 12)))
def test_round_trip_property(dim, alpha, lr, batch, shuffle, clip):
    cfg = c.TrainConfig(network_dim=dim, network_alpha=alpha, learning_rate=lr, train_batch_size=batch,
                        shuffle_caption=shuffle, clip_skip=clip)
    assert c.from_dict(json.loads(c.to_json(cfg))) == cfg


def test_unknown_keys_are_listed_with_the_closest_name():
    with pytest.raises(ConfigError) as e:
        c.from_dict({"network_dimm": 8, "lerning_rate": 1e-4, "totally_unknown": 1})
    text = str(e.value)
    assert "'network_dimm'" in text and "did you mean 'network_dim'" in text
    assert "did you mean 'learning_rate'" in text and "'totally_unknown'" in text


@pytest.mark.parametrize("field,value,fragment", [
    ("network_dim", 0, "network_dim: 0 is out of range; allowed 1 to 100000"),
    ("optimizer_type", "Adam", "optimizer_type: 'Adam' is not one of"),
    ("learning_rate", "fast", "learning_rate: 'fast': expected a number"),
    ("train_batch_size", 2.5, "train_batch_size: 2.5: expected a whole number"),
    ("shuffle_caption", "maybe", "shuffle_caption: 'maybe': expected true or false"),
    ("caption_dropout_rate", 1.5, "caption_dropout_rate: 1.5 is out of range; allowed 0 to 1"),
    ("max_token_length", 100, "max_token_length: 100 is not one of 75, 150, 225"),
    ("resolution", "512x", "resolution: resolution '512x'"),
    ("resolution", "500", "must be a multiple of 8"),
    ("output_name", "a/b", "output_name: 'a/b' contains '/'"),
    ("output_name", "..", "output_name: '..' is not a usable file name"),
    ("output_name", "CON", "is not a usable file name"),
    ("optimizer_args", ["weight_decay"], "optimizer_args: optimizer_args entry 'weight_decay' is not key=value"),
])
def test_bad_values_name_the_field_the_value_and_the_allowed_range(field, value, fragment):
    with pytest.raises(ConfigError) as e:
        c.from_dict({field: value})
    assert fragment in str(e.value)


def test_contradictions_are_errors():
    with pytest.raises(ConfigError, match="both true"):
        c.from_dict({"network_train_unet_only": True, "network_train_text_encoder_only": True})
    with pytest.raises(ConfigError, match="cache_latents"):
        c.from_dict({"random_crop": True, "cache_latents": True})
    with pytest.raises(ConfigError, match="multiple of dylora_unit"):
        c.from_dict({"network_module": "dylora", "network_dim": 6, "dylora_unit": 4})


def test_questionable_settings_warn():
    assert any("Prodigy" in w for w in c.warnings_for(c.TrainConfig(optimizer_type="Prodigy")))
    assert any("IA3" in w for w in c.warnings_for(c.TrainConfig(network_module="ia3", conv_dim=4)))
    assert not c.warnings_for(c.TrainConfig())


def test_strings_from_kohya_gui_files_are_coerced():
    cfg = c.from_dict({"keep_tokens": "1", "clip_skip": "2", "unet_lr": "", "flip_aug": "true",
                       "optimizer_args": {"weight_decay": 0.1, "betas": [0.9, 0.99]}})
    assert cfg.keep_tokens == 1 and cfg.clip_skip == 2 and cfg.unet_lr is None and cfg.flip_aug is True
    assert c.parse_optimizer_args(cfg.optimizer_args) == {"weight_decay": 0.1, "betas": (0.9, 0.99)}


def test_migration_from_kohya_network_module_and_args():
    cfg = c.from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8", "conv_dim=4"]})
    assert (cfg.network_module, cfg.lokr_factor, cfg.conv_dim) == ("lokr", 8, 4)
    cfg = c.from_dict({"network_module": "networks.lora", "network_args": "conv_dim=8 conv_alpha=4"})
    assert (cfg.network_module, cfg.conv_dim, cfg.conv_alpha) == ("locon", 8, 4.0)
    cfg = c.from_dict({"network_module": "networks.dylora", "network_args": ["unit=4"], "network_dim": 16})
    assert (cfg.network_module, cfg.dylora_unit) == ("dylora", 4)
    with pytest.raises(ConfigError, match="not supported"):
        c.from_dict({"network_module": "networks.lora", "network_args": ["block_dims=1,2,3"]})
    with pytest.raises(ConfigError, match="newer"):
        c.from_dict({"config_version": c.CONFIG_VERSION + 1})


def test_json_load_skip_list_keeps_the_current_values(tmp_path):
    current = c.TrainConfig(output_dir="/mine", train_data_dir="/my/data", json_load_skip_list=["output_dir",
                                                                                                "train_data_dir"])
    path = tmp_path / "shared.json"
    path.write_text(json.dumps({"output_dir": "/theirs", "train_data_dir": "/their/data", "network_dim": 64}))
    loaded = c.load_json(str(path), base=current)
    assert (loaded.output_dir, loaded.train_data_dir, loaded.network_dim) == ("/mine", "/my/data", 64)


def test_load_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        c.load_json(str(bad))
    with pytest.raises(UserError, match="not found"):
        c.load_json(str(tmp_path / "missing.json"))
    bad.write_text(json.dumps({"network_dim": -1}))
    with pytest.raises(ConfigError, match="bad.json: network_dim"):
        c.load_json(str(bad))


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_are_valid_and_declare_what_applies(name):
    p = presets.PRESETS[name]
    cfg = presets.apply(name, c.TrainConfig(train_data_dir="/data", output_name="keep"))
    assert cfg.train_data_dir == "/data" and cfg.output_name == "keep"
    for k, v in p.values.items():
        assert getattr(cfg, k) == v
    shown = presets.applicable_fields(cfg, name)
    assert "train_data_dir" in shown and set(shown) <= set(p.fields)
    assert ("conv_dim" in shown) == (cfg.network_module in c.CONV_ALGORITHMS and "conv_dim" in p.fields)


def test_field_conditions_hide_what_does_not_apply():
    lora = presets.applicable_fields(c.TrainConfig(network_module="lora"))
    assert "conv_dim" not in lora and "dylora_unit" not in lora and "lokr_factor" not in lora
    dylora = presets.applicable_fields(c.TrainConfig(network_module="dylora"))
    assert "conv_dim" in dylora and "dylora_unit" in dylora
    ia3 = presets.applicable_fields(c.TrainConfig(network_module="ia3"))
    assert "network_dim" not in ia3


def test_every_option_is_a_cli_flag_and_round_trips():
    parser = cli.make_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    flags = {a.dest for a in train._actions}
    assert set(c.field_names()) <= flags
    args = parser.parse_args(["train", "--network_dim", "32", "--shuffle_caption", "--unet_lr", "",
                              "--optimizer_args", "weight_decay=0.2", "betas=0.9,0.99", "--v_parameterization",
                              "false"])
    cfg = cli.build_config(None, None, cli.overrides_from(args))
    assert cfg.network_dim == 32 and cfg.shuffle_caption and cfg.unet_lr is None
    assert cfg.optimizer_args == ["weight_decay=0.2", "betas=0.9,0.99"] and cfg.v_parameterization is False


def test_choosing_an_adaptive_optimizer_on_the_cli_sets_its_learning_rates():
    cfg = cli.build_config(None, None, {"optimizer_type": "Prodigy"})
    assert cfg.learning_rate == cfg.unet_lr == cfg.text_encoder_lr == 1.0
    cfg = cli.build_config(None, None, {"optimizer_type": "Prodigy", "learning_rate": "0.5"})
    assert cfg.learning_rate == 0.5
