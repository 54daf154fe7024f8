"""kohya configs: kohya_ss GUI JSONs (old and new), sd-scripts TOML + dataset TOML pairs, `convert`, Load params.

The fixtures are written by hand after real files: the kohya_ss GUI's saved configs and its presets/lora/*.json
(bmaltais/kohya_ss, `lora_gui.py` save_configuration), and sd-scripts' `--config_file` / `--dataset_config`
formats (kohya-ss/sd-scripts `library/train_util.py` read_config_from_file, `library/config_util.py`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys

import pytest

from lora_trainer import config as cfgmod
from lora_trainer import kohya_config as kc
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.synthetic import make_dataset

# A kohya_ss GUI config as the GUI saves it today (string xformers, LyCORIS, the other model families' keys, a token).
GUI_NEW = {
    "LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": "full", "adaptive_noise_scale": 0,
    "additional_parameters": "--log_prefix=xl-lokr --min_timestep=100", "bucket_no_upscale": True,
    "bucket_reso_steps": 64, "bypass_mode": False, "cache_latents": True, "cache_latents_to_disk": False,
    "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": 1,
    "color_aug": False, "conv_alpha": 8, "conv_dim": 16, "dataset_config": "", "debiased_estimation_loss": False,
    "dim_from_weights": False, "dora_wd": False, "enable_bucket": True, "epoch": 12, "factor": 8, "flip_aug": True,
    "flux1_checkbox": False, "fp8_base": False, "full_bf16": False, "gpu_ids": "", "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True, "guidance_scale": 3.5, "huber_c": 0.1, "huber_schedule": "snr",
    "huggingface_token": "hf_secret_token", "keep_tokens": 1, "learning_rate": 0.0001, "log_with": "tensorboard",
    "logging_dir": "/runs/logs", "loss_type": "l2", "lr_scheduler": "cosine", "lr_scheduler_args": "",
    "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup": 10, "lr_warmup_steps": 0,
    "masked_loss": False, "max_bucket_reso": 2048, "max_data_loader_n_workers": 0, "max_grad_norm": 1,
    "max_resolution": "1024,1024", "max_timestep": 1000, "max_token_length": 75, "max_train_epochs": 0,
    "max_train_steps": 0, "mem_eff_attn": False, "min_bucket_reso": 256, "min_snr_gamma": 5, "min_timestep": 0,
    "mixed_precision": "bf16", "model_list": "custom", "module_dropout": 0.1, "multi_gpu": False,
    "multires_noise_discount": 0.3, "multires_noise_iterations": 0, "network_alpha": 16, "network_dim": 32,
    "network_dropout": 0, "network_weights": "", "noise_offset": 0.05, "noise_offset_type": "Original",
    "num_cpu_threads_per_process": 2, "optimizer": "AdamW", "optimizer_args": "weight_decay=0.05 betas=0.9,0.99",
    "output_dir": "/runs/out", "output_name": "mychar_xl", "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/sd_xl_base_1.0.safetensors", "prior_loss_weight": 1,
    "random_crop": False, "rank_dropout": 0, "reg_data_dir": "",
    "sample_every_n_epochs": 2, "sample_every_n_steps": 0,
    "sample_prompts": "mychar, smiling --w 1024 --h 1024 --d 1\nmychar, standing --n blurry",
    "sample_sampler": "euler_a", "save_every_n_epochs": 4, "save_every_n_steps": 0, "save_last_n_steps": 0,
    "save_model_as": "safetensors", "save_precision": "fp16", "save_state": False, "scale_weight_norms": 0,
    "sd3_checkbox": False, "sdxl": True, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True,
    "seed": 1234, "shuffle_caption": True, "t5xxl_max_token_length": 512, "text_encoder_lr": 5e-05,
    "timestep_sampling": "sigma", "train_batch_size": 2, "train_data_dir": "/data/mychar/img",
    "training_comment": "trigger: mychar", "unet_lr": 0.0001, "unit": 1, "use_scalar": False, "use_tucker": True,
    "v2": False, "v_parameterization": False, "vae": "", "wandb_api_key": "wandb_secret_key",
    "weighted_captions": False, "xformers": "sdpa",
}

# A 2023 GUI config: boolean xformers, numbers as strings, lora_network_weights, a text-encoder rate of 0.
GUI_OLD = {
    "LoRA_type": "Kohya LoCon", "block_alphas": "", "block_dims": "", "bucket_no_upscale": True,
    "bucket_reso_steps": 64.0, "cache_latents": True, "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0, "caption_extension": ".txt", "clip_skip": 2, "color_aug": False, "conv_alpha": 1,
    "conv_dim": 8, "down_lr_weight": "", "enable_bucket": True, "epoch": 10, "flip_aug": False, "full_fp16": False,
    "gradient_accumulation_steps": 1.0, "gradient_checkpointing": False, "keep_tokens": "0",
    "learning_rate": "0.0001", "logging_dir": "", "lora_network_weights": "/loras/start.safetensors",
    "lr_scheduler": "constant_with_warmup", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "",
    "lr_warmup": "5", "max_data_loader_n_workers": "1", "max_resolution": "512,768", "max_token_length": "75",
    "max_train_epochs": "", "max_train_steps": "", "mem_eff_attn": True, "min_snr_gamma": 0,
    "mixed_precision": "fp16", "network_alpha": 16, "network_dim": 32, "noise_offset": "0.05",
    "num_cpu_threads_per_process": 2, "optimizer": "AdamW", "optimizer_args": "", "output_dir": "/out",
    "output_name": "old_style", "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "prior_loss_weight": 1.0, "random_crop": False, "reg_data_dir": "/data/reg", "sample_prompts": "",
    "sample_sampler": "k_euler_a", "save_every_n_epochs": 1, "save_model_as": "safetensors",
    "save_precision": "fp16", "seed": "", "shuffle_caption": True, "stop_text_encoder_training": 0,
    "text_encoder_lr": "0", "train_batch_size": 1, "train_data_dir": "/data/img", "unet_lr": "0.0001",
    "use_8bit_adam": False, "v2": False, "v_parameterization": False, "xformers": True,
}

MAIN_TOML = """\
[model_arguments]
pretrained_model_name_or_path = "/models/v1-5-pruned.safetensors"
v2 = false

