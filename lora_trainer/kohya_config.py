"""Configs from kohya: a kohya_ss GUI JSON, or an sd-scripts TOML with its dataset TOML, as a TrainConfig.

`load(path)` is the one loader behind `train --config`, `convert` and the tab's Load params. Our own JSON (it has
`config_version`) loads as it is. A kohya_ss GUI JSON (it has `LoRA_type`, `max_resolution`, `epoch`, ...) and an
sd-scripts `--config_file` TOML are mapped option by option, with kohya's meanings:

* the GUI's `lr_warmup` is a percent of the steps, its `epoch` the number of epochs, a text-encoder or UNet
  learning rate of 0 means that part is not trained, its `optimizer_args` is one `key=value ...` string;
* an sd-scripts TOML only holds what differs from sd-scripts' defaults (that is what `--output_config` writes), so an
  option it leaves out gets sd-scripts' default, not ours (network_alpha 1, learning_rate 2e-6, no buckets, ...);
* a dataset config's subsets become `train_data_dir` / `reg_data_dir` when their folders are kohya `N_name` folders
  of one parent folder, which is the layout Train LoRA reads; a kohya file describes all of the training data, so
  our own sources of more (a concepts list, generated class images) are cleared.

What cannot be carried over is listed, each with its value and why (`Unsupported`), and logged as one warning.
kohya's "off" values (0, "", false) count as not set, and settings that only change how kohya runs (threads,
data-loader workers, accelerate, the GUI's own state) are dropped without a word. An algorithm, optimizer or model
family Train LoRA does not have is an error: training something else instead would not be the same run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import config as cfgmod
from .config import CONFIG_VERSION, VERSION_KEY, TrainConfig
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

OURS = "Train LoRA JSON"
GUI = "kohya_ss GUI JSON"
SD_SCRIPTS = "sd-scripts TOML"

# Keys only the kohya_ss GUI writes (none of them is one of our options).
GUI_MARKERS = frozenset({"LoRA_type", "model_list", "max_resolution", "lr_warmup", "epoch", "optimizer",
                         "lora_network_weights", "additional_parameters", "LyCORIS_preset"})


@dataclass(frozen=True)
class Unsupported:
    """One kohya option that is not carried over."""

    key: str
    value: Any
    why: str

    def __str__(self) -> str:
        shown = repr(self.value)
        return f"{self.key} = {shown if len(shown) <= 80 else shown[:77] + '...'}: {self.why}"


@dataclass
class Imported:
    """A kohya file in our option names, before validation."""

    path: str
    format: str
    values: dict[str, Any] = field(default_factory=dict)
    unsupported: list[Unsupported] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # our option -> the kohya key it came from
    prompts_text: str = ""  # the GUI keeps the sample prompts themselves, not a file


@dataclass
class Loaded:
    config: TrainConfig
    format: str
    unsupported: list[Unsupported] = field(default_factory=list)
    prompts_file: str = ""  # written by convert from the GUI's sample prompts


# ----------------------------------------------------------------------------------------------------------------
# Loading


def detect_format(path: str) -> str:
    """OURS, GUI or SD_SCRIPTS: `.toml` is sd-scripts; a JSON with kohya_ss GUI keys and no config_version is GUI."""
    if path.lower().endswith(".toml"):
        return SD_SCRIPTS
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError):
        return OURS  # load_json says what is wrong with it
    except ValueError:  # sd-scripts also reads `--config_file name` without .toml
        return SD_SCRIPTS if _is_toml(text) else OURS
    if isinstance(data, dict) and VERSION_KEY not in data and GUI_MARKERS & set(data):
        return GUI
    return OURS


def _is_toml(text: str) -> bool:
    try:
        return bool(parse_toml(text, ""))
    except UserError:
        return False


def load(path: str, *, base: TrainConfig | None = None, log_unsupported: bool = True) -> Loaded:
    """Our JSON, a kohya_ss GUI JSON or an sd-scripts TOML as a validated config (over `base`, as load_json)."""
    fmt = detect_format(path)
    if fmt == OURS:
        return Loaded(_load_ours(path, base), fmt)
    imported = read_kohya(path, fmt)
    unsupported = list(imported.unsupported)
    if imported.prompts_text:
        unsupported.append(Unsupported("sample_prompts", imported.prompts_text,
                                       "the kohya_ss GUI keeps the prompts themselves: `python -m lora_trainer "
                                       "convert` writes them to a file, or save them to a text file (one per line) "
                                       "and set sample_prompts to it"))
    loaded = Loaded(to_config(imported, base), fmt, unsupported)
    if log_unsupported:
        log_not_carried_over(path, loaded)
    return loaded


def _load_ours(path: str, base: TrainConfig | None) -> TrainConfig:
    try:
        return cfgmod.load_json(path, base=base)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text file ({e}); save it as UTF-8") from None


def log_not_carried_over(path: str, loaded: Loaded) -> None:
    if loaded.unsupported:
        lines = "\n".join(f"  - {u}" for u in loaded.unsupported)
        log.warning("%s (%s): %d option(s) not carried over:\n%s", path, loaded.format, len(loaded.unsupported),
                    lines)


def read_kohya(path: str, fmt: str | None = None) -> Imported:
    """Map a kohya file's options to ours (not validated yet)."""
    fmt = fmt or detect_format(path)
    try:
        if fmt == GUI:
            return _from_gui(path, _read_json(path))
        if fmt == SD_SCRIPTS:
            return _from_sd_scripts(path, read_toml(path))
    except ConfigError as e:
        raise ConfigError([f"{os.path.basename(path)}: {p}" for p in e.problems]) from None
    raise UserError(f"{path} is a {OURS} already (it has {VERSION_KEY}); load it with --config as it is")


def to_config(imported: Imported, base: TrainConfig | None = None) -> TrainConfig:
    try:
        return cfgmod.from_dict({VERSION_KEY: CONFIG_VERSION, **imported.values}, base=base)
    except ConfigError as e:
        name = os.path.basename(imported.path)
        raise ConfigError([f"{name}: {_with_origin(p, imported.origin)}" for p in e.problems]) from None


def _with_origin(problem: str, origin: Mapping[str, str]) -> str:
    m = re.match(r"(\w+):", problem)
    source = origin.get(m.group(1)) if m else None
    return f"{problem} (from {source!r})" if source and source != m.group(1) else problem


