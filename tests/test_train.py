"""End-to-end runs of the loop on the tiny models, asserting on the files it writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import UserError
from lora_trainer.networks.algorithms import ALGORITHMS
from lora_trainer.synthetic import make_dataset
from lora_trainer.train import TrainCallbacks, train

from .conftest import FAMILY, base_config, kohya_keys, tiny_bundle


def run(cfg, name="tiny-sd1", callbacks=None):
    return train(cfg, tiny_bundle(name), callbacks)


def module_keys(path):
    return {k.partition(".")[0] for k in load_file(path)}


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_every_algorithm_trains_two_steps_and_saves_the_expected_keys(tmp_path, dataset_dir, name, algo):
    cfg = base_config(dataset_dir, str(tmp_path), pretrained_model_name_or_path=name, network_module=algo,
                      dylora_unit=2, lokr_factor=4)
    result = run(cfg, name)
    assert result.steps == 2 and not result.stopped
    keys = module_keys(result.final_file)
    fixture = kohya_keys(FAMILY[name])
    if algo == "lora":
        assert keys == {e["key"] for e in fixture if e["algo"] == "lora"}
    elif algo == "ia3":
        assert keys == expected_ia3_keys(fixture)
    else:
        assert keys == {e["key"] for e in fixture}
    with safe_open(result.final_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if name == "tiny-sdxl" else "sd_v1")
    assert meta["ss_network_module"] == ALGORITHMS[algo].kohya_module
    assert meta["ss_steps"] == "2"


def expected_ia3_keys(fixture):
    """IA3 targets k/v and the feed-forward output; on OpenCLIP text encoders (SDXL's second one, SD2's) only the
    MLP, since A1111 applies a fused attention's deltas only as a complete q/k/v/out set."""
    unet = ("attn1_to_k", "attn1_to_v", "attn2_to_k", "attn2_to_v", "ff_net_2")
    te = ("self_attn_k_proj", "self_attn_v_proj", "mlp_fc2")
    in_unet = {e["key"] for e in fixture if e["key"].startswith("lora_unet") and e["key"].endswith(unet)}
    in_te = {e["key"] for e in fixture if e["key"].startswith("lora_te") and e["key"].endswith(te)
             and not (e["via"] and "self_attn" in e["key"])}
    return in_unet | in_te


def test_network_weights_change_during_training(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), max_train_steps=3, save_every_n_steps=1, network_module="locon")
    result = run(cfg)
    first = load_file(os.path.join(str(tmp_path), "t-step00000001.safetensors"))
    last = load_file(result.final_file)
    ups = [k for k in last if k.endswith("lora_up.weight")]
    assert all(first[k].abs().sum() > 0 for k in ups), "after one step every up matrix has moved off zero"
    assert any(not torch.equal(first[k], last[k]) for k in ups)


def test_loss_goes_down_on_a_fixed_dataset(tmp_path):
    data = make_dataset(str(tmp_path / "data"), images=4, repeats=1, size=64, aspect_variety=False)
    cfg = base_config(data, str(tmp_path / "out"), max_train_steps=None, max_train_epochs=40, train_batch_size=4,
                      learning_rate=3e-3, network_dim=8, network_alpha=8.0, network_module="locon",
                      network_train_unet_only=True)
    result = run(cfg)
    assert result.epochs == 40
    assert result.last_epoch_loss < 0.9 * result.first_epoch_loss, (result.first_epoch_loss, result.last_epoch_loss)


def _state_tensors(path):
    return load_file(os.path.join(path, "network.safetensors"))


