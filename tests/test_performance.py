"""Memory and speed features of the loop: OOM back-off, text-encoder output cache, VAE offload, benchmark smoke."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer import memory
from lora_trainer.errors import UserError
from lora_trainer.train import TrainCallbacks, train

from .conftest import base_config, tiny_bundle


class OOMOnce:
    """Makes the UNet run out of memory whenever a micro-batch holds more than `limit` images."""

    def __init__(self, bundle, limit):
        self.bundle, self.limit, self.sizes = bundle, limit, []
        self._predict = bundle.predict
        bundle.predict = self

    def __call__(self, noisy, t, cond):
        self.sizes.append(noisy.shape[0])
        if noisy.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._predict(noisy, t, cond)


def test_out_of_memory_halves_the_batch_and_continues_from_the_same_step(tmp_path, dataset_dir, caplog):
    bundle = tiny_bundle()
    oom = OOMOnce(bundle, limit=1)
    cfg = base_config(dataset_dir, str(tmp_path), train_batch_size=4, max_train_steps=3)
    steps = []
    result = train(cfg, bundle, TrainCallbacks(on_progress=lambda p: steps.append(p.step) if p.phase == "training"
                                               else None))
    assert result.steps == 3 and steps == [1, 2, 3]
    assert max(oom.sizes) == 4 and oom.sizes[-1] == 1  # tried 4, backed off to 2, then 1
    assert "out of GPU memory: batch size 4 -> 2, gradient accumulation 1 -> 2" in caplog.text
    assert "batch size 2 -> 1, gradient accumulation 2 -> 4" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_file(result.final_file).values())


def test_out_of_memory_at_batch_one_is_a_clear_error(tmp_path, dataset_dir):
    bundle = tiny_bundle()
    OOMOnce(bundle, limit=0)
    with pytest.raises(UserError, match="even at batch size 1"):
        train(base_config(dataset_dir, str(tmp_path), train_batch_size=1), bundle)


def test_oom_recognition_and_batch_split():
    assert memory.is_oom(torch.cuda.OutOfMemoryError("x"))
    assert memory.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))
    assert memory.split_batch([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert memory.split_batch([7], 4) == [[7]]


def test_cached_text_encoder_outputs_train_like_encoding_every_step(tmp_path, dataset_dir):
    common = dict(network_train_unet_only=True, max_train_steps=2, max_token_length=150, train_batch_size=3)
    plain = train(base_config(dataset_dir, str(tmp_path / "a"), **common), tiny_bundle())
    bundle = tiny_bundle()
    cached = train(base_config(dataset_dir, str(tmp_path / "b"), cache_text_encoder_outputs=True, offload_vae=True,
                               **common), bundle)
    a, b = load_file(plain.final_file), load_file(cached.final_file)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_text_cache_pads_short_captions_with_the_empty_chunk():
    from lora_trainer.data.pipeline import TextCache

    cache = TextCache()
    cache.empty = {"context": torch.full((77, 2), -1.0)}
    cache.per_item = {0: {"context": torch.ones(154, 2)}, 1: {"context": torch.zeros(77, 2)}}
    out = cache.batch([0, 1], torch.device("cpu"))["context"]
    assert out.shape == (2, 154, 2) and torch.equal(out[1, 77:], torch.full((77, 2), -1.0))


def test_channels_last_computes_the_same_and_trains(tmp_path, dataset_dir):
    from lora_trainer.model import TrainingSetup

    from .test_networks import unet_inputs

    def output(channels_last):
        bundle = tiny_bundle()
        bundle.prepare(TrainingSetup(torch.device("cpu"), torch.float32, True, True, False, "sdpa", None, 75,
                                     channels_last=channels_last))
        with torch.no_grad():
            out = bundle.predict(*unet_inputs(bundle))
        bundle.restore()
        assert bundle.c.unet.conv_in.weight.is_contiguous()  # restore() puts the memory format back
        return out

    assert torch.allclose(output(False), output(True), atol=1e-5)
    result = train(base_config(dataset_dir, str(tmp_path), max_train_steps=1, channels_last=True), tiny_bundle())
    assert all(torch.isfinite(v).all() for v in load_file(result.final_file).values())


def test_bench_json_smoke_on_the_cpu():
    out = subprocess.run([sys.executable, "-m", "lora_trainer", "bench", "--steps", "2", "--warmup", "1", "--json",
                          "--algo", "locon"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["algo"] == "locon" and r["steps"] == 2
    assert r["images_per_s"] > 0 and r["it_per_s"] > 0 and r["peak_memory_gb"] > 0
    assert set(r["time_split_s"]) == {"data", "forward", "backward", "optimizer", "sampling", "saving"}
    assert r["flops_per_step"] > 0 and r["tflops"] > 0 and r["mfu"] is None  # no peak figure for a CPU
    # the loop reads one flag back from the device per step (loss and gradients finite), nothing else; the host's
    # transformers 4.30 adds one of its own in every CLIP forward (its causal mask is filled from a device tensor)
    assert r["host_syncs_per_step"] == 1 + _clip_reads_back_a_tensor()
    assert r["ops_per_step"] > sum(r["top_ops"].values()) > 0 and "mm" in r["top_ops"]


def _clip_reads_back_a_tensor() -> bool:
    import inspect

    from transformers.models.clip import modeling_clip

    return "torch.tensor(torch.finfo(dtype).min, device=device)" in inspect.getsource(modeling_clip)


def test_adamw_takes_the_fused_kernels_where_torch_has_them():
    from lora_trainer.config import TrainConfig
    from lora_trainer.optim import _fused_supported, build_optimizer

    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    fused = build_optimizer(TrainConfig(optimizer_type="AdamW"), [{"params": params, "lr": 1e-3}])
    assert fused.defaults["fused"] is (True if _fused_supported([{"params": params}]) else None)
    chosen = build_optimizer(TrainConfig(optimizer_type="AdamW", optimizer_args=["foreach=False"]),
                             [{"params": params, "lr": 1e-3}])
    assert not chosen.defaults["fused"] and chosen.defaults["foreach"] is False  # the user's choice stands
    params[0].grad = torch.ones(4, 4)
    fused.step()
    assert torch.allclose(params[0], torch.full((4, 4), -1e-3), atol=1e-6)  # Adam's first step: -lr * sign


def test_bench_compare_reports_ratios():
    from lora_trainer.bench import compare

    r = compare({"gradient_checkpointing": True}, family="sd1", steps=1, warmup=0, device_name="cpu")
    assert r["changed"]["gradient_checkpointing"] is True and r["baseline"]["gradient_checkpointing"] is False
    assert r["speed_ratio"] > 0 and r["memory_ratio"] > 0


def test_full_size_bench_path_builds_the_family_from_its_spec(monkeypatch):
    """The GPU path (random full-size weights) exercised on the CPU with the tiny spec standing in."""
    from lora_trainer.backends import sd_configs
    from lora_trainer.bench import run_bench

    monkeypatch.setitem(sd_configs.FULL, "sdxl", sd_configs.TINY["tiny-sdxl"])
    r = run_bench(family="sdxl", resolution=64, steps=1, warmup=0, device_name="cpu", full_size=True)
    assert r["family"] == "sdxl" and r["images_per_s"] > 0


def test_shared_memory_spill_is_detected(monkeypatch):
    monkeypatch.setattr(memory, "total_memory_gb", lambda device: 8.0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 9.5 * 2**30)
    warning = memory.shared_memory_warning(torch.device("cuda"))
    assert warning and "9.5 GB on a 8.0 GB card" in warning
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7.0 * 2**30)
    assert memory.shared_memory_warning(torch.device("cuda")) is None


def test_previews_bring_offloaded_parts_back_one_at_a_time(monkeypatch):
    """With the text encoders and the VAE moved off the GPU (low-VRAM), a preview lends each back alone: encoders
    for the conditioning, then the UNet denoises with both away, then the VAE decodes (in tiles); the image is the
    one rendered with everything in place."""
    from lora_trainer.model import SamplePrompt

    bundle = tiny_bundle()
    prompt = SamplePrompt("a red square", width=64, height=64, seed=3, steps=2)
    with torch.no_grad():
        expected = bundle.sample([prompt])[0]
    events: list[str] = []
    parts = {"te": bundle.c.text_encoders[0], "unet": bundle.c.unet, "vae": bundle.c.vae}
    for name, module in parts.items():
        runner = module.decoder if name == "vae" else module  # the VAE decodes through its decoder
        runner.register_forward_pre_hook(lambda *_, name=name: events.append(f"{name} runs"))
        if name != "unet":
            monkeypatch.setattr(module, "to", lambda *a, name=name, m=module, **k: (
                events.append(f"{name} {'away' if str(a[0]) == 'cpu' else 'back'}"), torch.nn.Module.to(m, *a, **k))[1])
    bundle.device = torch.device("cpu:0")  # stands for the GPU: moves "back" name it, moves "away" say "cpu"
    bundle.offload("text_encoders")
    bundle.offload("vae")
    events.clear()
    with torch.no_grad():
        image = bundle.sample([prompt])[0]
    runs = [e for e in events if e.endswith("runs")]
    assert events[0] == "te back" and events[events.index("te away") - 1] == "te runs"
    first_unet, last_unet = runs.index("unet runs"), len(runs) - 1 - runs[::-1].index("unet runs")
    assert set(runs[:first_unet]) == {"te runs"} and set(runs[first_unet:last_unet + 1]) == {"unet runs"}
    assert events.index("te away") < events.index("unet runs") < events.index("vae back")
    assert events[-2:] == ["vae runs", "vae away"]
    assert bundle._away == {"text_encoders", "vae"}  # still away for training
    assert list(image.getdata()) == list(expected.getdata())


def test_a_vae_that_was_away_decodes_large_previews_in_tiles(monkeypatch):
    from lora_trainer.backends import diffusers_backend
    from lora_trainer.model import SamplePrompt

    monkeypatch.setattr(diffusers_backend, "PREVIEW_TILE", 32)
    bundle = tiny_bundle()
    vae = bundle.c.vae
    calls = []
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, _orig=vae.tiled_decode, **k: (calls.append(1),
                                                                                    _orig(*a, **k))[1])
    prompt = SamplePrompt("a red square", width=64, height=64, seed=3, steps=2)
    with torch.no_grad():
        whole = bundle.sample([prompt])[0]
        assert not calls
        bundle.offload("vae")
        tiled = bundle.sample([prompt])[0]
    assert calls and vae.use_tiling is False and vae.tile_sample_min_size == 64  # its settings put back
    assert tiled.size == whole.size and list(tiled.getdata()) != list(whole.getdata())