def convert(path: str, out: str, *, force: bool = False) -> Loaded:
    """Write our JSON from a kohya file (and the GUI's sample prompts beside it); refuses to overwrite unless force."""
    from .fileio import atomic_write_text

    if os.path.abspath(out) == os.path.abspath(path):
        raise UserError(f"convert: the output {out} is the file being converted; choose another name with -o")
    _refuse_existing(out, force)
    fmt = detect_format(path)
    if fmt == OURS:
        loaded = Loaded(_load_ours(path, None), fmt)
    else:
        imported = read_kohya(path, fmt)
        loaded = Loaded(to_config(imported), fmt, list(imported.unsupported))
        if imported.prompts_text:
            prompts = os.path.abspath(os.path.splitext(out)[0] + "_prompts.txt")
            _refuse_existing(prompts, force)
            atomic_write_text(prompts, imported.prompts_text.rstrip("\n") + "\n")
            loaded.config = loaded.config.replace(sample_prompts=prompts)
            loaded.prompts_file = prompts
    cfgmod.save_json(loaded.config, out)
    return loaded


def default_output(path: str) -> str:
    return os.path.splitext(path)[0] + "_train_lora.json"


def _refuse_existing(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise UserError(f"convert: {path} exists; pass --force to replace it, or -o to write somewhere else")


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8-sig") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# TOML: tomllib on Python 3.11+, else tomli, else toml (which lycoris-lora, and so the WebUI, installs)

TOML_PARSERS = ("tomllib", "tomli", "toml")


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text file ({e}); save it as UTF-8") from None
    return parse_toml(text, path)


def parse_toml(text: str, path: str, parser: str | None = None) -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a UserError naming the file, the line and what it reads."""
    module = _toml_module(parser)
    try:
        return module.loads(text)
    except (ValueError, IndexError) as e:  # TOMLDecodeError / TomlDecodeError are ValueErrors; toml 0.10 also
        raise UserError(_toml_error(path, text, e)) from None  # raises IndexError on some broken tables


def _toml_module(parser: str | None) -> Any:
    for name in [parser] if parser else TOML_PARSERS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError("reading a TOML config needs Python 3.11+ or the 'tomli' (or 'toml') package: pip install tomli")


def _toml_error(path: str, text: str, e: Exception) -> str:
    line, col, msg = getattr(e, "lineno", None), getattr(e, "colno", None), getattr(e, "msg", None) or str(e)
    m = re.search(r"\s*\((?:at )?line (\d+),? column (\d+)[^)]*\)", msg)
    if m:
        line, col, msg = int(m.group(1)), int(m.group(2)), msg[:m.start()]
    where, quoted = "", ""
    if line:
        where = f", line {line}" + (f", column {col}" if col else "")
        lines = text.splitlines()
        if 0 < line <= len(lines):
            quoted = f" (the line reads {lines[line - 1].strip()!r})"
    return f"{path}{where}: not valid TOML: {msg.strip()}{quoted}; fix it there"


# ----------------------------------------------------------------------------------------------------------------
# The mapping state


@dataclass
class OptionMap:
    """Our values and the unsupported options, collected while one kohya file is read."""

    raw: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    unsupported: list[Unsupported] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    prompts_text: str = ""

    def take(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def set(self, name: str, value: Any, source: str) -> None:
        self.values[name] = value
        self.origin[name] = source

    def skip(self, key: str, value: Any, why: str) -> None:
        self.unsupported.append(Unsupported(key, value, why))

    def rest(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.raw.items() if k not in self.used]

    def imported(self, path: str, fmt: str) -> Imported:
        return Imported(path, fmt, self.values, self.unsupported, self.origin, self.prompts_text)


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def number(value: Any) -> float | None:
    """kohya's numbers arrive as numbers or strings ("5e-05", "" = unset); None when blank or not a number."""
    if isinstance(value, bool) or blank(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_zero(value: Any) -> bool:
    return number(value) == 0


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().strip('"').lower() in ("true", "1", "yes", "on")
    return bool(value)


def neutral(key: str, value: Any) -> bool:
    """kohya's values that mean "not used": they need no counterpart here."""
    if blank(value) or value is False or value == [] or value == {} or _is_zero(value):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "none"):
        return True
    return value in NEUTRAL.get(key, ())


ZERO_IS_OFF = frozenset({"min_snr_gamma", "clip_skip", "max_train_epochs"})
KEEP_WHEN_BLANK = frozenset({"output_name"})  # kohya names a nameless run "last"; the current name is kept


def put(m: OptionMap, name: str, value: Any, source: str | None = None) -> None:
    """A value for our option `name`: "" and None mean unset, 0 means off for counts like save_every_n_epochs."""
    spec = cfgmod.field_spec(name)
    source = source or name
    if blank(value):
        if spec.optional:
            m.set(name, None, source)
        elif spec.base_type is str and name not in KEEP_WHEN_BLANK:
            m.set(name, "", source)
        return
    if spec.optional and _is_zero(value) and (name in ZERO_IS_OFF or (spec.min or 0) >= 1):
        m.set(name, None, source)
        return
    m.set(name, value, source)


def _generic(m: OptionMap, extra_ignored: Callable[[str], bool] = lambda k: False) -> None:
    """Every key no handler took: same-named options, renamed ones, ignored ones, and the rest is unsupported."""
    for key, value in m.rest():
        m.used.add(key)
        if key in RENAMED:
            put(m, RENAMED[key], value, key)
        elif key in SAME:
            put(m, key, value)
        elif key in IGNORED or extra_ignored(key) or neutral(key, value):
            continue
        else:
            m.skip(key, value, REASONS.get(key, "not an option Train LoRA has"))


# Same name and meaning in kohya and here.
SAME = frozenset({
    "pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "output_dir", "output_name",
    "training_comment", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_dropout_rate",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "enable_bucket", "min_bucket_reso",
    "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "flip_aug", "color_aug", "random_crop",
    "alpha_mask", "prior_loss_weight", "network_dim", "network_alpha", "network_weights", "network_train_unet_only",
    "network_train_text_encoder_only", "lr_scheduler_power", "max_grad_norm", "train_batch_size",
    "gradient_accumulation_steps", "mixed_precision", "gradient_checkpointing", "cache_latents",
    "cache_latents_to_disk", "cache_text_encoder_outputs", "save_precision", "save_model_as", "save_state",
    "no_metadata", "sample_at_first", "max_token_length", "noise_offset", "torch_compile", "save_every_n_epochs",
    "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps", "sample_every_n_epochs",
    "sample_every_n_steps", "min_snr_gamma", "clip_skip", "learning_rate", "unet_lr", "max_train_epochs",
    "max_train_steps", "lr_warmup_steps", "lr_scheduler_num_cycles", "seed",
})
RENAMED = {"logging_dir": "log_dir", "lora_network_weights": "network_weights",
           "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs"}

# How kohya runs, not what it trains: nothing to carry over. (Tokens and API keys are never shown.)
IGNORED = frozenset({
    "model_list", "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
    "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
    "extra_accelerate_launch_args", "max_data_loader_n_workers", "persistent_data_loader_workers", "vae_batch_size",
    "mem_eff_attn", "highvram", "lowvram", "lowram", "skip_cache_check", "cache_info", "debug_dataset",
    "console_log_level", "console_log_file", "console_log_simple", "log_prefix", "log_tracker_name",
    "log_tracker_config", "log_config", "wandb_run_name", "wandb_api_key", "huggingface_token", "config_file",
    "output_config", "save_as_bool", "file_path", "no_half_vae", "sdxl_no_half_vae", "disable_mmap_load_safetensors",
    "tokenizer_cache_dir", "fused_backward_pass", "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph",
    "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
    "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
    "huber_c", "huber_scale", "huber_schedule", "bypass_mode", "train_on_input", "constrain", "rescaled",
    "stop_text_encoder_training", "stop_text_encoder_training_pct", "no_token_padding", "dataset_repeats",
    "mem_eff_save", "cpu_offload_checkpointing", "blocks_to_swap", "ggpo_sigma", "ggpo_beta", "t5xxl_lr",
})
# Options of the GUI's other model families (Flux, SD3, HunyuanImage, Anima, Lumina): saved in every GUI file.
_FAMILY_PREFIXES = ("flux1_", "sd3_", "hunyuan_", "anima_", "lumina_")
_FAMILY_KEYS = frozenset({
    "model_type", "ae", "clip_l", "clip_g", "t5xxl", "discrete_flow_shift", "model_prediction_type",
    "timestep_sampling", "split_mode", "train_blocks", "t5xxl_max_token_length", "enable_all_linear",
    "guidance_scale", "apply_t5_attn_mask", "split_qkv", "train_t5xxl", "single_blocks_to_swap",
    "double_blocks_to_swap", "show_timesteps", "show_timesteps_resolution", "img_attn_dim", "img_mlp_dim",
    "img_mod_dim", "single_dim", "txt_attn_dim", "txt_mlp_dim", "txt_mod_dim", "single_mod_dim", "in_dims",
    "train_double_block_indices", "train_single_block_indices", "fp8_base_unet", "clip_g_dropout_rate", "logit_mean",
    "logit_std", "mode_scale", "pos_emb_random_crop_rate", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype",
    "weighting_scheme",
})

NEUTRAL: dict[str, tuple] = {
    "LyCORIS_preset": ("full",), "loss_type": ("l2",), "noise_offset_type": ("Original",), "max_timestep": (1000,),
    "caption_separator": (",",), "token_warmup_min": (1,), "network_multiplier": (1, 1.0),
    "save_model_as": ("safetensors",), "multires_noise_discount": (0.3,), "lr_scheduler_type": ("",),
}

_NO_SCHEDULE = "Train LoRA's schedules take no extra settings"
_NO_BLOCKS = "per-block ranks and learning rates are not supported"
_NO_HF = "uploading to Hugging Face is not supported"
_NO_META = "custom metadata is not supported (training_comment is stored)"
REASONS = {
    "full_fp16": "Train LoRA keeps the network in float32 and trains with mixed_precision",
    "full_bf16": "Train LoRA keeps the network in float32 and trains with mixed_precision",
    "fp8_base": "8-bit base-model weights are not supported",
    "scale_weight_norms": "max-norm regularisation is not supported",
    "min_timestep": "training on part of the timestep range is not supported",
    "max_timestep": "training on part of the timestep range is not supported",
    "loss_type": "only the L2 (mean squared error) loss is supported",
    "weighted_captions": "caption weighting like (word:1.2) is not supported",
    "debiased_estimation_loss": "debiased estimation loss is not supported",
    "scale_v_pred_loss_like_noise_pred": "not supported",
    "v_pred_like_loss": "not supported",
    "zero_terminal_snr": "zero-terminal-SNR noise schedules are not supported",
    "ip_noise_gamma": "input-perturbation noise is not supported",
    "ip_noise_gamma_random_strength": "input-perturbation noise is not supported",
    "adaptive_noise_scale": "adaptive noise offset is not supported; noise_offset is used alone",
    "noise_offset_random_strength": "a random noise-offset strength is not supported; noise_offset is used as it is",
    "multires_noise_iterations": "multi-resolution (pyramid) noise is not supported",
    "multires_noise_discount": "multi-resolution (pyramid) noise is not supported",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "caption_prefix": "caption prefixes are not supported; add the text to the caption files",
    "caption_suffix": "caption suffixes are not supported; add the text to the caption files",
    "enable_wildcard": "wildcard captions are not supported",
    "secondary_separator": "a secondary tag separator is not supported",
    "caption_separator": "tags are always separated by ','",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "resize_interpolation": "choosing the resize filter is not supported",
    "lr_scheduler_type": "a scheduler class in place of lr_scheduler is not supported; lr_scheduler is used",
    "lr_scheduler_args": _NO_SCHEDULE, "lr_decay_steps": _NO_SCHEDULE,
    "lr_scheduler_timescale": _NO_SCHEDULE, "lr_scheduler_min_lr_ratio": _NO_SCHEDULE,
    "save_last_n_steps_state": "a training state is kept beside each kept save (save_last_n_steps)",
    "save_last_n_epochs_state": "a training state is kept beside each kept save (save_last_n_epochs)",
    "save_state_on_train_end": "set save_state to keep a state with every save",
    "save_n_epoch_ratio": "use save_every_n_epochs",
    "resume": "a kohya (accelerate) state folder cannot be resumed here; resume from a state Train LoRA saved",
    "dim_from_weights": "set network_dim (and conv_dim) to the rank of the network_weights file",
    "huggingface_repo_id": _NO_HF, "huggingface_repo_type": _NO_HF, "huggingface_path_in_repo": _NO_HF,
    "huggingface_repo_visibility": _NO_HF, "save_state_to_huggingface": _NO_HF, "resume_from_huggingface": _NO_HF,
    "async_upload": _NO_HF,
    "block_dims": _NO_BLOCKS, "block_alphas": _NO_BLOCKS, "conv_block_dims": _NO_BLOCKS,
    "conv_block_alphas": _NO_BLOCKS, "conv_dims": _NO_BLOCKS, "conv_alphas": _NO_BLOCKS, "down_lr_weight": _NO_BLOCKS,
    "mid_lr_weight": _NO_BLOCKS, "up_lr_weight": _NO_BLOCKS, "block_lr_zero_threshold": _NO_BLOCKS,
    "loraplus_lr_ratio": "LoRA+ is not supported", "loraplus_unet_lr_ratio": "LoRA+ is not supported",
    "loraplus_text_encoder_lr_ratio": "LoRA+ is not supported",
    "train_lora_ggpo": "GGPO is not supported",
    "LyCORIS_preset": "only LyCORIS' 'full' preset (every layer the algorithm can train) is supported",
    "preset": "only LyCORIS' 'full' preset (every layer the algorithm can train) is supported",
    "use_cp": "Tucker (CP) decomposition of conv layers is not supported",
    "use_tucker": "Tucker (CP) decomposition of conv layers is not supported",
    "use_scalar": "the extra trained scalar is not supported", "dora_wd": "DoRA is not supported",
    "rank_dropout_scale": "rank-dropout rescaling is not supported",
    "train_norm": "training the normalisation layers is not supported",
    "decompose_both": "decomposing both LoKr factors is not supported",
    "train_inpainting": "inpainting models are not supported",
    "masked_loss": "masks from conditioning images are not supported; Train LoRA masks the loss with the images' "
                   "transparency (alpha_mask)",
    "in_json": "fine-tuning metadata (in_json) is not supported; put caption files beside the images in 'N_name' "
               "folders",
    "dataset_class": "custom dataset classes are not supported",
    "conditioning_data_dir": "conditioning images are not supported",
    "base_weights": "merging networks into the model before training is not supported",
    "base_weights_multiplier": "merging networks into the model before training is not supported",
    "validation_split": "validation sets are not supported", "validation_seed": "validation sets are not supported",
    "validate_every_n_steps": "validation sets are not supported",
    "validate_every_n_epochs": "validation sets are not supported",
    "max_validation_steps": "validation sets are not supported",
    "initial_epoch": "starting at a later epoch is not supported; use resume",
    "initial_step": "starting at a later step is not supported; use resume",
    "skip_until_initial_step": "starting at a later step is not supported; use resume",
    "network_multiplier": "training at a network multiplier other than 1 is not supported",
    "metadata_title": _NO_META, "metadata_author": _NO_META, "metadata_description": _NO_META,
    "metadata_license": _NO_META, "metadata_tags": _NO_META, "metadata_usage_hint": _NO_META,
    "metadata_thumbnail": _NO_META, "metadata_merged_from": _NO_META, "metadata_trigger_phrase": _NO_META,
    "metadata_preprocessor": _NO_META, "metadata_is_negative_embedding": _NO_META,
}


# ----------------------------------------------------------------------------------------------------------------
# Network algorithm


_GUI_ALGORITHMS = {"Standard": "lora", "Kohya LoCon": "locon", "LoCon": "locon", "LyCORIS/LoCon": "locon",
                   "LyCORIS/LoHa": "loha", "Kohya LoHa": "loha", "LyCORIS/LoKr": "lokr", "Kohya LoKr": "lokr",
                   "LyCORIS/iA3": "ia3", "LyCORIS/DyLoRA": "dylora", "Kohya DyLoRA": "dylora"}
_LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3",
                  "dylora": "dylora"}
