"""TrainConfig: the one typed source of truth for every training option.

Field names follow kohya sd-scripts (`network_dim`, `unet_lr`, `lr_scheduler`, ...) so that habits and files carry
over. Each field carries its help text, group, allowed values or range and, where it only makes sense for some
settings, a condition saying when it applies. The CLI flags, the JSON files, the WebUI form and the HTTP API are all
generated from these fields (`fields()`, `field_spec()`), and a test keeps them in sync.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
VERSION_KEY = "config_version"

ALGORITHMS = ("lora", "locon", "loha", "lokr", "ia3", "dylora")
CONV_ALGORITHMS = ("locon", "loha", "lokr", "dylora")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor", "DAdaptAdam", "SGDNesterov")
ADAPTIVE_OPTIMIZERS = ("Prodigy", "DAdaptAdam")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("euler_a", "euler", "ddim", "dpmsolver++")
FAMILIES = ("auto", "sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class FieldSpec:
    """What the UI, CLI and API need to know about one option."""

    name: str
    type: Any
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    when: Callable[[TrainConfig], bool] | None = None
    when_text: str = ""
    path: str = ""  # "file", "dir", "model" (a file, a folder or a built-in/hub name) or "file_or_json" (a file,
    # or JSON text that is no path: a concepts list); "" = not a path

    @property
    def optional(self) -> bool:
        return _is_optional(self.type)

    @property
    def base_type(self) -> Any:
        return _base_type(self.type)


def opt(default: Any, help: str, group: str, *, choices: Iterable | None = None, min: float | None = None,
        max: float | None = None, when: Callable[[TrainConfig], bool] | None = None, when_text: str = "",
        path: str = ""):
    """A dataclass field with the metadata the rest of the code derives its views from."""
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices is not None else None,
            "min": min, "max": max, "when": when, "when_text": when_text, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _conv_capable(c: TrainConfig) -> bool:
    return c.network_module in CONV_ALGORITHMS


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = opt(
        "", "Base model: a .safetensors/.ckpt checkpoint, a diffusers folder, or a built-in tiny model "
        "(tiny-sd1, tiny-sd2, tiny-sdxl). Inside the WebUI the loaded checkpoint is used instead.", "model",
        path="model")
    model_family: str = opt("auto", "Model family; 'auto' detects it from the checkpoint.", "model", choices=FAMILIES)
    v_parameterization: bool | None = opt(
        None, "Train with v-prediction (SD2 768-v). Empty = detect from the model.", "model")
    vae: str = opt("", "Train against this VAE file instead of the checkpoint's own VAE.", "model", path="file")
    clip_skip: int | None = opt(None, "Use the output of the N-th last text-encoder layer (2 for most anime models). "
                                      "Empty = the model's default.", "model", min=1, max=12)
    max_token_length: int = opt(75, "Longest caption in tokens; longer captions use 2 or 3 chunks of 75.", "model",
                                choices=(75, 150, 225))

    # --- dataset -----------------------------------------------------------------------------------------------
    train_data_dir: str = opt("", "Folder holding kohya-style 'N_name' subfolders (N = repeats) of images "
                                  "with caption files.", "dataset", path="dir")
    reg_data_dir: str = opt("", "Folder of regularisation (class) images in 'N_name' subfolders.", "dataset",
                            path="dir")
    concepts_list: str = opt(
        "", "Dreambooth-extension concepts list: a concepts .json file, or the JSON array itself. Each concept is "
            "trained with its own prompts ([filewords] = the caption), repeats (num_repeats) and class images "
            "(num_class_images_per); relative folders start at the file's folder. Trains together with "
            "train_data_dir.", "dataset", path="file_or_json")
    num_class_images_per: int = opt(
        0, "Class images wanted per training image in each reg_data_dir 'N_class' folder; missing ones are "
           "generated (prompt: the folder's class tokens) at the training images' bucket sizes. 0 = off. "
           "Concepts have their own.", "dataset", min=0, max=1000)
    class_negative_prompt: str = opt("", "Negative prompt for generated class images.", "dataset",
                                     when=lambda c: c.num_class_images_per > 0, when_text="num_class_images_per > 0")
    class_guidance_scale: float = opt(7.5, "CFG scale for generated class images.", "dataset", min=0.0, max=50.0,
                                      when=lambda c: c.num_class_images_per > 0,
                                      when_text="num_class_images_per > 0")
    class_infer_steps: int = opt(40, "Sampling steps for generated class images.", "dataset", min=1, max=1000,
                                 when=lambda c: c.num_class_images_per > 0, when_text="num_class_images_per > 0")
    resolution: str = opt("512", "Training resolution: '512' or 'width,height'.", "dataset")
    caption_extension: str = opt(".txt", "Caption file extension; falls back to .caption/.txt, then to the "
                                         "folder's class name.", "dataset")
    shuffle_caption: bool = opt(False, "Shuffle comma-separated tags each step.", "dataset")
    keep_tokens: int = opt(0, "Keep the first N tags in place when shuffling or dropping tags.", "dataset", min=0,
                           max=255)
    keep_tokens_separator: str = opt("", "Tags before this separator stay fixed (instead of keep_tokens).",
                                     "dataset")
    caption_dropout_rate: float = opt(0.0, "Probability of training a step with an empty caption.", "dataset",
                                      min=0.0, max=1.0)
    caption_dropout_every_n_epochs: int = opt(0, "Drop all captions every N-th epoch (0 = never).", "dataset", min=0)
    caption_tag_dropout_rate: float = opt(0.0, "Probability of dropping each (non-kept) tag.", "dataset", min=0.0,
                                          max=1.0)
    enable_bucket: bool = opt(True, "Group images into aspect-ratio buckets instead of center-cropping squares.",
                              "dataset")
    min_bucket_reso: int = opt(256, "Smallest bucket side in pixels.", "dataset", min=64, max=8192,
                               when=lambda c: c.enable_bucket, when_text="enable_bucket")
    max_bucket_reso: int = opt(1024, "Largest bucket side in pixels.", "dataset", min=64, max=8192,
                               when=lambda c: c.enable_bucket, when_text="enable_bucket")
    bucket_reso_steps: int = opt(64, "Bucket sides are multiples of this.", "dataset", min=8, max=512,
                                 when=lambda c: c.enable_bucket, when_text="enable_bucket")
    bucket_no_upscale: bool = opt(False, "Never upscale small images to fill a bucket.", "dataset",
                                  when=lambda c: c.enable_bucket, when_text="enable_bucket")
    flip_aug: bool = opt(False, "Randomly mirror images horizontally.", "dataset")
    color_aug: bool = opt(False, "Randomly shift hue/brightness (needs cache_latents off).", "dataset")
    random_crop: bool = opt(False, "Crop at a random position instead of the centre (needs cache_latents off).",
                            "dataset")
    alpha_background: str = opt("white", "Colour that transparent pixels are composited on: a name, #rrggbb or "
                                         "'r,g,b'.", "dataset")
    alpha_mask: bool = opt(False, "Use the images' transparency as a loss mask: transparent areas do not train "
                                  "(images without alpha train everywhere).", "dataset")
    prior_loss_weight: float = opt(1.0, "Weight of the loss on regularisation images.", "dataset", min=0.0, max=100.0)
    tag_occurrence_txt_file: bool = opt(True, "Write a tag-frequency file beside the outputs.", "dataset")
    sort_tag_occurrence_alphabetically: bool = opt(False, "Sort the tag-frequency file alphabetically instead of "
                                                          "by count.", "dataset",
                                                   when=lambda c: c.tag_occurrence_txt_file,
                                                   when_text="tag_occurrence_txt_file")

    # --- network -----------------------------------------------------------------------------------------------
    network_module: str = opt("lora", "Network algorithm: lora (kohya standard), locon, loha, lokr, ia3, dylora.",
                              "network", choices=ALGORITHMS)
    network_dim: int = opt(16, "Rank of the linear layers (LoKr: >= the factor sizes means full matrices).",
                           "network", min=1, max=100000, when=lambda c: c.network_module != "ia3",
                           when_text="network_module != ia3")
    network_alpha: float = opt(8.0, "Alpha: the LoRA output is scaled by alpha / dim.", "network", min=0.0,
                               max=100000.0, when=lambda c: c.network_module != "ia3",
                               when_text="network_module != ia3")
    conv_dim: int | None = opt(None, "Rank of the 3x3 conv layers (LoCon-style algorithms). Empty = network_dim.",
                               "network", min=1, max=100000, when=_conv_capable,
                               when_text="network_module in locon/loha/lokr/dylora")
    conv_alpha: float | None = opt(None, "Alpha of the conv layers. Empty = network_alpha.", "network", min=0.0,
                                   max=100000.0, when=_conv_capable,
                                   when_text="network_module in locon/loha/lokr/dylora")
    dylora_unit: int = opt(1, "DyLoRA: rank step trained at a time (network_dim must be a multiple).", "network",
                           min=1, max=1024, when=lambda c: c.network_module == "dylora",
                           when_text="network_module == dylora")
    lokr_factor: int = opt(-1, "LoKr: Kronecker factor (-1 = as balanced as possible).", "network", min=-1,
                           max=1024, when=lambda c: c.network_module == "lokr", when_text="network_module == lokr")
    network_dropout: float = opt(0.0, "Dropout on the network's output (LoRA/LoCon).", "network", min=0.0,
                                 max=1.0, when=lambda c: c.network_module in ("lora", "locon"),
                                 when_text="network_module in lora/locon")
    rank_dropout: float = opt(0.0, "Drop whole ranks with this probability each step.", "network", min=0.0,
                              max=1.0, when=lambda c: c.network_module in ("lora", "locon", "loha", "lokr"),
                              when_text="network_module in lora/locon/loha/lokr")
    module_dropout: float = opt(0.0, "Skip a whole wrapped layer with this probability each step.", "network",
                                min=0.0, max=1.0)
    network_weights: str = opt("", "Start from the weights of an existing network file of the same algorithm.",
                               "network", path="file")
    network_train_unet_only: bool = opt(False, "Train only the UNet (faster, less VRAM).", "network")
    network_train_text_encoder_only: bool = opt(False, "Train only the text encoder(s).", "network")

    # --- optimisation ------------------------------------------------------------------------------------------
    learning_rate: float = opt(1e-4, "Learning rate (Prodigy/DAdaptAdam: 1.0).", "training", min=0.0, max=10.0)
    unet_lr: float | None = opt(None, "UNet learning rate. Empty = learning_rate.", "training", min=0.0, max=10.0,
                                when=lambda c: not c.network_train_text_encoder_only,
                                when_text="the UNet is trained")
    text_encoder_lr: float | None = opt(None, "Text-encoder learning rate. Empty = learning_rate.", "training",
                                        min=0.0, max=10.0, when=lambda c: not c.network_train_unet_only,
                                        when_text="the text encoder is trained")
    optimizer_type: str = opt("AdamW", "Optimizer.", "training", choices=OPTIMIZERS)
    optimizer_args: list[str] = opt([], "Extra optimizer arguments as key=value, e.g. weight_decay=0.01 "
                                        "betas=0.9,0.99.", "training")
    lr_scheduler: str = opt("constant", "Learning-rate schedule.", "training", choices=SCHEDULERS)
    lr_warmup_steps: float = opt(0.0, "Warm-up: a step count, or a ratio of the total steps if below 1.",
                                 "training", min=0.0, max=1e9)
    lr_scheduler_num_cycles: int = opt(1, "Restarts for cosine_with_restarts.", "training", min=1, max=1000,
                                       when=lambda c: c.lr_scheduler == "cosine_with_restarts",
                                       when_text="lr_scheduler == cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "Power of the polynomial schedule.", "training", min=0.0, max=100.0,
                                    when=lambda c: c.lr_scheduler == "polynomial",
                                    when_text="lr_scheduler == polynomial")
    max_grad_norm: float = opt(1.0, "Clip gradients to this norm (0 = no clipping).", "training", min=0.0, max=1e6)
    max_nonfinite_steps: int = opt(5, "A step whose loss or gradients are NaN/inf is skipped; after this many in a "
                                      "row the run stops (the saves before stay).", "training", min=1, max=10000)
    train_batch_size: int = opt(1, "Images per step.", "training", min=1, max=1024)
    gradient_accumulation_steps: int = opt(1, "Accumulate gradients over N batches per optimizer step.",
                                           "training", min=1, max=1024)
    max_train_epochs: int | None = opt(None, "Train this many epochs (overrides max_train_steps).", "training",
                                       min=1, max=100000)
    max_train_steps: int = opt(1600, "Total optimizer steps (ignored when max_train_epochs is set).", "training",
                               min=1, max=10_000_000)
    seed: int | None = opt(None, "Random seed. Empty = pick one (it is logged and saved in the metadata).",
                           "training", min=0, max=2**32 - 1)
    noise_offset: float = opt(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", "training", min=0.0,
                              max=1.0)
    min_snr_gamma: float | None = opt(None, "Min-SNR loss weighting gamma (5 is common). Empty = off.", "training",
                                      min=0.0, max=100.0)

    # --- performance -------------------------------------------------------------------------------------------
    device: str = opt("auto", "Device for headless runs: auto, cpu, cuda, cuda:N, mps.", "performance")
    mixed_precision: str = opt("no", "Mixed precision for training.", "performance", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: much less VRAM, ~20% slower.",
                                       "performance")
    sdpa: bool = opt(True, "Use PyTorch scaled-dot-product attention.", "performance")
    xformers: bool = opt(False, "Use xformers attention (needs xformers installed).", "performance")
    cache_latents: bool = opt(True, "Encode every image once with the VAE before training.", "performance")
    cache_latents_to_disk: bool = opt(False, "Keep the latent cache on disk beside the images (reused next run).",
                                      "performance", when=lambda c: c.cache_latents, when_text="cache_latents")

    cache_text_encoder_outputs: bool = opt(
        False, "Encode every caption once and move the text encoders off the GPU (UNet-only training with fixed "
               "captions).", "performance", when=lambda c: c.network_train_unet_only,
        when_text="network_train_unet_only")
    offload_vae: bool = opt(False, "Move the VAE off the GPU once the latents are cached (back for samples).",
                            "performance", when=lambda c: c.cache_latents, when_text="cache_latents")
    channels_last: bool = opt(False, "Run the UNet in channels-last memory format (faster convolutions on some "
                                     "GPUs).", "performance")
    torch_compile: bool = opt(False, "Compile the UNet with torch.compile (slow first step, faster later ones).",
                              "performance")

    # --- saving ------------------------------------------------------------------------------------------------
    output_dir: str = opt("output", "Folder for the trained network files.", "saving", path="dir")
    work_dir: str = opt("", "Folder for samples, logs, training states and the saved config. Empty = output_dir.",
                        "saving", path="dir")
    output_name: str = opt("my_lora", "File name of the trained network (no extension).", "saving")
    multi_run_folder: str = opt("", "With several configs queued: each run writes into its own run1, run2, ... "
                                    "folder under this one (its output_dir and work_dir). Empty = each config's "
                                    "own output_dir.", "saving", path="dir")
    save_model_as: str = opt("safetensors", "File format.", "saving", choices=("safetensors", "ckpt", "pt"))
    save_precision: str = opt("fp16", "Precision of the saved weights.", "saving", choices=("float", "fp16", "bf16"))
    save_every_n_epochs: int | None = opt(None, "Also save every N epochs (name-000001...).", "saving", min=1,
                                          max=100000)
    save_every_n_steps: int | None = opt(None, "Also save every N steps (name-step00000100...).", "saving", min=1,
                                         max=10_000_000)
    save_last_n_epochs: int | None = opt(None, "Keep only the last N epoch saves.", "saving", min=1, max=100000)
    save_last_n_steps: int | None = opt(None, "Keep only the step saves of the last N steps.", "saving", min=1,
                                        max=10_000_000)
    save_state: bool = opt(False, "Save the full training state with every save, so that a run can be resumed.",
                           "saving")
    resume: str = opt("", "Resume from a state folder written by save_state.", "saving", path="dir")
    training_comment: str = opt("", "Comment stored in the file's metadata.", "saving")
    no_metadata: bool = opt(False, "Write only the minimal metadata loaders need.", "saving")
    overwrite: bool = opt(False, "Replace an existing output file of the same name.", "saving")
    save_json_only: bool = opt(False, "Dry run: write the resolved config and the step arithmetic, train nothing.",
                               "saving")
    json_load_skip_list: list[str] = opt([], "Keys to keep unchanged when loading a JSON over this config.",
                                         "saving")

    # --- samples -----------------------------------------------------------------------------------------------
    sample_prompts: str = opt("", "Text file of sample prompts, one per line, with kohya's --n --w --h --d --l --s.",
                              "samples", path="file")
    sample_every_n_epochs: int | None = opt(None, "Render samples every N epochs.", "samples", min=1, max=100000)
    sample_every_n_steps: int | None = opt(None, "Render samples every N steps.", "samples", min=1, max=10_000_000)
    sample_sampler: str = opt("euler_a", "Sampler for the samples.", "samples", choices=SAMPLERS)
    sample_at_first: bool = opt(False, "Render samples before the first step too.", "samples")

    # --- logging -----------------------------------------------------------------------------------------------
    log_with: str = opt("", "Also log to TensorBoard.", "logging", choices=("", "tensorboard"))
    log_dir: str = opt("", "Folder for logs. Empty = <work_dir>/logs.", "logging", path="dir")

    # ------------------------------------------------------------------------------------------------------------
    @property
    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    @property
    def effective_conv_dim(self) -> int:
        return self.conv_dim if self.conv_dim is not None else self.network_dim

    @property
    def effective_conv_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else self.network_alpha

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    @property
    def resolved_work_dir(self) -> str:
        return self.work_dir or self.output_dir

    @property
    def resolved_log_dir(self) -> str:
        return self.log_dir or os.path.join(self.resolved_work_dir, "logs")

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**to_dict(self), **changes}, versioned=False)


# ----------------------------------------------------------------------------------------------------------------
# Field introspection


def fields() -> list[FieldSpec]:
    """Every option, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(FieldSpec(f.name, hints[f.name], default, m["help"], m["group"], m["choices"], m["min"],
                             m["max"], m["when"], m["when_text"], m["path"]))
    return out


