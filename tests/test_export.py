"""Saved files: metadata A1111/Forge read, kohya's hashes, precision, formats, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.config import TrainConfig
from lora_trainer.fileio import atomic_write_bytes
from lora_trainer.networks.export import (
    MINIMUM_KEYS,
    RunInfo,
    architecture,
    base_model_version,
    build_metadata,
    save_network,
)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g), "lora_unet_x.alpha": torch.tensor(2.0),
            "lora_unet_y.on_input": torch.tensor(1)}


RUN = RunInfo("sd1", False, model_name="model.safetensors", seed=3,
              dataset={"tag_frequency": {"10_x": {"a": 2}}, "dataset_dirs": {"10_x": {"n_repeats": 10,
                                                                                      "img_count": 2}},
                       "bucket_info": {"buckets": {"0": {"resolution": [512, 512], "count": 20}}}})


def test_metadata_carries_what_a1111_and_forge_read():
    meta = build_metadata(TrainConfig(output_name="hero", training_comment="hi"), RUN, steps=10, epoch=2,
                          title="hero")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_output_name"] == "hero" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_x": {"a": 2}}
    assert json.loads(meta["ss_dataset_dirs"])["10_x"]["img_count"] == 2
    assert meta["ss_steps"] == "10" and meta["ss_epoch"] == "2" and meta["ss_training_comment"] == "hi"


def test_no_metadata_keeps_only_what_loaders_need():
    meta = build_metadata(TrainConfig(no_metadata=True, network_module="loha", conv_dim=4), RUN, steps=1, epoch=1,
                          title="t")
    ss = {k for k in meta if k.startswith("ss_")}
    assert ss == set(MINIMUM_KEYS)
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "4", "conv_alpha": "8.0"}
    assert meta["ss_network_module"] == "lycoris.kohya"


@pytest.mark.parametrize("family,v,version,arch", [
    ("sd1", False, "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", False, "sd_v2", "stable-diffusion-v2-512/lora"),
    ("sd2", True, "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    ("sdxl", False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_family_markers(family, v, version, arch):
    assert base_model_version(family, v) == version and architecture(family, v) == arch


def test_sshs_hash_is_the_sha256_of_the_tensor_bytes(tmp_path):
    path = str(tmp_path / "a.safetensors")
    meta = build_metadata(TrainConfig(), RUN, steps=1, epoch=1, title="a")
    h = save_network(path, tensors(), meta, "fp16")
    with open(path, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[:8], "little")
    assert h == hashlib.sha256(data[8 + header:]).hexdigest()
    with safe_open(path, "pt") as f:
        saved = f.metadata()
    assert saved["sshs_model_hash"] == h and len(saved["sshs_legacy_hash"]) == 8
    # metadata changes do not change the hash (A1111 trusts it as the file's hash)
    other = str(tmp_path / "b.safetensors")
    assert save_network(other, tensors(), {**meta, "ss_training_comment": "changed"}, "fp16") == h


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("float", torch.float32)])
def test_save_precision_casts_floats_only(tmp_path, precision, dtype):
    path = str(tmp_path / "p.safetensors")
    save_network(path, tensors(), {}, precision)
    sd = load_file(path)
    assert sd["lora_unet_x.lora_down.weight"].dtype == dtype and sd["lora_unet_x.alpha"].dtype == dtype
    assert sd["lora_unet_y.on_input"].dtype == torch.int64


def test_ckpt_and_pt_formats(tmp_path):
    path = str(tmp_path / "n.ckpt")
    assert save_network(path, tensors(), {"ss_x": "1"}, "fp16") == ""
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(tensors()) and sd["lora_unet_x.lora_up.weight"].dtype == torch.float16


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.bin")
    atomic_write_bytes(path, b"old")

    class Boom(Exception):
        pass

    from lora_trainer.fileio import atomic_path

    with pytest.raises(Boom), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise Boom
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
