"""The diffusion training objective, as pure functions of tensors.

Latents are noised at uniformly drawn timesteps with the model's own `alphas_cumprod` (x_t = sqrt(a) x0 +
sqrt(1 - a) eps); the model regresses eps, or v = sqrt(a) eps - sqrt(1 - a) x0 for v-prediction. Noise offset adds
a per-image, per-channel constant to the noise (Guttenberg 2023); min-SNR weighting (Hang et al. 2023) weights each
sample by min(SNR, gamma) / SNR for eps, and min(SNR, gamma) / (SNR + 1) for v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_noise(shape: torch.Size | tuple[int, ...], gen: torch.Generator, offset: float = 0.0) -> Tensor:
    """Gaussian noise (drawn on the CPU generator, so runs are reproducible on any device)."""
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def sample_timesteps(batch: int, num_timesteps: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, num_timesteps, (batch,), generator=gen)


def noisy_latents(latents: Tensor, noise: Tensor, alphas_t: Tensor) -> Tensor:
    a = alphas_t.view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target(latents: Tensor, noise: Tensor, alphas_t: Tensor, v_prediction: bool) -> Tensor:
    if not v_prediction:
        return noise
    a = alphas_t.view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def snr_weights(alphas_t: Tensor, gamma: float | None, v_prediction: bool) -> Tensor:
    if not gamma:
        return torch.ones_like(alphas_t)
    snr = alphas_t / (1 - alphas_t)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def weighted_mse(pred: Tensor, tgt: Tensor, weights: Tensor) -> Tensor:
    """Mean over pixels per sample, times the sample's weight (min-SNR x prior-loss), mean over the batch."""
    per_sample = F.mse_loss(pred.float(), tgt.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