def test_resume_ends_bit_exact_with_the_uninterrupted_run(tmp_path):
    data = make_dataset(str(tmp_path / "data"), images=5, repeats=2, size=64)
    common = dict(max_train_steps=None, max_train_epochs=3, train_batch_size=2, gradient_accumulation_steps=2,
                  network_module="locon", shuffle_caption=True, flip_aug=True, caption_dropout_rate=0.2,
                  network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0, lr_scheduler="cosine",
                  save_state=True, optimizer_type="AdamW")
    full = run(base_config(data, str(tmp_path / "full"), **common))
    steps_per_epoch = full.plan.steps_per_epoch
    # interrupted: stop in the middle of epoch 2
    stop_at = steps_per_epoch + 1
    seen = []

    def should_stop():
        return bool(seen) and seen[-1] >= stop_at

    cb = TrainCallbacks(on_progress=lambda p: seen.append(p.step) if p.phase == "training" else None,
                        should_stop=should_stop)
    part = run(base_config(data, str(tmp_path / "part"), **common), callbacks=cb)
    assert part.stopped and part.steps == stop_at and part.state_dir
    resumed = run(base_config(data, str(tmp_path / "part"), resume=part.state_dir, **common))
    assert resumed.steps == full.steps
    a, b = load_file(full.final_file), load_file(resumed.final_file)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa = _state_tensors(full.state_dir)
    sb = _state_tensors(resumed.state_dir)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saves_every_n_epochs_with_kohya_names_and_keeps_the_last_n(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), max_train_steps=None, max_train_epochs=5, save_every_n_epochs=1,
                      save_last_n_epochs=2)
    result = run(cfg)
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert names == ["t-000003.safetensors", "t-000004.safetensors", "t.safetensors"]
    with safe_open(os.path.join(tmp_path, "t-000004.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "4"
    assert result.final_file.endswith("t.safetensors")


def test_dry_run_writes_config_and_step_arithmetic_only(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), save_json_only=True, max_train_steps=None, max_train_epochs=3)
    result = run(cfg)
    assert result.final_file is None and result.steps == 0
    steps = json.loads((tmp_path / "t_steps.json").read_text())
    assert steps["plan"]["total_steps"] == 3 * steps["plan"]["steps_per_epoch"]
    assert "samples/epoch" in steps["explain"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    saved = json.loads((tmp_path / "t_config.json").read_text())
    assert saved["save_json_only"] is True and saved["config_version"] == 1


@pytest.mark.parametrize("earlier", ["t.safetensors", "t-000002.safetensors", "t-step00000004.safetensors"])
def test_existing_output_is_not_overwritten(tmp_path, dataset_dir, earlier):
    (tmp_path / earlier).write_bytes(b"precious")
    (tmp_path / "t-notes.safetensors").write_bytes(b"not ours")  # not a name this run writes
    with pytest.raises(UserError, match=f"1 file.*{earlier}.*overwrite"):
        run(base_config(dataset_dir, str(tmp_path), save_every_n_epochs=1, save_every_n_steps=1))
    assert (tmp_path / earlier).read_bytes() == b"precious"
    if earlier != "t.safetensors":
        return
    run(base_config(dataset_dir, str(tmp_path), overwrite=True))
    assert (tmp_path / "t.safetensors").read_bytes() != b"precious"


def test_samples_tag_file_charts_and_metrics_are_written(tmp_path, dataset_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapetok, red circle --n blurry --w 64 --h 64 --d 5 --s 3 --l 4\n# comment\n"
                       "shapetok, blue square --s 2 --ss ddim\n")
    cfg = base_config(dataset_dir, str(tmp_path / "out"), sample_prompts=str(prompts), sample_every_n_steps=2,
                      tag_occurrence_txt_file=True, max_train_steps=2)
    result = run(cfg)
    assert len(result.samples) == 2 and all(os.path.isfile(p) for p in result.samples)
    assert "_5.png" in result.samples[0]
    tags = (tmp_path / "out" / "t_tag_frequency.txt").read_text()
    assert "shapetok" in tags.splitlines()[1]
    lines = (tmp_path / "out" / "logs" / "t_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert all(os.path.getsize(c) > 0 for c in result.charts)


def test_prior_loss_weight_scales_the_regularisation_samples(tmp_path):
    from lora_trainer.data.pipeline import Batch
    from lora_trainer.train import Trainer

    data = make_dataset(str(tmp_path / "data"), images=2, repeats=1, reg_images=2)
    losses = {}
    for w in (0.0, 1.0, 2.0):
        cfg = base_config(data, str(tmp_path / f"o{w}"), reg_data_dir=str(tmp_path / "data_reg"), prior_loss_weight=w)
        trainer = Trainer(cfg, tiny_bundle(), TrainCallbacks())
        trainer.dataset = trainer._build_dataset()
        trainer.plan = trainer._plan_steps()
        trainer._prepare_model()
        trainer.noise_gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        batch = Batch(latents, None, ["a", "b"], [_size()] * 2,
                      torch.tensor([False, True]))
        losses[w] = trainer._loss(batch).item()
        trainer.bundle.restore()
    # loss = (l_train + w * l_reg) / 2 is linear in w
    assert losses[2.0] - losses[1.0] == pytest.approx(losses[1.0] - losses[0.0], rel=1e-5)
    assert losses[1.0] > losses[0.0]


def _size():
    from lora_trainer.model import SizeInfo

    return SizeInfo((64, 64), (0, 0), (64, 64))


def test_v_prediction_model_trains_and_is_recorded(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), pretrained_model_name_or_path="tiny-sd2")
    result = run(cfg, "tiny-sd2")
    with safe_open(result.final_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"


def test_stop_request_saves_what_was_trained(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), max_train_steps=50)
    steps = []
    cb = TrainCallbacks(on_progress=lambda p: steps.append(p.step) if p.phase == "training" else None,
                        should_stop=lambda: bool(steps))
    result = run(cfg, callbacks=cb)
    assert result.stopped and result.steps == 1
    assert os.path.basename(result.final_file) == "t-step00000001.safetensors"
    assert not os.path.exists(tmp_path / "t.safetensors")


def test_stop_while_caching_ends_cleanly_without_files(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path))
    result = run(cfg, callbacks=TrainCallbacks(should_stop=lambda: True))
    assert result.stopped and result.steps == 0 and result.final_file is None
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]


