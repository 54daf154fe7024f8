"""Shared fixtures: tiny models, a synthetic dataset, configs. Everything is offline and runs on the CPU."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TINY = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
FAMILY = {"tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


def fixture_path(name: str) -> pathlib.Path:
    base = pathlib.Path(os.environ.get("LORA_TRAINER_FIXTURES") or FIXTURES)
    if not (base / name).is_file():
        pytest.fail(f"shared fixture {name} not found in {base} (set LORA_TRAINER_FIXTURES)")
    return base / name


def kohya_keys(family: str) -> list[dict]:
    with open(fixture_path(f"kohya-{family}-keys.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> str:
    from lora_trainer.synthetic import make_dataset

    return make_dataset(str(tmp_path_factory.mktemp("data") / "train"), images=6, repeats=2, size=64)


def tiny_bundle(name: str = "tiny-sd1"):
    from lora_trainer.backends.diffusers_backend import load_bundle

    return load_bundle(name, device="cpu")


def base_config(dataset: str, out: str, **kw):
    from lora_trainer.config import TrainConfig, validate

    values = dict(pretrained_model_name_or_path="tiny-sd1", train_data_dir=dataset, output_dir=out,
                  output_name="t", resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64,
                  network_dim=4, network_alpha=2.0, learning_rate=1e-3, train_batch_size=2, max_train_steps=2,
                  seed=1234, save_precision="float", tag_occurrence_txt_file=False)
    values.update(kw)
    return validate(TrainConfig(**values))