_SDS_MODULES = {"networks.lora": "Kohya LoCon", "networks.dylora": "Kohya DyLoRA", "networks.loha": "Kohya LoHa",
                "networks.lokr": "Kohya LoKr"}
_LYCORIS_EXTRAS = ("use_cp", "use_tucker", "use_scalar", "dora_wd", "rank_dropout_scale", "train_norm",
                   "decompose_both")
_NO_CONV = "{kind} trained no 3x3 conv layers (conv_dim {dim}); Train LoRA's {algo} trains them too, at network_dim"


@dataclass
class _Network:
    """What a LoRA_type or a network_module + network_args selects."""

    algo: str
    conv_dim: Any = None
    conv_alpha: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # unit / factor / dropouts / the rest of network_args


def _gui_network(m: OptionMap) -> None:
    lora_type = m.take("LoRA_type")
    if lora_type is None:
        m.skip("LoRA_type", None, "missing: not a config of the GUI's LoRA tab; trained as a Standard LoRA")
        lora_type = "Standard"
    if lora_type not in _GUI_ALGORITHMS:
        raise ConfigError([f"LoRA_type: {lora_type!r} is not supported; Train LoRA trains "
                           f"{', '.join(sorted(_GUI_ALGORITHMS))}: choose one of those in kohya_ss"])
    net = _Network(_GUI_ALGORITHMS[lora_type], m.take("conv_dim"), m.take("conv_alpha"),
                   {"unit": m.take("unit"), "factor": m.take("factor")})
    passed: tuple[str, ...] = ()  # what the GUI passes on for this type; it drops the rest
    if lora_type.startswith("LyCORIS/") or lora_type == "LoCon":
        passed = (*_LYCORIS_EXTRAS, "LyCORIS_preset")
    elif lora_type in ("Kohya LoHa", "Kohya LoKr"):
        passed = ("use_tucker",)
    for key in passed:
        value = m.take(key)
        if not neutral(key, value):
            m.skip(key, value, REASONS[key])
    m.used.update((*_LYCORIS_EXTRAS, "LyCORIS_preset"))
    _apply_network(m, net, lora_type, "LoRA_type")
    _dropouts(m, net.algo, {n: (n, m.take(n)) for n in ("network_dropout", "rank_dropout", "module_dropout")})


