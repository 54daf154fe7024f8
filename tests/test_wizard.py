"""Performance Wizard: every VRAM tier gets a valid, monotonic recommendation with a reason for each pick."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from lora_trainer import config as cfgmod
from lora_trainer.config import TrainConfig
from lora_trainer.wizard import (
    BATCHES,
    FAMILIES,
    DatasetStats,
    Plan,
    estimate_gb,
    recommend,
    refine_with_probe,
    simulated_hardware,
)

TIERS = (4, 6, 8, 12, 16, 24, 48, 80)
CASES = [(family, res, te, bf16) for family, res in (("sd1", "512"), ("sdxl", "1024"))
         for te in (True, False) for bf16 in (True, False)]


def rec(vram, family, res, train_te, bf16, **cfg):
    base = TrainConfig(resolution=res, network_train_unet_only=not train_te, **cfg)
    return recommend(simulated_hardware(vram, bf16=bf16), DatasetStats(40), base, family), base


@pytest.mark.parametrize("family,res,train_te,bf16", CASES)
def test_every_tier_is_valid_reasoned_and_monotonic(family, res, train_te, bf16):
    previous = None
    for vram in TIERS:
        r, base = rec(vram, family, res, train_te, bf16)
        applied = r.apply(base)  # valid for the config schema (raises otherwise)
        assert cfgmod.validate(applied) == applied
        assert all(p.reason for p in r.picks), [p.field for p in r.picks if not p.reason]
        v = r.values()
        assert v["mixed_precision"] == ("bf16" if bf16 else "fp16")
        assert v["train_batch_size"] * v["gradient_accumulation_steps"] >= 1
        if previous is not None:
            assert v["train_batch_size"] >= previous["train_batch_size"], (vram, family)
            assert not (v["gradient_checkpointing"] and not previous["gradient_checkpointing"]), (vram, family)
        previous = v
    assert previous["gradient_checkpointing"] is False  # 80 GB needs no checkpointing


def test_monotonic_on_a_fine_grid():
    for family, res in (("sd1", "512"), ("sdxl", "1024")):
        last_batch, last_ckpt = 0, True
        for tenth in range(30, 900, 7):
            v = rec(tenth / 10, family, res, False, True)[0].values()
            assert v["train_batch_size"] >= last_batch
            assert not (v["gradient_checkpointing"] and not last_ckpt)
            last_batch, last_ckpt = v["train_batch_size"], v["gradient_checkpointing"]


def test_the_effective_batch_asked_for_is_kept():
    r, _ = rec(8, "sd1", "512", True, True, train_batch_size=4, gradient_accumulation_steps=2)
    v = r.values()
    assert v["train_batch_size"] * v["gradient_accumulation_steps"] >= 8
    assert v["train_batch_size"] in BATCHES


def test_small_cards_get_every_saving_and_a_resolution_cap():
    r, _ = rec(6, "sdxl", "1024", True, True)
    v = r.values()
    assert v["gradient_checkpointing"] and v["optimizer_type"] == "AdamW8bit" and v["offload_vae"]
    assert v["train_batch_size"] == 1 and "resolution" in v
    assert any("lowered" in w or "expect out-of-memory" in w for w in r.warnings)


def test_text_encoder_outputs_are_cached_only_when_allowed():
    frozen, _ = rec(12, "sdxl", "1024", False, True)
    assert frozen.values().get("cache_text_encoder_outputs") is True
    trained, _ = rec(12, "sdxl", "1024", True, True)
    assert "cache_text_encoder_outputs" not in trained.values()
    shuffled, _ = rec(12, "sdxl", "1024", False, True, shuffle_caption=True)
    assert "cache_text_encoder_outputs" not in shuffled.values()


def test_augmentation_that_forbids_latent_caching_is_respected():
    r, base = rec(12, "sd1", "512", True, True, random_crop=True, cache_latents=False)
    assert r.values()["cache_latents"] is False and r.values()["offload_vae"] is False
    r.apply(base)


def test_cpu_runs_in_fp32_with_a_warning():
    from lora_trainer.wizard import HardwareInfo

    hw = HardwareInfo("cpu", "CPU", 24, 24)
    r = recommend(hw, DatasetStats(10), TrainConfig(), "sd1")
    assert r.values()["mixed_precision"] == "no" and r.values()["optimizer_type"] == "AdamW"
    assert any("no GPU" in w for w in r.warnings)


def test_memory_model_grows_with_what_it_should():
    p = Plan("sd1", (512, 512), 1, 2, True, False, True, True, 7_000_000, 8)
    assert estimate_gb(dataclasses.replace(p, batch=2)) > estimate_gb(p)
    assert estimate_gb(dataclasses.replace(p, checkpointing=False)) > estimate_gb(p)
    assert estimate_gb(dataclasses.replace(p, resolution=(1024, 1024))) > estimate_gb(p)
    assert estimate_gb(dataclasses.replace(p, te_cached=False)) > estimate_gb(p)
    assert estimate_gb(dataclasses.replace(p, family="sdxl")) > estimate_gb(p)
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}


def test_probe_results_choose_the_largest_measured_batch():
    hw = simulated_hardware(12)
    r, _ = rec(12, "sd1", "512", True, True)
    refined = refine_with_probe(r, {1: 3.0, 2: 5.0, 4: 9.5, 8: 14.0}, hw, target=8)
    v = refined.values()
    assert v["train_batch_size"] == 4 and v["gradient_accumulation_steps"] == 2
    assert "measured" in next(p.reason for p in refined.picks if p.field == "train_batch_size")
    none = refine_with_probe(rec(12, "sd1", "512", True, True)[0], {}, hw, target=8)
    assert not none.fits and none.warnings


def test_wizard_cli_with_simulated_hardware():
    out = subprocess.run([sys.executable, "-m", "lora_trainer", "wizard", "--vram-gb", "8", "--family", "sdxl",
                          "--images", "30", "--no-bf16", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["hardware"]["total_vram_gb"] == 8 and data["hardware"]["bf16"] is False
    assert {p["field"] for p in data["picks"]} >= {"train_batch_size", "gradient_checkpointing", "mixed_precision"}
    assert data["config"]["mixed_precision"] == "fp16"
