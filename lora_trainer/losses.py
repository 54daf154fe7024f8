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


def weighted_mse(pred: Tensor, tgt: Tensor, weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over pixels per sample, times the sample's weight (min-SNR x prior-loss), mean over the batch.

    A mask (B x h x w in [0, 1], from the images' alpha with `alpha_mask`) scales each latent pixel's error before
    the mean, as kohya's masked loss does: transparent regions do not train."""
    err = F.mse_loss(pred.float(), tgt.float(), reduction="none")
    if mask is not None:
        m = mask.to(err.device, err.dtype)[:, None]
        if m.shape[-2:] != err.shape[-2:]:
            m = F.interpolate(m, size=err.shape[-2:], mode="area")
        err = err * m
    return (err.mean(dim=(1, 2, 3)) * weights).mean()


def grad_norm(params: list[Tensor]) -> Tensor:
    """Total L2 norm of the gradients (NaN/inf if any gradient is), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