def test_gradient_checkpointing_gives_the_same_training_step(tmp_path, dataset_dir):
    """Non-reentrant checkpointing: frozen inputs still carry gradients to the network inside the blocks."""
    plain = run(base_config(dataset_dir, str(tmp_path / "a"), network_module="locon", max_train_steps=1))
    ckpt = run(base_config(dataset_dir, str(tmp_path / "b"), network_module="locon", max_train_steps=1,
                           gradient_checkpointing=True))
    a, b = load_file(plain.final_file), load_file(ckpt.final_file)
    moved = [k for k in a if k.endswith("lora_up.weight")]
    assert all(b[k].abs().sum() > 0 for k in moved)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_mixed_precision_on_the_cpu(tmp_path, dataset_dir):
    result = run(base_config(dataset_dir, str(tmp_path), mixed_precision="bf16", save_precision="bf16"))
    sd = load_file(result.final_file)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in sd.values())


def test_fp16_on_the_cpu_is_refused_with_advice(tmp_path, dataset_dir):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        run(base_config(dataset_dir, str(tmp_path), mixed_precision="fp16"))


def test_tensorboard_logging(tmp_path, dataset_dir):
    pytest.importorskip("tensorboard")
    run(base_config(dataset_dir, str(tmp_path), log_with="tensorboard"))
    events = [f for _, _, files in os.walk(tmp_path / "logs" / "tensorboard") for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)


def test_pause_holds_the_loop_until_released(tmp_path, dataset_dir):
    phases = []
    polls = iter([True, True, False] + [False] * 10)
    cb = TrainCallbacks(on_progress=lambda p: phases.append(p.phase), should_pause=lambda: next(polls))
    result = run(base_config(dataset_dir, str(tmp_path)), callbacks=cb)
    assert result.steps == 2 and phases.count("paused") == 2
    assert phases.index("paused") > phases.index("training")
