"""Presets: named starting points that set values and say which options apply.

A preset's `values` are applied over the defaults (or over the user's config, keeping the dataset and output
paths). Its `fields` are the options that matter for that use; the WebUI shows those and folds the rest away, and
`applicable_fields` combines them with each field's own condition (e.g. conv_dim only for conv-capable algorithms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import config as cfgmod
from .config import TrainConfig
from .errors import UserError

# Options every preset shows: what the user has to decide for any run.
ESSENTIAL = (
    "pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "resolution", "caption_extension",
    "output_dir", "output_name", "network_module", "network_dim", "network_alpha", "learning_rate",
    "max_train_epochs", "max_train_steps", "train_batch_size", "save_every_n_epochs", "sample_prompts",
    "sample_every_n_epochs", "seed", "training_comment",
)
CAPTIONS = ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug")
RATES = ("unet_lr", "text_encoder_lr", "optimizer_type", "optimizer_args", "lr_scheduler", "lr_warmup_steps")
PERFORMANCE = ("mixed_precision", "gradient_checkpointing", "cache_latents", "cache_latents_to_disk", "sdpa",
               "xformers", "gradient_accumulation_steps", "network_train_unet_only", "save_precision")
BUCKETS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale")


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str
    values: dict[str, Any] = field(default_factory=dict)
    fields: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "character-sd15", "Character / person (SD1.5)",
        "A LoRA that learns one subject from 10-50 captioned images; trigger word as the first tag.",
        values=dict(network_module="lora", network_dim=16, network_alpha=8.0, learning_rate=1e-4, unet_lr=1e-4,
                    text_encoder_lr=5e-5, optimizer_type="AdamW", lr_scheduler="cosine", lr_warmup_steps=0.05,
                    resolution="512", train_batch_size=2, max_train_epochs=10, save_every_n_epochs=2,
                    shuffle_caption=True, keep_tokens=1, enable_bucket=True, min_bucket_reso=256,
                    max_bucket_reso=1024, cache_latents=True, min_snr_gamma=5.0, flip_aug=False),
        fields=ESSENTIAL + CAPTIONS + RATES + BUCKETS + ("min_snr_gamma",),
    ),
    Preset(
        "style-sd15", "Art style (SD1.5)",
        "A LoCon that learns a style from 50-500 images; conv layers help with textures and colour.",
        values=dict(network_module="locon", network_dim=32, network_alpha=16.0, conv_dim=8, conv_alpha=4.0,
                    learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, optimizer_type="AdamW",
                    lr_scheduler="cosine", lr_warmup_steps=0.05, resolution="512", train_batch_size=2,
                    max_train_epochs=15, save_every_n_epochs=3, shuffle_caption=True, keep_tokens=0,
                    caption_dropout_rate=0.05, flip_aug=True, enable_bucket=True, cache_latents=True,
                    min_snr_gamma=5.0, noise_offset=0.05),
        fields=ESSENTIAL + CAPTIONS + RATES + BUCKETS + ("conv_dim", "conv_alpha", "min_snr_gamma", "noise_offset"),
    ),
    Preset(
        "low-vram-8gb", "Low VRAM (8 GB cards, SD1.5 and SDXL)",
        "Fits 8 GB: UNet only, gradient checkpointing, 8-bit AdamW, cached latents and text-encoder outputs with "
        "the text encoders and VAE off the GPU while training, batch 1 (measured on an H100: SDXL 1024 px 5.8 GB, "
        "SD1 512 px 2.0 GB).",
        values=dict(network_module="lora", network_dim=8, network_alpha=4.0, learning_rate=1e-4,
                    optimizer_type="AdamW8bit", lr_scheduler="cosine", train_batch_size=1,
                    gradient_accumulation_steps=2, network_train_unet_only=True, gradient_checkpointing=True,
                    cache_latents=True, cache_text_encoder_outputs=True, offload_vae=True, mixed_precision="fp16",
                    save_precision="fp16", sdpa=True, xformers=False, max_bucket_reso=1024),
        fields=ESSENTIAL + RATES + PERFORMANCE + ("cache_text_encoder_outputs", "offload_vae"),
    ),
    Preset(
        "sdxl-24gb", "SDXL (24 GB cards)",
        "SDXL LoRA at 1024 px with bf16, cached latents and checkpointing; UNet only, as most SDXL LoRAs are.",
        values=dict(network_module="lora", network_dim=32, network_alpha=16.0, learning_rate=1e-4, unet_lr=1e-4,
                    text_encoder_lr=1e-5, optimizer_type="AdamW", lr_scheduler="cosine", lr_warmup_steps=0.05,
                    resolution="1024", train_batch_size=4, max_train_epochs=10, save_every_n_epochs=2,
                    network_train_unet_only=True, gradient_checkpointing=True, cache_latents=True,
                    mixed_precision="bf16", save_precision="fp16", enable_bucket=True, min_bucket_reso=512,
                    max_bucket_reso=2048, min_snr_gamma=5.0, shuffle_caption=True, keep_tokens=1),
        fields=ESSENTIAL + CAPTIONS + RATES + BUCKETS + PERFORMANCE + ("min_snr_gamma",),
    ),
)}

# Options a preset must never change: they describe the user's files, not the training recipe.
USER_PATHS = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "output_name",
              "sample_prompts", "network_weights", "resume", "vae", "log_dir")


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def apply(preset: str | Preset, base: TrainConfig | None = None) -> TrainConfig:
    """The preset's values over `base` (or the defaults); the user's paths in `base` are kept."""
    p = get(preset) if isinstance(preset, str) else preset
    base = base or TrainConfig()
    values = {k: v for k, v in p.values.items() if k not in USER_PATHS}
    return cfgmod.with_overrides(base, values)


def applicable_fields(cfg: TrainConfig, preset: str | Preset | None = None) -> list[str]:
    """Fields that matter for `cfg`: those the preset shows (all without one) whose own condition holds."""
    names = cfgmod.field_names()
    if preset is not None:
        shown = set((get(preset) if isinstance(preset, str) else preset).fields)
        names = [n for n in names if n in shown]
    return [n for n in names if cfgmod.applies(cfg, n)]