[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=loha", "conv_dim=8", "conv_alpha=4", "dropout=0", "preset=attn-mlp", "use_tucker=False"]
unet_lr = 1e-4
text_encoder_lr = [5e-5]

[optimizer_arguments]
optimizer_type = "lion"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99", "use_triton=True"]
learning_rate = 3e-5
lr_scheduler = "cosine_with_min_lr"
lr_warmup_steps = 0.05

[dataset_arguments]
dataset_config = "dataset.toml"
train_data_dir = "/ignored"
cache_latents = true
debug_dataset = false

[training_arguments]
output_dir = "out"
output_name = "tomlchar"
save_precision = "fp16"
save_every_n_epochs = 2
max_train_epochs = 8
mixed_precision = "bf16"
xformers = true
gradient_checkpointing = true
seed = 42
min_snr_gamma = 5
noise_offset = 0.0357
multires_noise_discount = 0.3
logging_dir = "logs"
log_with = "all"
loss_type = "l2"
zero_terminal_snr = true
max_data_loader_n_workers = 2
persistent_data_loader_workers = true

[sample_prompt_arguments]
sample_every_n_epochs = 2
sample_sampler = "k_euler_a"
sample_prompts = "prompts.txt"
"""

DATASET_TOML = """\
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
batch_size = 4
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 1024

[[datasets]]
resolution = [768, 512]

  [[datasets.subsets]]
  image_dir = "{root}/train/10_tomlchar"
  num_repeats = 10
  class_tokens = "tomlchar"

  [[datasets.subsets]]
  image_dir = "{root}/train/3_outfit"
  num_repeats = 5
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{root}/loose_images"
  num_repeats = 2
  class_tokens = "tomlchar"

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{root}/reg/1_person"
  class_tokens = "person"
  keep_tokens = 0
  caption_prefix = "photo of"

[[datasets]]
resolution = 512

  [[datasets.subsets]]
  image_dir = "{root}/train/2_extra"
"""


def write_gui(tmp_path, data, name="kohya_gui.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return str(path)


def write_toml_pair(tmp_path):
    root = tmp_path.as_posix()
    for folder in ("train/10_tomlchar", "train/3_outfit", "train/2_extra", "train/5_unlisted", "train/not_a_set",
                   "loose_images", "reg/1_person"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "dataset.toml").write_text(DATASET_TOML.format(root=root), encoding="utf-8")
    (tmp_path / "config.toml").write_text(MAIN_TOML, encoding="utf-8")
    return str(tmp_path / "config.toml")


def keys(loaded):
    return [(u.key, u.value) for u in loaded.unsupported]


# ----------------------------------------------------------------------------------------------------------------
# Format detection


def test_formats_are_told_apart(tmp_path):
    ours = tmp_path / "ours.json"
    cfgmod.save_json(TrainConfig(network_dim=8), str(ours))
    legacy = tmp_path / "legacy.json"  # versionless: our migration reads it as the kohya-named layout
    legacy.write_text(json.dumps({"network_module": "networks.lora", "network_dim": 8}))
    assert kc.detect_format(str(ours)) == kc.OURS
    assert kc.detect_format(str(legacy)) == kc.OURS
    assert kc.detect_format(write_gui(tmp_path, GUI_OLD)) == kc.GUI
    assert kc.detect_format(str(tmp_path / "x.toml")) == kc.SD_SCRIPTS
    assert cfgmod.load_config(str(ours)).network_dim == 8
    assert cfgmod.load_config(str(legacy)).network_module == "lora"
    bare = tmp_path / "sdxl_run"  # sd-scripts adds .toml to a --config_file without it
    bare.write_text('network_module = "networks.lora"\nnetwork_dim = 8\n')
    assert kc.detect_format(str(bare)) == kc.SD_SCRIPTS and cfgmod.load_config(str(bare)).network_alpha == 1.0
    binary = tmp_path / "utf16.json"
    binary.write_bytes('{"network_dim": 8}'.encode("utf-16"))
    with pytest.raises(UserError, match="utf16.json is not a UTF-8 text file"):
        cfgmod.load_config(str(binary))


# ----------------------------------------------------------------------------------------------------------------
# kohya_ss GUI JSON


def test_new_gui_json_maps_every_supported_option(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_trainer.kohya_config"):
        loaded = kc.load(write_gui(tmp_path, GUI_NEW))
    c = loaded.config
    assert loaded.format == kc.GUI
    assert (c.network_module, c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha, c.lokr_factor) == \
        ("lokr", 32, 16.0, 16, 8.0, 8)
    assert (c.module_dropout, c.rank_dropout, c.network_dropout) == (0.1, 0.0, 0.0)
    assert (c.max_train_epochs, c.lr_warmup_steps, c.lr_scheduler) == (12, 0.1, "cosine")  # lr_warmup 10 percent
    assert (c.learning_rate, c.unet_lr, c.text_encoder_lr) == (1e-4, 1e-4, 5e-5)
    assert not c.network_train_unet_only and not c.network_train_text_encoder_only
    assert (c.optimizer_type, c.optimizer_args) == ("AdamW", ["weight_decay=0.05", "betas=0.9,0.99"])
    assert (c.resolution, c.model_family, c.sdpa, c.xformers) == ("1024", "sdxl", True, False)
    assert (c.mixed_precision, c.save_precision, c.gradient_checkpointing, c.gradient_accumulation_steps) == \
        ("bf16", "fp16", True, 2)
    assert (c.min_snr_gamma, c.noise_offset, c.clip_skip, c.seed, c.max_token_length) == (5.0, 0.05, 1, 1234, 75)
    assert (c.shuffle_caption, c.keep_tokens, c.flip_aug, c.caption_dropout_rate) == (True, 1, True, 0.05)
    assert (c.min_bucket_reso, c.max_bucket_reso, c.bucket_no_upscale) == (256, 2048, True)
    assert (c.save_every_n_epochs, c.save_every_n_steps, c.sample_every_n_epochs, c.sample_every_n_steps) == \
        (4, None, 2, None)
    assert (c.log_with, c.log_dir, c.output_dir, c.output_name) == ("tensorboard", "/runs/logs", "/runs/out",
                                                                    "mychar_xl")
    assert (c.train_data_dir, c.reg_data_dir, c.training_comment) == ("/data/mychar/img", "", "trigger: mychar")
    assert c.sample_prompts == ""  # the GUI's prompt text: convert writes it to a file
    assert keys(loaded) == [("use_tucker", True), ("additional_parameters --min_timestep", "100"),
                            ("sample_prompts", GUI_NEW["sample_prompts"])]
    assert "Tucker" in loaded.unsupported[0].why and "convert" in loaded.unsupported[2].why
    assert "3 option(s) not carried over" in caplog.text and "use_tucker = True" in caplog.text
    text = caplog.text + " ".join(str(u) for u in loaded.unsupported)
    assert "hf_secret_token" not in text and "wandb_secret_key" not in text


def test_old_gui_json_with_boolean_xformers_and_string_numbers(tmp_path):
    loaded = kc.load(write_gui(tmp_path, GUI_OLD))
    c = loaded.config
    assert loaded.unsupported == []
    assert (c.network_module, c.conv_dim, c.conv_alpha, c.network_weights) == ("locon", 8, 1.0,
                                                                               "/loras/start.safetensors")
    assert (c.xformers, c.sdpa) == (True, False)
    assert (c.lr_warmup_steps, c.max_train_epochs, c.lr_scheduler) == (0.05, 10, "constant_with_warmup")
    # text_encoder_lr 0: the GUI trains the UNet only
    assert (c.unet_lr, c.text_encoder_lr, c.network_train_unet_only) == (1e-4, None, True)
    assert (c.resolution, c.keep_tokens, c.max_token_length, c.noise_offset, c.seed) == ("512,768", 0, 75, 0.05,
                                                                                          None)
    assert (c.sample_sampler, c.clip_skip, c.min_snr_gamma, c.log_dir) == ("euler_a", 2, None, "")
    assert (c.train_data_dir, c.reg_data_dir, c.model_family) == ("/data/img", "/data/reg", "auto")
    unnamed = kc.load(write_gui(tmp_path, {**GUI_OLD, "output_name": "", "resume": "/kohya/state"}),
                      base=TrainConfig(output_name="mine"))
    assert unnamed.config.output_name == "mine" and unnamed.config.resume == ""  # kohya states do not resume here
    assert keys(unnamed) == [("resume", "/kohya/state")]


@pytest.mark.parametrize("lora_type,extra,expected", [
    ("Standard", {"conv_dim": 8}, ("lora", None, None)),
    ("Kohya LoCon", {"conv_dim": 0, "conv_alpha": 1}, ("lora", None, None)),  # kohya: no conv rank, no conv layers
    ("Kohya LoCon", {"conv_dim": 8, "conv_alpha": 4}, ("locon", 8, 4.0)),
    ("LoCon", {"conv_dim": 4, "conv_alpha": 2}, ("locon", 4, 2.0)),
    ("LyCORIS/LoCon", {"conv_dim": 0, "conv_alpha": 0}, ("locon", None, None)),  # LyCORIS: 0 = network_dim
    ("LyCORIS/LoHa", {"conv_dim": 4, "conv_alpha": 2}, ("loha", 4, 2.0)),
    ("LyCORIS/iA3", {"conv_dim": 4}, ("ia3", None, None)),
    ("LyCORIS/DyLoRA", {"unit": 4, "conv_dim": 8, "conv_alpha": 1}, ("dylora", 8, 1.0)),
])
def test_lora_types(tmp_path, lora_type, extra, expected):
    c = kc.load(write_gui(tmp_path, {**GUI_OLD, "LoRA_type": lora_type, **extra})).config
    assert (c.network_module, c.conv_dim, c.conv_alpha) == expected
    if lora_type == "LyCORIS/DyLoRA":
        assert c.dylora_unit == 4


def test_kohya_dylora_without_conv_rank_is_listed(tmp_path):
    loaded = kc.load(write_gui(tmp_path, {**GUI_OLD, "LoRA_type": "Kohya DyLoRA", "conv_dim": 0, "unit": 2}))
    assert (loaded.config.network_module, loaded.config.dylora_unit) == ("dylora", 2)
    assert keys(loaded) == [("conv_dim", 0)] and "3x3 conv" in loaded.unsupported[0].why


@pytest.mark.parametrize("warmup,warmup_steps,expected,listed", [
    (10, 0, 0.1, False), ("5", "", 0.05, False), (0, 0, 0.0, False), (10, 30, 30, False), (100, 0, 0.0, True),
])
def test_lr_warmup_is_a_percent_of_the_steps(tmp_path, warmup, warmup_steps, expected, listed):
    loaded = kc.load(write_gui(tmp_path, {**GUI_OLD, "lr_warmup": warmup, "lr_warmup_steps": warmup_steps}))
    assert loaded.config.lr_warmup_steps == expected
    assert keys(loaded) == ([("lr_warmup", warmup)] if listed else [])


@pytest.mark.parametrize("xformers,expected", [
    (True, (True, False)), (False, (False, True)), ("xformers", (True, False)), ("sdpa", (False, True)),
    ("none", (False, True)),
])
def test_xformers_old_bool_and_new_string(tmp_path, xformers, expected):
    c = kc.load(write_gui(tmp_path, {**GUI_OLD, "xformers": xformers})).config
    assert (c.xformers, c.sdpa) == expected


@pytest.mark.parametrize("changes,epochs,steps", [
    ({"epoch": 10, "max_train_epochs": "", "max_train_steps": ""}, 10, 1600),
    ({"epoch": 10, "max_train_epochs": "3", "max_train_steps": "500"}, 3, 1600),  # sd-scripts: epochs win
    ({"epoch": 10, "max_train_epochs": 0, "max_train_steps": "160"}, None, 160),
])
def test_epoch_and_step_counts(tmp_path, changes, epochs, steps):
    c = kc.load(write_gui(tmp_path, {**GUI_OLD, **changes})).config
    assert (c.max_train_epochs, c.max_train_steps) == (epochs, steps)


def test_additional_parameters_are_sd_scripts_flags(tmp_path):
    extra = '--network_train_unet_only --max_grad_norm=0 --log_prefix=x --min_timestep 100 --loss_type "huber"'
    loaded = kc.load(write_gui(tmp_path, {**GUI_OLD, "text_encoder_lr": "5e-5", "additional_parameters": extra}))
    assert loaded.config.network_train_unet_only and loaded.config.max_grad_norm == 0.0
    assert keys(loaded) == [("additional_parameters --min_timestep", "100"),
                            ("additional_parameters --loss_type", "huber")]


def test_adafactor_as_kohya_runs_it_and_its_relative_step_default(tmp_path):
    args = "scale_parameter=False relative_step=False warmup_init=False"
    loaded = kc.load(write_gui(tmp_path, {**GUI_OLD, "optimizer": "Adafactor", "optimizer_args": args}))
    assert (loaded.config.optimizer_type, loaded.config.optimizer_args, loaded.unsupported) == ("Adafactor", [], [])
    with pytest.raises(ConfigError, match=r"kohya_gui.json: optimizer_args: Adafactor with relative_step=True"):
        kc.load(write_gui(tmp_path, {**GUI_OLD, "optimizer": "Adafactor", "optimizer_args": ""}))


@pytest.mark.parametrize("changes,fragment", [
    ({"LoRA_type": "LyCORIS/GLoRA"}, "LoRA_type: 'LyCORIS/GLoRA' is not supported"),
    ({"optimizer": "DAdaptLion"}, "optimizer: 'DAdaptLion' is not supported"),
    ({"flux1_checkbox": True}, "flux1_checkbox: true: Train LoRA trains SD1.x, SD2.x and SDXL only"),
    ({"network_dim": 0}, "network_dim: 0 is out of range"),
    ({"max_resolution": "512,650"}, "resolution: '512,650' must be a multiple of 8 on each side (e.g. 512 or "
                                    "768,512) (from 'max_resolution')"),
])
def test_what_cannot_be_trained_is_an_error_naming_the_file(tmp_path, changes, fragment):
    with pytest.raises(ConfigError) as e:
        kc.load(write_gui(tmp_path, {**GUI_OLD, **changes}))
    assert f"kohya_gui.json: {fragment}" in str(e.value)


def test_bucket_steps_below_8_become_8(tmp_path):
    loaded = kc.load(write_gui(tmp_path, {**GUI_OLD, "bucket_reso_steps": 1, "min_bucket_reso": 300,
                                          "max_bucket_reso": 2050}))
    c = loaded.config
    assert (c.bucket_reso_steps, c.min_bucket_reso, c.max_bucket_reso) == (8, 296, 2056)  # as sd-scripts rounds
    assert keys(loaded) == [("bucket_reso_steps", 1)]


# ----------------------------------------------------------------------------------------------------------------
# sd-scripts TOML + dataset TOML


def test_sd_scripts_toml_pair_with_subsets_and_network_args(tmp_path, caplog):
    path = write_toml_pair(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.kohya_config"):
        loaded = kc.load(path)
    c, root = loaded.config, tmp_path.as_posix()
    assert loaded.format == kc.SD_SCRIPTS
    assert (c.network_module, c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha, c.network_dropout) == \
        ("loha", 16, 8.0, 8, 4.0, 0.0)
    assert (c.optimizer_type, c.optimizer_args) == ("Lion", ["weight_decay=0.1", "betas=0.9,0.99"])
    assert (c.learning_rate, c.unet_lr, c.text_encoder_lr, c.lr_warmup_steps, c.lr_scheduler) == \
        (3e-5, 1e-4, 5e-5, 0.05, "constant")
    assert (c.train_data_dir, c.reg_data_dir) == (f"{root}/train", f"{root}/reg")
    assert (c.resolution, c.train_batch_size, c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso) == \
        ("768,512", 4, True, 320, 1024)
    assert (c.shuffle_caption, c.caption_extension, c.keep_tokens, c.flip_aug) == (True, ".txt", 1, False)
    assert (c.xformers, c.sdpa, c.mixed_precision, c.save_precision, c.max_train_epochs, c.seed) == \
        (True, False, "bf16", "fp16", 8, 42)
    assert (c.sample_sampler, c.sample_prompts, c.log_with, c.log_dir, c.cache_latents) == \
        ("euler_a", "prompts.txt", "tensorboard", "logs", True)
    assert keys(loaded) == [
        ("network_args", "preset=attn-mlp"),
        ("optimizer_args", "use_triton=True"),
        ("lr_scheduler", "cosine_with_min_lr"),
        ("log_with", "all"),
        ("zero_terminal_snr", True),
        ("train_data_dir", "/ignored"),
        ("datasets[0].subsets[3].caption_prefix", "photo of"),
        ("datasets[1].resolution", 512),
        ("datasets[0].subsets[3].keep_tokens", 0),
        ("datasets[0].subsets[1].flip_aug", True),
        ("datasets[0].subsets[1].num_repeats", 5),
        ("datasets[0].subsets[2].image_dir", f"{root}/loose_images"),
        ("datasets[1].subsets[0].num_repeats", 1),  # sd-scripts' default, whatever the folder is called
        ("train_data_dir", f"{root}/train"),
    ]
    why = {u.key + str(u.value): u.why for u in loaded.unsupported}
    assert "rename the folder to '5_outfit'" in why["datasets[0].subsets[1].num_repeats5"]
    assert "rename it to '2_tomlchar'" in why[f"datasets[0].subsets[2].image_dir{root}/loose_images"]
    assert "5_unlisted" in why[f"train_data_dir{root}/train"] and "not_a_set" not in why[f"train_data_dir{root}/train"]
    assert "14 option(s) not carried over" in caplog.text


def test_an_option_the_toml_leaves_out_has_sd_scripts_default_not_the_current_one(tmp_path):
    path = tmp_path / "minimal.toml"
    path.write_text('network_module = "networks.lora"\ntrain_data_dir = "/data"\nresolution = "512,512"\n')
    current = TrainConfig(network_alpha=32.0, enable_bucket=True, cache_latents=True, learning_rate=1e-3,
                          optimizer_type="Prodigy", save_precision="bf16", alpha_background="black")
    c = cfgmod.load_config(str(path), base=current)
    assert (c.network_dim, c.network_alpha, c.learning_rate, c.optimizer_type) == (4, 1.0, 2e-6, "AdamW")
    assert (c.enable_bucket, c.cache_latents, c.save_precision, c.caption_extension) == (False, False, "float",
                                                                                         ".caption")
    assert (c.resolution, c.train_data_dir, c.alpha_background) == ("512", "/data", "black")  # ours-only stays


@pytest.mark.parametrize("module,args,expected", [
    ("networks.lora", [], {"network_module": "lora", "conv_dim": None, "conv_alpha": None}),
    ("networks.lora", ["conv_dim=4"], {"network_module": "locon", "conv_dim": 4, "conv_alpha": 1.0}),  # kohya: 1
    ("lycoris.kohya", ["algo=locon"], {"network_module": "locon", "conv_dim": None, "conv_alpha": None}),
    ("lycoris.kohya", ["algo=lokr", "factor=4", "conv_dim=8"], {"network_module": "lokr", "conv_dim": 8,
                                                                "lokr_factor": 4}),
    ("lycoris.kohya", ["algo=lokr"], {"network_module": "lokr", "lokr_factor": -1}),
    ("lycoris.kohya", ["algo=ia3"], {"network_module": "ia3", "conv_dim": None}),
    ("lycoris.kohya", ["algo=dylora"], {"network_module": "dylora", "dylora_unit": 4}),  # LyCORIS' block_size
    ("networks.dylora", ["conv_dim=16", "unit=8"], {"network_module": "dylora", "conv_dim": 16, "conv_alpha": 1.0,
                                                    "dylora_unit": 8}),
])
def test_network_modules_and_args(tmp_path, module, args, expected):
    path = tmp_path / "n.toml"
    path.write_text(f"network_module = {json.dumps(module)}\nnetwork_dim = 16\nnetwork_args = {json.dumps(args)}\n")
    c = kc.load(str(path)).config
    assert {name: getattr(c, name) for name in expected} == expected


def test_unsupported_network_module_is_an_error(tmp_path):
    path = tmp_path / "oft.toml"
    path.write_text('network_module = "networks.oft"\n')
    with pytest.raises(ConfigError, match="oft.toml: network_module: 'networks.oft' is not supported"):
        kc.load(str(path))


@pytest.mark.parametrize("parser", kc.TOML_PARSERS)
def test_malformed_toml_names_the_file_and_the_line(tmp_path, parser):
    if importlib.util.find_spec(parser) is None:
        pytest.skip(f"{parser} is not installed here")
    text = '[training_arguments]\noutput_dir = "out"\nmax_train_epochs = = 3\n'
    with pytest.raises(UserError) as e:
        kc.parse_toml(text, "/cfg/bad.toml", parser)
    message = str(e.value)
    assert message.startswith("/cfg/bad.toml, line 3") and "not valid TOML" in message
    assert "'max_train_epochs = = 3'" in message


def test_toml_parsers_agree(tmp_path):
    if importlib.util.find_spec("toml") is None:
        pytest.skip("toml is not installed here")
    first = kc.parse_toml(MAIN_TOML, "main.toml", kc.TOML_PARSERS[0] if sys.version_info >= (3, 11) else "toml")
    assert kc.parse_toml(MAIN_TOML, "main.toml", "toml") == first


def test_malformed_dataset_toml_names_that_file(tmp_path):
    path = write_toml_pair(tmp_path)
    (tmp_path / "dataset.toml").write_text("[general]\nshuffle_caption = yes\n")
    with pytest.raises(UserError, match=r"dataset.toml, line 2"):
        kc.load(path)
    (tmp_path / "dataset.toml").unlink()
    with pytest.raises(UserError, match="dataset_config 'dataset.toml' not found"):
        kc.load(path)


# ----------------------------------------------------------------------------------------------------------------
# convert and the command line


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_convert_round_trips_the_toml_pair(tmp_path):
    path = write_toml_pair(tmp_path)
    out = tmp_path / "ours.json"
    done = cli("convert", path, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} from the {kc.SD_SCRIPTS} {path}" in done.stdout
    assert "not carried over (14):" in done.stdout and "  - network_args = 'preset=attn-mlp'" in done.stdout
    assert json.loads(out.read_text())[cfgmod.VERSION_KEY] == cfgmod.CONFIG_VERSION
    assert cfgmod.load_json(str(out)) == kc.load(path).config
    again = cli("convert", path, "-o", str(out))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr and "Traceback" not in again.stderr
    assert cli("convert", path, "-o", str(out), "--force").returncode == 0


def test_convert_round_trips_the_gui_json_and_writes_its_prompts(tmp_path):
    path = write_gui(tmp_path, GUI_NEW)
    done = cli("convert", path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "kohya_gui_train_lora.json"
    prompts = tmp_path / "kohya_gui_train_lora_prompts.txt"
    assert f"wrote {prompts} (the sample prompts)" in done.stdout
    assert "not carried over (2):" in done.stdout  # the prompts are carried over now
    assert prompts.read_text() == GUI_NEW["sample_prompts"] + "\n"
    assert cfgmod.load_json(str(out)) == kc.load(path).config.replace(sample_prompts=str(prompts))


def test_train_with_a_toml_pair(tmp_path):
    data = make_dataset(str(tmp_path / "data"), images=3, repeats=2, size=64)
    (tmp_path / "dataset.toml").write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
        f'enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n'
        f'[[datasets.subsets]]\nimage_dir = "{data}/2_shapetok"\nnum_repeats = 2\n', encoding="utf-8")
    (tmp_path / "run.toml").write_text(
        f'pretrained_model_name_or_path = "tiny-sd1"\nnetwork_module = "networks.lora"\nnetwork_dim = 2\n'
        f'learning_rate = 1e-4\nmax_train_steps = 2\nseed = 3\noutput_dir = "{tmp_path / "out"}"\n'
        f'output_name = "from_toml"\ndataset_config = "dataset.toml"\n', encoding="utf-8")
    done = cli("train", "--config", str(tmp_path / "run.toml"), "--json", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["final_file"].endswith("from_toml.safetensors")
    assert "3 images x 2 repeats" in summary["steps_explained"]  # the dataset config's folder and repeats


def test_bad_toml_through_train_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('network_dim = 8\nnetwork_alpha = "4\n')
    done = cli("train", "--config", str(bad))
    assert done.returncode == 2 and f"{bad}, line 2" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------------------------------
# The tab's Load params


def test_load_params_in_the_tab_takes_a_kohya_file(tmp_path):
    from .webui_double.host import skip_unless_webui_gradio, webui

    skip_unless_webui_gradio()
    from lora_trainer.webui import ui

    with webui("sd1", str(tmp_path)):
        tab = ui.build_tab()
    comps = tab.lora_trainer_components
    load_btn = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "lora_trainer_load")
    on_load = next(tab.fns[i].fn for i, d in enumerate(tab.dependencies) if d["targets"] == [load_btn._id])
    *updates, status = on_load(write_gui(tmp_path, GUI_NEW), *[c.value for c in comps.values()])
    got = dict(zip(comps, updates))
    assert got["network_module"]["value"] == "lokr" and got["conv_dim"]["value"] == 16
    assert got["lr_warmup_steps"]["value"] == 0.1 and got["network_dim"]["value"] == 32
    assert got["conv_dim"]["visible"] and f"({kc.GUI})" in status
    assert "not carried over: use_tucker = True" in status
    *_, status = on_load(str(tmp_path / "missing.toml"), *[c.value for c in comps.values()])
    assert "config file not found" in status