def _apply_network(m: OptionMap, net: _Network, kind: str, source: str) -> None:
    """Set network_module, the conv rank and alpha and the algorithm's own setting from kohya's choice."""
    algo, dim = net.algo, number(net.conv_dim)
    lycoris = kind.startswith("LyCORIS") or kind == "LoCon"
    if algo == "locon" and not lycoris and not dim:
        algo = "lora"  # kohya's LoRA with conv_dim 0 trains no conv layers: a plain LoRA
    m.set("network_module", algo, source)
    conv_dim, conv_alpha = None, None
    if algo in cfgmod.CONV_ALGORITHMS:
        if dim:
            conv_dim = net.conv_dim
            conv_alpha = net.conv_alpha if number(net.conv_alpha) else (None if lycoris else 1.0)
        elif not lycoris and algo != "locon":  # kohya's own LoHa/LoKr/DyLoRA without conv_dim skip the convs
            m.skip("conv_dim", net.conv_dim, _NO_CONV.format(kind=kind, dim=net.conv_dim or 0, algo=algo))
    m.set("conv_dim", conv_dim, "conv_dim")
    m.set("conv_alpha", conv_alpha, "conv_alpha")
    if algo == "dylora":
        m.set("dylora_unit", net.extra.get("unit") or (1 if kind == "Kohya DyLoRA" else 4), "unit")
    if algo == "lokr":
        factor = net.extra.get("factor")
        m.set("lokr_factor", -1 if blank(factor) else factor, "factor")


