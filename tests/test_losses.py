"""The objective: noise offset, targets, min-SNR weights, prior weights."""

from __future__ import annotations

import torch

from lora_trainer import losses


def alphas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_noise_offset_adds_a_constant_per_image_and_channel():
    plain = losses.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(0))
    offset = losses.sample_noise((2, 4, 8, 8), torch.Generator().manual_seed(0), offset=0.1)
    diff = offset - plain
    assert diff.abs().max() > 0
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert not torch.allclose(diff[0, 0, 0, 0], diff[0, 1, 0, 0])


def test_noisy_latents_and_targets_follow_the_schedule():
    a = alphas()[torch.tensor([0, 500, 999])]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g)
    eps = torch.randn(3, 4, 2, 2, generator=g)
    xt = losses.noisy_latents(x0, eps, a)
    v = losses.target(x0, eps, a, v_prediction=True)
    assert torch.equal(losses.target(x0, eps, a, v_prediction=False), eps)
    # v-prediction identity: x0 = sqrt(a) x_t - sqrt(1 - a) v
    s = a.sqrt().view(-1, 1, 1, 1)
    r = (1 - a).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(s * xt - r * v, x0, atol=1e-5)
    assert torch.allclose(xt[0], x0[0], atol=0.03 * float(eps[0].abs().max()) + 1e-3)  # t=0: sqrt(1-a) ~ 0.03


def test_min_snr_weights():
    a = alphas()[torch.tensor([0, 300, 999])]
    snr = a / (1 - a)
    w_eps = losses.snr_weights(a, 5.0, v_prediction=False)
    w_v = losses.snr_weights(a, 5.0, v_prediction=True)
    assert torch.allclose(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(w_v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w_eps[0] < 0.01 and w_eps[2] == 1.0  # low-noise steps are down-weighted, high-noise ones kept
    assert torch.equal(losses.snr_weights(a, None, False), torch.ones(3))


def test_weighted_mse_weights_each_sample():
    pred = torch.zeros(2, 1, 2, 2)
    tgt = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    assert losses.weighted_mse(pred, tgt, torch.tensor([1.0, 1.0])) == 2.5
    assert losses.weighted_mse(pred, tgt, torch.tensor([1.0, 0.0])) == 0.5
