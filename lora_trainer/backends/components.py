"""The parts of a Stable Diffusion model as the standalone backend holds them, and the tiny-model factory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .sd_configs import TINY, TINY_SEED, FamilySpec


@dataclass
class SDComponents:
    family: str  # "sd1" | "sd2" | "sdxl"
    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    text_encoders: list[nn.Module]  # CLIPTextModel [, CLIPTextModelWithProjection]
    tokenizers: list[Any]  # CLIPTokenizerFast per text encoder
    prediction_type: str  # "epsilon" | "v_prediction"
    scaling_factor: float
    schedule: dict[str, Any] = field(default_factory=dict)  # beta schedule (num_train_timesteps, beta_*)
    source: str = ""  # what pretrained_model_name_or_path pointed at
    model_hash: str | None = None  # sha256 of the checkpoint file when there is one
    vae_source: str | None = None  # file of a separately loaded VAE
    vae_id: str = ""  # identity of the VAE for latent-cache keys


def family_of_unet_config(cfg: Any) -> str:
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    if get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2 is the SD1 layout with linear projections in the transformer blocks (and a 1024-wide context)
    return "sd2" if get("use_linear_projection") or get("cross_attention_dim") == 1024 else "sd1"


def build_tiny(name: str) -> SDComponents:
    """A built-in tiny model: real layout, tiny widths, weights from a fixed seed (identical on every machine)."""
    from .tokenizer import clip_tokenizer

    spec = TINY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet, vae, tes = build_from_spec(spec)
    tokenizers = [clip_tokenizer(pad) for pad in spec.pad_tokens]
    ident = hashlib.sha256(json.dumps([name, TINY_SEED, spec.vae], sort_keys=True, default=str).encode()).hexdigest()
    return SDComponents(spec.family, unet, vae, tes, tokenizers, spec.prediction_type, spec.scaling_factor,
                        dict(spec.schedule), source=name, vae_id=f"{name}-vae-{ident[:16]}")


def build_from_spec(spec: FamilySpec) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """Randomly initialised UNet, VAE and text encoders of a family spec (uses the global torch RNG)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)
    tes = []
    for i, te_cfg in enumerate(spec.text_encoders):
        cls = CLIPTextModelWithProjection if spec.family == "sdxl" and i == 1 else CLIPTextModel
        tes.append(cls(CLIPTextConfig(**te_cfg)))
    return unet, vae, tes
