"""ModelBundle: everything the training loop needs from a model, and nothing about where it came from.

Two hosts implement it: `backends.diffusers_backend` (a checkpoint file, a diffusers folder or a built-in tiny model,
for headless runs and tests) and `webui.bundle` (the checkpoint the AUTOMATIC1111 WebUI has loaded). The loop never
knows which one it drives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from .networks.targets import PartTree


@dataclass(frozen=True)
class SizeInfo:
    """Per-image size conditioning (SDXL): all (height, width), crop in the resized image."""

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


@dataclass
class SamplePrompt:
    """One preview image request (kohya's sample prompt line)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler_a"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingSetup:
    """What the loop asks the bundle to arrange before training (and to undo afterwards)."""

    device: torch.device
    weight_dtype: torch.dtype  # storage dtype of the frozen base weights
    train_unet: bool
    train_text_encoder: bool
    gradient_checkpointing: bool
    attention: str  # "sdpa" | "xformers" | "vanilla"
    clip_skip: int | None
    max_token_length: int
    channels_last: bool = False
    torch_compile: bool = False


@runtime_checkable
class ModelBundle(Protocol):
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    model_name: str  # shown in the metadata (ss_sd_model_name)
    vae_name: str | None
    vae_id: str  # identity of the VAE, part of every latent-cache key

    def network_trees(self) -> list[PartTree]: ...

    def prepare(self, setup: TrainingSetup) -> None:
        """Freeze the base, move/cast it for training, set attention and checkpointing."""

    def restore(self) -> None:
        """Undo everything `prepare` changed (flags, devices, dtypes, hooks)."""

    def alphas_cumprod(self) -> Tensor:
        """float32 [num_train_timesteps] on the training device."""

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[-1, 1] pixels (B, 3, H, W) -> scaled latents (B, C, H/8, W/8), no grad."""

    def encode_prompts(self, captions: list[str], sizes: list[SizeInfo]) -> Any:
        """Text conditioning for a batch (with grad when the text encoder trains)."""

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        """The UNet's prediction (noise or v)."""

    def sample(self, prompts: list[SamplePrompt]) -> list[Image.Image]:
        """Render preview images with the network as currently attached; parts moved away with `offload` are
        brought back for the render and moved away again."""

    def autocast(self, mixed_precision: str) -> contextlib.AbstractContextManager: ...

    def offload(self, part: str) -> None:
        """Move "vae" or "text_encoders" off the training device (their outputs are cached)."""

    def reload(self, part: str) -> None:
        """Bring an offloaded part back (at the end of a run)."""


def autocast_context(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for fp16/bf16 on the training device, a no-op for fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode (for sampling), restoring each one's previous mode."""
    before = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for m, training in before:
            m.training = training
