"""Non-finite steps are skipped and counted, too many in a row stop the run with advice and keep the earlier saves;
alpha masks reach the loss at latent resolution, the same from the cache as without it."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_trainer.data.buckets import BucketPlanner
from lora_trainer.data.captions import CaptionOptions
from lora_trainer.data.dataset import build_dataset
from lora_trainer.data.pipeline import AugmentOptions, BatchBuilder, LatentCache, cache_latents
from lora_trainer.errors import UserError
from lora_trainer.losses import weighted_mse
from lora_trainer.train import train

from .conftest import base_config, tiny_bundle


def _poison(bundle, bad_calls: set[int] | None = None, from_call: int | None = None) -> list[int]:
    """Make the model's prediction NaN on some calls (what an fp16 overflow or a bad LR leads to)."""
    real, calls = bundle.predict, []

    def predict(*a, **k):
        out = real(*a, **k)
        calls.append(len(calls) + 1)
        n = calls[-1]
        if (bad_calls and n in bad_calls) or (from_call is not None and n >= from_call):
            return out * float("nan")
        return out
    bundle.predict = predict
    return calls


def _finite_file(path: str) -> bool:
    tensors = load_file(path)
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors.values())


def test_a_nan_step_is_skipped_and_counted(tmp_path, dataset_dir):
    bundle = tiny_bundle()
    _poison(bundle, bad_calls={2})
    result = train(base_config(dataset_dir, str(tmp_path), max_train_steps=4, train_batch_size=1), bundle)
    assert result.skipped_steps == 1 and result.steps == 4
    assert result.final_file and _finite_file(result.final_file)


def test_a_nan_streak_stops_with_advice_and_keeps_the_last_good_saves(tmp_path, dataset_dir):
    bundle = tiny_bundle()
    _poison(bundle, from_call=3)
    cfg = base_config(dataset_dir, str(tmp_path), max_train_steps=10, train_batch_size=1, save_every_n_steps=1,
                      max_nonfinite_steps=3, mixed_precision="no")
    with pytest.raises(UserError) as e:
        train(cfg, bundle)
    msg = str(e.value)
    assert "NaN/inf for 3 steps in a row" in msg and "lower the learning rate" in msg and "step 5" in msg
    saved = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
    assert saved and "t.safetensors" not in saved  # no final file claims a finished run
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert all(_finite_file(os.path.join(tmp_path, n)) for n in saved)  # skipped steps never touched the weights
    # the weights before the streak and after it are the same: nothing was applied
    first_bad, last = load_file(str(tmp_path / "t-step00000002.safetensors")), load_file(str(tmp_path / saved[-1]))
    assert all(torch.equal(first_bad[k], last[k]) for k in first_bad)


def test_the_streak_limit_is_validated():
    from lora_trainer.config import TrainConfig, validate
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(TrainConfig(train_data_dir="x", max_nonfinite_steps=0))
    assert "max_nonfinite_steps" in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# alpha masks


def _rgba_dataset(root) -> str:
    folder = root / "1_cut"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    half[..., 3] = 0
    half[:, 32:, 3] = 255  # left half transparent, right half opaque
    Image.fromarray(half, "RGBA").save(folder / "half.png")
    clear = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    clear[..., 3] = 0
    Image.fromarray(clear, "RGBA").save(folder / "clear.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(folder / "opaque.png")
    for name in ("half", "clear", "opaque"):
        (folder / f"{name}.txt").write_text(name)
    return str(root)


def _masks(ds, aug, cache=None) -> dict[str, torch.Tensor]:
    builder = BatchBuilder(ds, CaptionOptions(), aug, cache)
    batch = builder.build(list(range(len(ds.items))), random.Random(0), 1)
    assert batch.masks is not None
    return {os.path.basename(it.path): m for it, m in zip(ds.items, batch.masks)}


def test_alpha_masks_reach_the_loss_at_latent_resolution_cached_or_not(tmp_path):
    ds = build_dataset(_rgba_dataset(tmp_path), "", BucketPlanner((64, 64), True, 64, 128, 64), ".txt")
    aug = AugmentOptions(alpha_mask=True)
    live = _masks(ds, aug)
    assert live["half.png"].shape == (8, 8)
    assert torch.equal(live["half.png"][:, :4], torch.zeros(8, 4)) and torch.equal(live["half.png"][:, 4:],
                                                                                   torch.ones(8, 4))
    assert live["clear.png"].max() == 0 and live["opaque.png"].min() == 1  # no alpha: everything trains

    cache = LatentCache("test-vae", to_disk=False, opts=aug)
    encoded, _ = cache_latents(ds, lambda px: torch.randn(px.shape[0], 4, 8, 8), cache, aug)
    assert encoded == 3
    cached = _masks(ds, aug, cache)
    assert all(torch.equal(cached[k], live[k]) for k in live)

    pred, target = torch.zeros(3, 4, 8, 8), torch.ones(3, 4, 8, 8)
    order = [os.path.basename(it.path) for it in ds.items]
    masks = torch.stack([live[n] for n in order])
    per_sample = [weighted_mse(pred[i:i + 1], target[i:i + 1], torch.ones(1), masks[i:i + 1]).item()
                  for i in range(3)]
    got = dict(zip(order, per_sample))
    assert got["clear.png"] == 0.0 and got["opaque.png"] == 1.0 and got["half.png"] == pytest.approx(0.5)


def test_without_alpha_mask_transparency_shows_the_background(tmp_path):
    ds = build_dataset(_rgba_dataset(tmp_path), "", BucketPlanner((64, 64), True, 64, 128, 64), ".txt")
    builder = BatchBuilder(ds, CaptionOptions(), AugmentOptions(background=(0, 0, 0)), None)
    batch = builder.build(list(range(len(ds.items))), random.Random(0), 1)
    clear = [i for i, it in enumerate(ds.items) if it.path.endswith("clear.png")][0]
    assert batch.masks is None and torch.all(batch.pixels[clear] == -1.0)  # black in [-1, 1]