_FIELDS_BY_NAME: dict[str, FieldSpec] = {}


def field_spec(name: str) -> FieldSpec:
    if not _FIELDS_BY_NAME:
        _FIELDS_BY_NAME.update({s.name: s for s in fields()})
    try:
        return _FIELDS_BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown option {name!r}{_suggest(name)}") from None


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def applies(config: TrainConfig, name: str) -> bool:
    """Whether a field matters for this config (UI hides the ones that do not)."""
    spec = field_spec(name)
    return spec.when is None or bool(spec.when(config))


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_optional(tp) and len(args) == 1:
        return args[0]
    return tp


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, field_names() + [VERSION_KEY], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# Coercion: JSON, CLI strings and UI values into typed values


def coerce(name: str, value: Any) -> Any:
    """Turn a JSON/CLI/UI value into the field's type, or raise ValueError naming what is expected."""
    spec = field_spec(name)
    if value is None or (isinstance(value, str) and value.strip() == "" and spec.optional
                         and spec.base_type is not str):
        if spec.optional:
            return None
        raise ValueError("must not be empty")
    base = spec.base_type
    if base is bool:
        return _to_bool(value)
    if base is int:
        return _to_int(value)
    if base is float:
        return _to_float(value)
    if base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError("expected text")
        return value
    if typing.get_origin(base) is list:
        return _to_str_list(value)
    raise TypeError(f"field {name} has an unsupported type {base}")  # programming error


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a whole number, not true/false")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if f.is_integer():
            return int(f)
    raise ValueError("expected a whole number")


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number, not true/false")
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    else:
        raise ValueError("expected a number")
    if not math.isfinite(f):
        raise ValueError("expected a finite number")
    return f