def _dropouts(m: OptionMap, algo: str, given: Mapping[str, tuple[str, Any]]) -> None:
    for name, (key, value) in given.items():
        if neutral(key, value):
            m.set(name, 0.0, key)
        elif cfgmod.applies(TrainConfig(network_module=algo), name):
            m.set(name, value, key)
        else:
            m.skip(key, value, f"{name} has no effect on {algo} here")


def _sds_network(m: OptionMap) -> None:
    module = str(m.take("network_module", "networks.lora")).strip()
    args = _network_args(m, m.take("network_args"))
    conv = {"conv_dim": args.pop("conv_dim", None), "conv_alpha": args.pop("conv_alpha", None)}
    if module == "lycoris.kohya":
        algo_name = str(args.pop("algo", "lora")).strip().strip('"').lower()
        if algo_name not in _LYCORIS_ALGOS:
            raise ConfigError([f"network_args: algo={algo_name} is not supported; Train LoRA trains "
                               f"{', '.join(sorted(_LYCORIS_ALGOS))} from lycoris.kohya"])
        net = _Network(_LYCORIS_ALGOS[algo_name], extra={"unit": args.pop("block_size", None),
                                                         "factor": args.pop("factor", None)}, **conv)
        kind = "LyCORIS"
        preset = args.pop("preset", "full")
        if not neutral("preset", preset):
            m.skip("network_args", f"preset={preset}", REASONS["preset"])
    elif module in _SDS_MODULES:
        kind = _SDS_MODULES[module]
        net = _Network(_GUI_ALGORITHMS[kind], extra={"unit": args.pop("unit", None),
                                                     "factor": args.pop("factor", None)}, **conv)
    else:
        raise ConfigError([f"network_module: {module!r} is not supported; use networks.lora, networks.dylora, "
                           f"networks.loha, networks.lokr or lycoris.kohya"])
    _apply_network(m, net, kind, "network_module")
    network_dropout = m.take("network_dropout")
    dropout = ("network_args", args.pop("dropout")) if "dropout" in args else ("network_dropout", network_dropout)
    _dropouts(m, net.algo, {"network_dropout": dropout,
                            "rank_dropout": ("network_args", args.pop("rank_dropout", None)),
                            "module_dropout": ("network_args", args.pop("module_dropout", None))})
    for key, value in args.items():
        if key not in IGNORED and not neutral(key, value):
            m.skip("network_args", f"{key}={value}", REASONS.get(key, "not a network argument Train LoRA has"))


def _network_args(m: OptionMap, raw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in _arg_list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            m.skip("network_args", item, "not key=value")
            continue
        out[key.strip()] = value.strip().strip('"')
    return out


def _arg_list(raw: Any) -> list[str]:
    """kohya's `key=value` arguments: a TOML list, or the GUI's one string (quotes removed, as the GUI does)."""
    if blank(raw):
        return []
    if isinstance(raw, str):
        return raw.replace('"', "").split()
    return [str(x) for x in raw]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, attention, resolution, samples


_OPTIMIZERS = {**{name.lower(): name for name in cfgmod.OPTIMIZERS},
               "pagedadamw8bit": "AdamW8bit", "pagedadamw": "AdamW", "pagedadamw32bit": "AdamW",
               "pagedlion8bit": "Lion8bit", "sgdnesterov8bit": "SGDNesterov"}


def _optimizer(m: OptionMap, key: str, name: Any, raw_args: Any) -> None:
    wanted = str(name).strip() if not blank(name) else "AdamW"
    opt = _OPTIMIZERS.get(wanted.rsplit(".", 1)[-1].lower())
    if opt is None:
        raise ConfigError([f"{key}: {wanted!r} is not supported; Train LoRA has {', '.join(cfgmod.OPTIMIZERS)}: "
                           f"choose one of those in kohya"])
    m.set("optimizer_type", opt, key)
    args = {}
    for item in _arg_list(raw_args):
        k, sep, v = item.partition("=")
        if sep and k.strip():
            args[k.strip()] = v.strip()
        else:
            m.skip("optimizer_args", item, "not key=value")
    if opt == "Adafactor":
        _adafactor(m, args)
    accepted = _optimizer_parameters(opt) if args else None
    kept = []
    for k, v in args.items():
        if accepted is not None and k not in accepted:
            m.skip("optimizer_args", f"{k}={v}", f"{opt} takes {', '.join(sorted(accepted))}")
        else:
            kept.append(f"{k}={v}")
    m.set("optimizer_args", kept, "optimizer_args")


def _adafactor(m: OptionMap, args: dict[str, str]) -> None:
    """Our Adafactor is kohya's with relative_step=False and scale_parameter=False (transformers defaults: True)."""
    relative = truthy(args.pop("relative_step", "True")) or truthy(args.pop("warmup_init", "False"))
    if relative:
        raise ConfigError(["optimizer_args: Adafactor with relative_step=True (kohya's default: the optimizer sets "
                           "its own learning rate) is not supported; add 'relative_step=False scale_parameter=False "
                           "warmup_init=False' to optimizer_args and set a learning rate (e.g. 1e-4)"])
    if truthy(args.pop("scale_parameter", "True")):
        m.skip("optimizer_args", "scale_parameter=True", "Train LoRA's Adafactor does not scale steps by the "
                                                         "parameters' size (scale_parameter=False)")


def _optimizer_parameters(opt: str) -> set[str] | None:
    """The keyword arguments an optimizer class takes; None when any are (or its package is missing)."""
    from .optim import OPTIMIZERS

    try:
        params = inspect.signature(OPTIMIZERS[opt].factory().__init__).parameters
    except (UserError, TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("self", "params")}


def _scheduler(m: OptionMap, cycles_default: Any = None) -> None:
    name = m.take("lr_scheduler")
    if not blank(name):
        if name in cfgmod.SCHEDULERS:
            m.set("lr_scheduler", name, "lr_scheduler")
        else:
            m.set("lr_scheduler", "constant", "lr_scheduler")
            m.skip("lr_scheduler", name, f"not one of Train LoRA's schedules ({', '.join(cfgmod.SCHEDULERS)}); "
                                         f"constant is used")
    cycles = m.take("lr_scheduler_num_cycles")
    put(m, "lr_scheduler_num_cycles", cycles_default if blank(cycles) else cycles, "lr_scheduler_num_cycles")


def _attention(m: OptionMap, xformers: Any, source: str) -> None:
    """kohya's xformers (true/false, or "xformers"/"sdpa"/"none"); anything but xformers is PyTorch SDPA here,
    which computes the same attention as kohya's sdpa and its plain one."""
    use = xformers is True or str(xformers).strip().lower() in ("xformers", "true")
    m.set("xformers", use, source)
    m.set("sdpa", not use, source)


def _resolution(m: OptionMap, key: str) -> None:
    value = m.take(key)
    if not blank(value):
        m.set("resolution", resolution_text(value), key)


def resolution_text(value: Any) -> str:
    """kohya's 512, "512,512", "768,512" or [768, 512] as our resolution text ('512' or 'width,height')."""
    try:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            w, h = int(value[0]), int(value[1])
        else:
            w, h = cfgmod.parse_resolution(str(value))
    except (TypeError, ValueError):
        return str(value)  # validation names it
    return str(w) if w == h else f"{w},{h}"


_SAMPLERS = {**{s: s for s in cfgmod.SAMPLERS}, "k_euler_a": "euler_a", "k_euler": "euler"}


def _samples(m: OptionMap, prompts_are_text: bool) -> None:
    sampler = m.take("sample_sampler")
    if not blank(sampler):
        if str(sampler) in _SAMPLERS:
            m.set("sample_sampler", _SAMPLERS[str(sampler)], "sample_sampler")
        else:
            fallback = TrainConfig().sample_sampler
            m.set("sample_sampler", fallback, "sample_sampler")
            m.skip("sample_sampler", sampler, f"not one of Train LoRA's samplers ({', '.join(cfgmod.SAMPLERS)}); "
                                              f"{fallback} is used")
    prompts = m.take("sample_prompts")
    if blank(prompts):
        m.set("sample_prompts", "", "sample_prompts")
    elif prompts_are_text and not (len(str(prompts).splitlines()) == 1 and os.path.isfile(str(prompts).strip())):
        m.set("sample_prompts", "", "sample_prompts")
        m.prompts_text = str(prompts)
    elif str(prompts).lower().endswith((".toml", ".json")):
        m.skip("sample_prompts", prompts, "prompt files in TOML or JSON are not supported; use a text file, one "
                                          "prompt per line with --n --w --h --d --l --s")
    else:
        m.set("sample_prompts", str(prompts).strip(), "sample_prompts")


def _log_with(m: OptionMap) -> None:
    value = m.take("log_with")
    if blank(value):
        m.set("log_with", "", "log_with")
    elif value in ("tensorboard", "all"):
        m.set("log_with", "tensorboard", "log_with")
        if value == "all":
            m.skip("log_with", value, "Weights & Biases is not supported; TensorBoard is")
    else:
        m.set("log_with", "", "log_with")
        m.skip("log_with", value, "only TensorBoard is supported")


def _caption_extension(m: OptionMap, *keys: str) -> None:
    for key in keys:
        value = m.take(key)
        if not blank(value):
            m.set("caption_extension", value, key)


def _buckets(m: OptionMap) -> None:
    """Bucket sides here are multiples of 8 (a latent pixel); min/max_bucket_reso are rounded to bucket_reso_steps
    (min down, max up) as sd-scripts does."""
    steps = number(m.values.get("bucket_reso_steps"))
    if steps is None:
        return
    if steps < 8 or steps % 8:
        fixed = max(8, int(steps) // 8 * 8)
        if m.values.get("enable_bucket", True) is not False:
            m.skip("bucket_reso_steps", m.values["bucket_reso_steps"], f"bucket sides are multiples of 8 here (one "
                                                                       f"latent pixel): {fixed} is used")
        m.set("bucket_reso_steps", fixed, m.origin.get("bucket_reso_steps", "bucket_reso_steps"))
        steps = fixed
    for name, up in (("min_bucket_reso", False), ("max_bucket_reso", True)):
        reso = number(m.values.get(name))
        if reso is not None and reso % steps:
            m.set(name, int(reso - reso % steps + (steps if up else 0)), m.origin[name])


def _resume(m: OptionMap) -> None:
    """A kohya (accelerate) state cannot be resumed here: resume is cleared, and listed when it was set."""
    value = m.take("resume")
    m.set("resume", "", "resume")
    if not blank(value):
        m.skip("resume", value, REASONS["resume"])


def _masked_loss(m: OptionMap, value: Any) -> None:
    """sd-scripts' masked_loss with alpha_mask is our alpha_mask; on its own it wants conditioning-image masks."""
    if truthy(value) and not m.values.get("alpha_mask"):
        m.skip("masked_loss", value, REASONS["masked_loss"])


# ----------------------------------------------------------------------------------------------------------------
# kohya_ss GUI JSON


_GUI_FAMILIES = ("flux1_checkbox", "sd3_checkbox", "hunyuan_image_checkbox", "anima_checkbox", "lumina_checkbox")


def _from_gui(path: str, data: dict[str, Any]) -> Imported:
    m = OptionMap(dict(data))
    _gui_family(m)
    _gui_network(m)
    _gui_duration(m)
    _gui_warmup(m)
    _gui_rates(m)
    _optimizer(m, "optimizer", m.take("optimizer"), m.take("optimizer_args"))
    _scheduler(m, cycles_default=_gui_epochs(m) or 1)
    _attention(m, m.take("xformers"), "xformers")
    _resolution(m, "max_resolution")
    _gui_noise(m)
    _samples(m, prompts_are_text=True)
    _log_with(m)
    _caption_extension(m, "caption_extension")
    seed = m.take("seed")
    put(m, "seed", None if _is_zero(seed) else seed)  # the GUI's 0 is a random seed
    _resume(m)
    extra, dataset, masked = m.take("additional_parameters"), m.take("dataset_config"), m.take("masked_loss")
    _generic(m, _is_family_key)
    if not blank(dataset):
        from .kohya_datasets import import_datasets

        import_datasets(m, path, str(dataset), _gui_fallbacks(data))
    _masked_loss(m, masked)
    if not blank(extra):
        _additional_parameters(m, path, str(extra))
    _defaults(m, OWN_DATA, "(not in kohya_ss)")
    _buckets(m)
    return m.imported(path, GUI)


def _is_family_key(key: str) -> bool:
    return key.startswith(_FAMILY_PREFIXES) or key in _FAMILY_KEYS


def _gui_family(m: OptionMap) -> None:
    for key in _GUI_FAMILIES:
        if truthy(m.take(key)):
            raise ConfigError([f"{key}: true: Train LoRA trains SD1.x, SD2.x and SDXL only"])
    family = "sdxl" if truthy(m.take("sdxl")) else "sd2" if truthy(m.take("v2")) else "auto"
    m.set("model_family", family, "sdxl" if family == "sdxl" else "v2")
    m.set("v_parameterization", True if truthy(m.take("v_parameterization")) else None, "v_parameterization")


def _gui_epochs(m: OptionMap) -> int:
    epochs = number(m.raw.get("epoch"))
    return int(epochs) if epochs else 0


def _gui_duration(m: OptionMap) -> None:
    """max_train_epochs, else max_train_steps, else the GUI's epoch count (it turns it into steps itself)."""
    epochs, steps = number(m.take("max_train_epochs")), number(m.take("max_train_steps"))
    m.used.add("epoch")
    if epochs:
        m.set("max_train_epochs", m.raw["max_train_epochs"], "max_train_epochs")
    elif steps:
        m.set("max_train_epochs", None, "max_train_steps")
        m.set("max_train_steps", m.raw["max_train_steps"], "max_train_steps")
    elif _gui_epochs(m) and blank(m.raw.get("dataset_config")):
        m.set("max_train_epochs", m.raw["epoch"], "epoch")
    else:  # with a dataset config and no step count, the GUI leaves sd-scripts at its 1600 steps
        m.set("max_train_epochs", None, "epoch")
        m.set("max_train_steps", 1600, "max_train_steps")


def _gui_warmup(m: OptionMap) -> None:
    """lr_warmup is a percent of the total steps; lr_warmup_steps (newer GUIs) a step count that wins over it."""
    percent, steps = number(m.take("lr_warmup")) or 0.0, number(m.take("lr_warmup_steps")) or 0.0
    if steps > 0:
        m.set("lr_warmup_steps", int(steps), "lr_warmup_steps")
    elif percent >= 100:
        m.set("lr_warmup_steps", 0.0, "lr_warmup")
        m.skip("lr_warmup", m.raw["lr_warmup"], "a warm-up over the whole run: set lr_warmup_steps to a step count")
    else:
        m.set("lr_warmup_steps", percent / 100, "lr_warmup")


def _gui_rates(m: OptionMap) -> None:
    """A text-encoder or UNet rate of 0 means that part is not trained; both 0: both use learning_rate."""
    put(m, "learning_rate", m.take("learning_rate"))
    te, unet = m.take("text_encoder_lr"), m.take("unet_lr")
    te_rate, unet_rate = number(te), number(unet)
    m.set("text_encoder_lr", te if te_rate or te_rate is None and not blank(te) else None, "text_encoder_lr")
    m.set("unet_lr", unet if unet_rate or unet_rate is None and not blank(unet) else None, "unet_lr")
    m.set("network_train_unet_only", not te_rate and bool(unet_rate), "text_encoder_lr")
    m.set("network_train_text_encoder_only", bool(te_rate) and not unet_rate, "unet_lr")


def _gui_noise(m: OptionMap) -> None:
    kind = m.take("noise_offset_type", "Original")
    offset = m.take("noise_offset")
    if kind == "Multires":
        m.used.update(("adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_discount"))
        if not neutral("multires_noise_iterations", m.take("multires_noise_iterations")):
            m.skip("noise_offset_type", kind, REASONS["multires_noise_iterations"] + "; trained without a noise "
                                              "offset")
        m.set("noise_offset", 0.0, "noise_offset_type")
        return
    m.used.update(("multires_noise_iterations", "multires_noise_discount"))
    if not neutral("noise_offset_type", kind):
        m.skip("noise_offset_type", kind, "only the original noise offset is supported")
    if blank(offset):
        m.set("noise_offset", 0.0, "noise_offset")
    else:
        put(m, "noise_offset", offset)


def _gui_fallbacks(data: Mapping[str, Any]) -> dict[str, Any]:
    """The GUI's values under sd-scripts' names: a dataset config falls back on them as on sd-scripts' options."""
    out = dict(data)
    out["resolution"] = data.get("max_resolution")
    return out


def _additional_parameters(m: OptionMap, path: str, text: str) -> None:
    """The GUI's free-form sd-scripts flags: mapped as an sd-scripts config that overrides the GUI's values."""
    try:
        flags = _parse_flags(shlex.split(text))
    except ValueError as e:
        m.skip("additional_parameters", text, f"cannot be read ({e})")
        return
    sub = OptionMap(flags)
    _sds_options(sub, path, only_given=True)
    m.values.update(sub.values)
    m.origin.update({k: f"additional_parameters {v}" for k, v in sub.origin.items()})
    m.unsupported.extend(Unsupported(f"additional_parameters --{u.key}", u.value, u.why) for u in sub.unsupported)


def _parse_flags(tokens: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = None
    for token in tokens:
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            out[key] = value if sep else True
            if sep:
                key = None
        elif key is not None:
            previous = out[key]
            out[key] = token if previous is True else [*_as_list(previous), token]
        else:
            raise ValueError(f"{token!r} is not a --flag")
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------------------------------------------
# sd-scripts TOML


# sd-scripts' own defaults where ours differ or the base config might: an option its TOML leaves out has these.
SD_SCRIPTS_DEFAULTS: dict[str, Any] = {
    "model_family": "auto", "v_parameterization": None, "vae": "", "train_data_dir": "", "reg_data_dir": "",
    "caption_extension": ".caption", "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "",
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
    "bucket_no_upscale": False, "flip_aug": False, "color_aug": False, "random_crop": False, "alpha_mask": False,
    "prior_loss_weight": 1.0, "network_dim": 4, "network_alpha": 1.0, "network_weights": "",
    "network_train_unet_only": False, "network_train_text_encoder_only": False, "learning_rate": 2e-6,
    "unet_lr": None, "text_encoder_lr": None, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0,
    "max_grad_norm": 1.0, "train_batch_size": 1, "gradient_accumulation_steps": 1, "max_train_epochs": None,
    "max_train_steps": 1600, "seed": None, "noise_offset": 0.0, "min_snr_gamma": None, "clip_skip": None,
    "max_token_length": 75, "lr_warmup_steps": 0, "mixed_precision": "no", "gradient_checkpointing": False,
    "cache_latents": False, "cache_latents_to_disk": False, "cache_text_encoder_outputs": False,
    "torch_compile": False, "save_precision": "float", "save_model_as": "safetensors", "save_every_n_epochs": None,
    "save_every_n_steps": None, "save_last_n_epochs": None, "save_last_n_steps": None, "save_state": False,
    "training_comment": "", "no_metadata": False, "sample_prompts": "", "sample_every_n_epochs": None,
    "sample_every_n_steps": None, "sample_sampler": "ddim", "sample_at_first": False, "log_with": "", "log_dir": "",
    "lr_scheduler": "constant",
}


# Our options that bring training data of their own: a kohya file describes all of its data, so they are cleared
# (kept only if the file's mapping set them).
OWN_DATA: dict[str, Any] = {"concepts_list": "", "num_class_images_per": 0}


def _defaults(m: OptionMap, defaults: Mapping[str, Any], source: str) -> None:
    names = set(cfgmod.field_names())
    for name, value in defaults.items():
        if name in names and name not in m.values:
            m.set(name, value, source)


def _from_sd_scripts(path: str, data: dict[str, Any]) -> Imported:
    inline = None
    if isinstance(data.get("datasets"), list):  # a dataset config given as the config, or both in one file
        inline = {k: data[k] for k in ("general", "datasets") if k in data}
        data = {k: v for k, v in data.items() if k not in inline}
    m = OptionMap(_flatten(data))
    _sds_options(m, path, only_given=False, inline_datasets=inline)
    _defaults(m, SD_SCRIPTS_DEFAULTS, "(sd-scripts default)")
    _defaults(m, OWN_DATA, "(not in sd-scripts)")
    _buckets(m)
    return m.imported(path, SD_SCRIPTS)


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts reads a config's [sections] as one flat set of options (read_config_from_file)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


def _sds_options(m: OptionMap, path: str, only_given: bool, inline_datasets: Mapping[str, Any] | None = None) -> None:
    """sd-scripts options (a TOML, or the GUI's additional_parameters when only_given: only what is there)."""
    given = set(m.raw)
    if "v2" in given or not only_given:
        m.set("model_family", "sd2" if truthy(m.take("v2")) else "auto", "v2")
    if "v_parameterization" in given:
        m.set("v_parameterization", True if truthy(m.take("v_parameterization")) else None, "v_parameterization")
    if given & {"network_module", "network_args"} or not only_given:
        _sds_network(m)
    if given & {"optimizer_type", "optimizer_args", "use_8bit_adam", "use_lion_optimizer"} or not only_given:
        _optimizer(m, "optimizer_type", _sds_optimizer_name(m), m.take("optimizer_args"))
    if "text_encoder_lr" in given:
        _sds_text_encoder_lr(m, m.take("text_encoder_lr"))
    if given & {"lr_scheduler", "lr_scheduler_num_cycles"}:
        _scheduler(m)
    if given & {"xformers", "sdpa", "mem_eff_attn"} or not only_given:
        _attention(m, m.take("xformers"), "xformers" if truthy(m.raw.get("xformers")) else "sdpa")
    if given & {"sample_sampler", "sample_prompts"}:
        _samples(m, prompts_are_text=False)
    if "log_with" in given:
        _log_with(m)
    if "resume" in given or not only_given:
        _resume(m)
    _resolution(m, "resolution")
    _caption_extension(m, "caption_extension", "caption_extention")
    if "multires_noise_iterations" not in given or neutral("", m.raw.get("multires_noise_iterations")):
        m.used.add("multires_noise_discount")
    dataset, masked = m.take("dataset_config"), m.take("masked_loss")
    _generic(m)
    if inline_datasets is not None or not blank(dataset):
        from .kohya_datasets import import_dataset_data, import_datasets

        for key in ("train_data_dir", "reg_data_dir"):
            if not blank(m.raw.get(key)):
                m.skip(key, m.raw[key], "sd-scripts ignores it when dataset_config is set; the dataset config's "
                                        "folders are used")
        if inline_datasets is not None:
            import_dataset_data(m, path, inline_datasets, m.raw)
        else:
            import_datasets(m, path, str(dataset), m.raw)
    _masked_loss(m, masked)


def _sds_optimizer_name(m: OptionMap) -> Any:
    name = m.take("optimizer_type")
    if blank(name) and truthy(m.take("use_8bit_adam")):
        return "AdamW8bit"
    if blank(name) and truthy(m.take("use_lion_optimizer")):
        return "Lion"
    m.used.update(("use_8bit_adam", "use_lion_optimizer"))
    return name


def _sds_text_encoder_lr(m: OptionMap, value: Any) -> None:
    """Newer sd-scripts take one rate per text encoder; Train LoRA has one for all."""
    rates = value if isinstance(value, list) else [value]
    if not rates:
        m.set("text_encoder_lr", None, "text_encoder_lr")
        return
    if any(r != rates[0] for r in rates):
        m.skip("text_encoder_lr", value, f"one rate for every text encoder: {rates[0]} is used")
    put(m, "text_encoder_lr", rates[0])