def _to_str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return v.split() if v.strip() else []
    if isinstance(v, Mapping):  # {"weight_decay": 0.01} -> ["weight_decay=0.01"]
        return [f"{k}={_fmt(x)}" for k, x in v.items()]
    if isinstance(v, (list, tuple)):
        return [_fmt(x) for x in v]
    raise ValueError("expected a list of strings")


def _fmt(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return ",".join(_fmt(i) for i in x)
    return str(x)


# ----------------------------------------------------------------------------------------------------------------
# Validation


_RESOLUTION_RE = re.compile(r"^\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?$")


def parse_resolution(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768,512' or '768x512' -> (768, 512) (width, height)."""
    m = _RESOLUTION_RE.match(str(text))
    if not m:
        raise ValueError(f"resolution {text!r} is not '512' or 'width,height'")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def parse_optimizer_args(args: list[str]) -> dict[str, Any]:
    """kohya's `key=value` strings into Python values (numbers, booleans, tuples for comma lists)."""
    out: dict[str, Any] = {}
    for item in args:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optimizer_args entry {item!r} is not key=value")
        out[key.strip()] = _parse_literal(raw.strip())
    return out


def _parse_literal(raw: str) -> Any:
    if "," in raw:
        return tuple(_parse_literal(p) for p in raw.split(",") if p.strip())
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def _range_problem(spec: FieldSpec, value: Any) -> str | None:
    if value is None or isinstance(value, (bool, str, list)):
        return None
    if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
        return f"{spec.name}: {value!r} is out of range; allowed {_fmt_num(spec.min)} to {_fmt_num(spec.max)}"
    return None


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


def _field_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for spec in fields():
        value = getattr(cfg, spec.name)
        if spec.choices is not None and value not in spec.choices:
            allowed = ", ".join(repr(c) for c in spec.choices)
            problems.append(f"{spec.name}: {value!r} is not one of {allowed}")
            continue
        if (p := _range_problem(spec, value)) is not None:
            problems.append(p)
    return problems


def _cross_problems(c: TrainConfig) -> list[str]:
    p = []
    try:
        w, h = c.resolution_wh
        if not (64 <= w <= 8192 and 64 <= h <= 8192):
            p.append(f"resolution: {c.resolution!r} is out of range; each side must be 64 to 8192")
        elif w % 8 or h % 8:
            p.append(f"resolution: {c.resolution!r} must be a multiple of 8 on each side (e.g. 512 or 768,512)")
    except ValueError as e:
        p.append(f"resolution: {e}")
    if c.network_train_unet_only and c.network_train_text_encoder_only:
        p.append("network_train_unet_only and network_train_text_encoder_only are both true: nothing would be "
                 "trained; turn one off")
    if c.enable_bucket and c.min_bucket_reso > c.max_bucket_reso:
        p.append(f"min_bucket_reso: {c.min_bucket_reso} is larger than max_bucket_reso {c.max_bucket_reso}")
    if c.enable_bucket and (c.min_bucket_reso % c.bucket_reso_steps or c.max_bucket_reso % c.bucket_reso_steps):
        p.append(f"min_bucket_reso/max_bucket_reso ({c.min_bucket_reso}/{c.max_bucket_reso}) must be multiples of "
                 f"bucket_reso_steps ({c.bucket_reso_steps})")
    if c.bucket_reso_steps % 8:
        p.append(f"bucket_reso_steps: {c.bucket_reso_steps} must be a multiple of 8")
    if c.cache_latents and (c.color_aug or c.random_crop):
        which = " and ".join(n for n in ("color_aug", "random_crop") if getattr(c, n))
        p.append(f"{which} changes the image every step, so its latents cannot be cached: set cache_latents to "
                 f"false or turn {which} off")
    if c.cache_text_encoder_outputs:
        p.extend(_te_cache_problems(c))
    if c.offload_vae and not c.cache_latents:
        p.append("offload_vae needs cache_latents: without cached latents the VAE encodes every step")
    if c.network_module == "dylora" and c.network_dim % c.dylora_unit:
        p.append(f"network_dim: {c.network_dim} must be a multiple of dylora_unit {c.dylora_unit} for DyLoRA")
    if c.network_module == "dylora" and c.conv_dim is not None and c.conv_dim % c.dylora_unit:
        p.append(f"conv_dim: {c.conv_dim} must be a multiple of dylora_unit {c.dylora_unit} for DyLoRA")
    if c.lokr_factor == 0:
        p.append("lokr_factor: 0 is not allowed; use -1 (automatic) or a factor >= 1")
    if c.num_class_images_per > 0 and not c.reg_data_dir:
        p.append(f"num_class_images_per: {c.num_class_images_per} needs reg_data_dir, the folder whose 'N_class' "
                 f"subfolders (e.g. '1_person') receive the generated class images; concepts use their own "
                 f"num_class_images_per")
    if c.xformers and c.sdpa:
        p.append("xformers and sdpa are both true: choose one attention backend")
    for name in ("output_name",):
        p.extend(_name_problems(name, getattr(c, name)))
    try:
        from .data.images import parse_color

        parse_color(c.alpha_background)
    except ValueError:
        p.append(f"alpha_background: {c.alpha_background!r} is not a colour; use a name (white, black, gray), "
                 f"#rrggbb or 'r,g,b'")
    try:
        parse_optimizer_args(c.optimizer_args)
    except ValueError as e:
        p.append(f"optimizer_args: {e}")
    return p


def _te_cache_problems(c: TrainConfig) -> list[str]:
    if not c.network_train_unet_only:
        return ["cache_text_encoder_outputs needs network_train_unet_only: a trained text encoder's outputs change "
                "every step"]
    varying = [n for n in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                           "caption_tag_dropout_rate", "random_crop") if getattr(c, n)]
    if varying:
        return [f"cache_text_encoder_outputs needs fixed captions, but {', '.join(varying)} make them vary from step "
                f"to step (random_crop: the SDXL crop conditioning): turn those off or cache_text_encoder_outputs off"]
    return []


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def _name_problems(field_name: str, name: str) -> list[str]:
    bad = [ch for ch in '<>:"/\\|?*' if ch in name] + [ch for ch in name if ord(ch) < 32]
    if not name.strip():
        return [f"{field_name}: must not be empty"]
    if bad:
        return [f"{field_name}: {name!r} contains {''.join(sorted(set(bad)))!r}; use letters, digits, '-', '_' "
                f"and '.'"]
    if name in (".", "..") or name.split(".")[0].lower() in _RESERVED or name != name.strip() or name.endswith("."):
        return [f"{field_name}: {name!r} is not a usable file name"]
    return []


def warnings_for(c: TrainConfig) -> list[str]:
    """Settings that are allowed but probably not what the user wants."""
    w = []
    if c.network_module == "ia3" and (c.conv_dim is not None or c.conv_alpha is not None):
        w.append("conv_dim/conv_alpha have no effect with IA3; they are ignored")
    if c.network_module == "lora" and c.conv_dim is not None:
        w.append("conv_dim is set but network_module is 'lora' (attention and MLP only); use 'locon' to also "
                 "train the conv layers")
    lrs = [c.learning_rate] + [x for x in (c.unet_lr, c.text_encoder_lr) if x is not None]
    if c.optimizer_type in ADAPTIVE_OPTIMIZERS and min(lrs) < 0.1:
        w.append(f"{c.optimizer_type} adapts the step size itself and expects learning rates around 1.0; "
                 f"{min(lrs):g} will barely train")
    if c.optimizer_type not in ADAPTIVE_OPTIMIZERS and max(lrs) > 0.01:
        w.append(f"learning rate {max(lrs):g} is very high for {c.optimizer_type}; LoRA usually trains at 1e-4")
    if c.train_batch_size * c.gradient_accumulation_steps > 64:
        w.append("effective batch size above 64 is unusual for LoRA training")
    return w


def validate(cfg: TrainConfig) -> TrainConfig:
    problems = _field_problems(cfg)
    if not problems:  # cross checks assume each value is individually valid
        problems = _cross_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# dict / JSON


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {f.name: _copy(getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)}


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


def from_dict(data: Mapping[str, Any], *, base: TrainConfig | None = None, versioned: bool = True) -> TrainConfig:
    """Build a validated config from a dict (JSON, API body, UI values).

    Unknown keys are an error that lists them with the closest known name. With `base`, keys in
    `base.json_load_skip_list` keep the base's value. With `versioned`, the dict is migrated from its
    `config_version` (a dict without one is taken as version 0, the kohya-style layout).
    """
    data = dict(data)
    if versioned:
        data = migrate(data)
    data.pop(VERSION_KEY, None)
    unknown = [k for k in data if k not in field_names()]
    if unknown:
        raise ConfigError([f"unknown option {k!r}{_suggest(k)}" for k in unknown])
    values = to_dict(base) if base is not None else {}
    skip = set(base.json_load_skip_list) if base is not None else set()
    problems = []
    for key, raw in data.items():
        if key in skip:
            log.info("kept %s from the current config (json_load_skip_list)", key)
            continue
        try:
            values[key] = coerce(key, raw)
        except ValueError as e:
            problems.append(f"{key}: {raw!r}: {e}")
    if problems:
        raise ConfigError(problems)
    return validate(TrainConfig(**values))


def to_json(cfg: TrainConfig) -> str:
    return json.dumps({VERSION_KEY: CONFIG_VERSION, **to_dict(cfg)}, indent=2)


def load_json(path: str, *, base: TrainConfig | None = None) -> TrainConfig:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object of options, not {type(data).__name__}")
    try:
        return from_dict(data, base=base)
    except ConfigError as e:
        raise ConfigError([f"{os.path.basename(path)}: {p}" for p in e.problems]) from None


def load_config(path: str, *, base: TrainConfig | None = None) -> TrainConfig:
    """Any config file: our JSON (load_json), or a kohya_ss GUI JSON / sd-scripts TOML mapped to our options, the
    ones not carried over logged as a warning (see kohya_config)."""
    from .kohya_config import load

    return load(path, base=base).config


def save_json(cfg: TrainConfig, path: str) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(path, to_json(cfg) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Migrations: one small function per version step. Version 0 is a config without `config_version`: the keys
# kohya sd-scripts writes with --output_config (network_module as a python module, network_args as a list).

_KOHYA_MODULES = {"networks.lora": "lora", "networks.dylora": "dylora", "networks.lora_fa": None,
                  "lycoris.kohya": None}


def _migrate_0_to_1(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    args = _network_args(d.pop("network_args", None))
    module = d.get("network_module")
    if isinstance(module, str) and module in _KOHYA_MODULES:
        algo = _KOHYA_MODULES[module] or str(args.pop("algo", "locon")).lower()
        if algo == "lora" and "conv_dim" in args:  # kohya LoRA with conv_dim is LoCon (C3Lier)
            algo = "locon"
        d["network_module"] = {"lycoris-lora": "lora"}.get(algo, algo)
    renames = {"conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "unit": "dylora_unit", "factor": "lokr_factor",
               "rank_dropout": "rank_dropout", "module_dropout": "module_dropout", "dropout": "network_dropout"}
    for k, v in args.items():
        if k not in renames:
            raise ConfigError([f"network_args: {k!r} is not supported (supported: {', '.join(sorted(renames))})"])
        d.setdefault(renames[k], v)
    return d


def _network_args(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    items = raw.split() if isinstance(raw, str) else list(raw)
    out = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep:
            raise ConfigError([f"network_args: {item!r} is not key=value"])
        out[k.strip()] = v.strip()
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_0_to_1}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    version = data.get(VERSION_KEY, 0)
    if not isinstance(version, int) or version < 0:
        raise ConfigError([f"{VERSION_KEY}: {version!r} is not a version number"])
    if version > CONFIG_VERSION:
        raise ConfigError([f"{VERSION_KEY}: {version} is newer than this version of Train LoRA understands "
                           f"({CONFIG_VERSION}); update the extension"])
    while version < CONFIG_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    data[VERSION_KEY] = version
    return data


# ----------------------------------------------------------------------------------------------------------------
# Overrides from the command line / UI


def with_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Apply `name -> value` overrides (values may be strings) and validate."""
    values = to_dict(cfg)
    problems = []
    for key, raw in overrides.items():
        try:
            values[key] = coerce(key, raw)
        except UserError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(f"{key}: {raw!r}: {e}")
    if problems:
        raise ConfigError(problems)
    return validate(TrainConfig(**values))
