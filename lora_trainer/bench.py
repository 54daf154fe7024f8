"""`python -m lora_trainer bench`: measured speed and memory of real training steps, and the wizard's probe.

The benchmark runs the trainer's own pieces (dataset from cached latents, the network, the loss, the optimizer) on
a synthetic dataset, times each phase with device synchronisation (only here, never in training), counts the
FLOPs of one step with torch's FlopCounterMode, and reports images/s, it/s, peak memory, the time split and the
achieved TFLOP/s against the device's peak (MFU). On a GPU the model is the full-size family with random weights
(or a given checkpoint); on a CPU it is the tiny model, which tests the harness, not the speed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import config as cfgmod
from .config import TrainConfig
from .model import dtype_of
from .train import TrainCallbacks, Trainer, peak_memory_gb, resolve_device

log = logging.getLogger(__name__)

# dense bf16/fp16 tensor-core peak TFLOP/s by GPU name fragment (vendor datasheets, no sparsity)
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("RTX 4090", 165.2), ("RTX 4080", 97.5), ("RTX 3090", 71.0), ("RTX 3080", 59.5), ("A10G", 125.0),
               ("T4", 65.0), ("V100", 125.0))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


@dataclass
class Timers:
    seconds: dict[str, float] = field(default_factory=dict)
    sync: bool = True

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device) -> Iterator[None]:
        if self.sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        yield
        if self.sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


class Harness:
    """The trainer set up on a synthetic dataset: model prepared, network attached, latents cached."""

    def __init__(self, cfg: TrainConfig, bundle: Any, workdir: str, images: int = 16):
        from .synthetic import make_dataset

        w, h = cfg.resolution_wh
        images = max(images, cfg.train_batch_size)
        data = make_dataset(os.path.join(workdir, "data"), images=images, repeats=1, size=min(w, h),
                            aspect_variety=False)
        self.cfg = cfg.replace(train_data_dir=data, output_dir=os.path.join(workdir, "out"), save_json_only=False,
                               sample_prompts="", tag_occurrence_txt_file=False, overwrite=True,
                               max_train_steps=10_000, max_train_epochs=None, enable_bucket=False)
        self.t = Trainer(cfgmod.validate(self.cfg), bundle, TrainCallbacks())
        t = self.t
        t.dataset = t._build_dataset()
        t.plan = t._plan_steps()
        t.seed = 0
        t.resumed = None
        torch.manual_seed(0)
        t._prepare_model()
        t._build_network()
        t._cache_latents()
        t._cache_text_outputs()
        t._offload_cached_parts()
        t._build_optimizer()
        t._restore_or_start()
        self.device = t.device
        self._batches: list[list[int]] = []

    def next_batch(self) -> list[int]:
        if not self._batches:
            self._batches = self.t.dataset.epoch_batches(len(self._batches), self.cfg.train_batch_size, 0)
        return self._batches.pop()

    def step(self, timers: Timers | None = None) -> None:
        t, dev = self.t, self.device
        timers = timers or Timers(sync=False)
        with timers.phase("data", dev):
            batch = t.builder.build(self.next_batch(), t.py_rng, 1)
        with timers.phase("forward", dev), t.bundle.autocast(self.cfg.mixed_precision):
            loss = t._loss(batch)
        with timers.phase("backward", dev):
            (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
        with timers.phase("optimizer", dev):
            t._apply_gradients(loss.detach())

    def close(self) -> None:
        if self.t.network is not None:
            self.t.network.remove()
        self.t.bundle.restore()


_NO_KERNEL = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh"})


def _is_view(func: Any) -> bool:
    """A view or alias of its input (view, t, transpose, detach...) or a bare allocation: no kernel runs for it."""
    return func.overloadpacket.__name__ in _NO_KERNEL or \
        any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def count_step_ops(h: Harness) -> dict[str, Any]:
    """The operators one training step dispatches (forward, backward, optimizer), views left out: on a GPU each
    is at least one kernel launch, so this is the figure that says whether a step is launch-bound, and it is the
    same on any machine. Reading a value back from the training device (`.item()`, `bool(t)`) is a host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device_type = h.device.type

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, int] = {}
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense" and args[0].device.type == device_type:
                self.syncs += 1
            elif not _is_view(func):
                self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        h.step()
    top = sorted(counter.ops.items(), key=lambda kv: -kv[1])[:8]
    return {"ops_per_step": sum(counter.ops.values()), "host_syncs_per_step": counter.syncs, "top_ops": dict(top)}


def count_step_flops(h: Harness) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter:
        h.step()
    return float(counter.get_total_flops())


def bench_config(family: str, resolution: int | None, batch: int, algo: str, overrides: dict[str, Any],
                 device: torch.device) -> TrainConfig:
    res = resolution or (64 if device.type == "cpu" else {"sd1": 512, "sd2": 768, "sdxl": 1024}[family])
    base = TrainConfig(network_module=algo, network_dim=16, network_alpha=8.0, train_batch_size=batch,
                       resolution=str(res), mixed_precision="no" if device.type == "cpu" else "bf16",
                       optimizer_type="AdamW", seed=0, device=str(device))
    return cfgmod.with_overrides(base, overrides)


def load_model(family: str, model: str, device: torch.device, dtype: torch.dtype, full_size: bool | None = None):
    """A bundle: the given checkpoint, the full-size family with random weights (default on a GPU), or the tiny
    model (default on a CPU)."""
    from .backends.diffusers_backend import DiffusersBundle, load_bundle

    if model:
        return load_bundle(model, device=device)
    if not (device.type == "cuda" if full_size is None else full_size):
        return load_bundle(f"tiny-{family}", device=device)
    from .backends.components import SDComponents, build_from_spec
    from .backends.sd_configs import FULL
    from .backends.tokenizer import clip_tokenizer

    spec = FULL[family]
    with torch.device(device):  # random init straight on the GPU: seconds, not minutes
        unet, vae, tes = build_from_spec(spec)
    comps = SDComponents(family, unet.to(dtype), vae, [te.to(dtype) for te in tes],
                         [clip_tokenizer(p) for p in spec.pad_tokens], spec.prediction_type, spec.scaling_factor,
                         dict(spec.schedule), source=f"random-{family}", vae_id=f"random-{family}")
    return DiffusersBundle(comps, device)


def run_bench(family: str = "sd1", resolution: int | None = None, batch: int = 1, algo: str = "lora",
              steps: int = 10, warmup: int = 3, overrides: dict[str, Any] | None = None, model: str = "",
              device_name: str = "auto", full_size: bool | None = None) -> dict[str, Any]:
    device = resolve_device(device_name)
    cfg = bench_config(family, resolution, batch, algo, overrides or {}, device)
    bundle = load_model(family, model, device, dtype_of(cfg.mixed_precision), full_size)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as work:
        h = Harness(cfg, bundle, work)
        try:
            return _measure(h, steps, warmup)
        finally:
            h.close()


def _measure(h: Harness, steps: int, warmup: int) -> dict[str, Any]:
    dev = h.device
    for _ in range(warmup):
        h.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    timers = Timers()
    t0 = time.perf_counter()
    for _ in range(steps):
        h.step(timers)
    elapsed = time.perf_counter() - t0
    peak_gb = peak_memory_gb(dev)  # of the training steps alone: sampling below reloads the offloaded parts
    flops = count_step_flops(h)
    ops = count_step_ops(h)
    step_s = elapsed / steps
    extra = _time_sample_and_save(h)
    peak = peak_tflops(dev)
    achieved = flops / step_s / 1e12 if flops else None
    cfg = h.cfg
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "family": h.t.bundle.family, "resolution": cfg.resolution, "batch": cfg.train_batch_size,
        "algo": cfg.network_module, "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing, "steps": steps,
        "it_per_s": 1.0 / step_s, "images_per_s": cfg.train_batch_size / step_s,
        "peak_memory_gb": peak_gb, "peak_memory_with_sampling_gb": peak_memory_gb(dev),
        "time_split_s": {**{k: v / steps for k, v in timers.seconds.items()}, **extra},
        "flops_per_step": flops, "tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if achieved and peak else None, **ops,
    }


def _time_sample_and_save(h: Harness) -> dict[str, float]:
    from .model import SamplePrompt, eval_mode
    from .networks.export import save_network

    w, hh = h.cfg.resolution_wh
    t = time.perf_counter()
    with torch.no_grad(), eval_mode(h.t.network):
        h.t.bundle.sample([SamplePrompt("a photo", width=w, height=hh, seed=0, steps=4)])
    sample_s = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        save_network(os.path.join(d, "n.safetensors"), h.t.network.export_state_dict(), {}, "fp16")
    return {"sampling": sample_s, "saving": time.perf_counter() - t}


def compare(change: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The same benchmark twice, with and without one change; ratios of the second to the first."""
    base_over = dict(kw.pop("overrides", {}) or {})
    base = run_bench(overrides=base_over, **kw)
    changed = run_bench(overrides={**base_over, **change}, **kw)
    return {"baseline": base, "changed": changed, "change": change,
            "speed_ratio": changed["images_per_s"] / base["images_per_s"],
            "memory_ratio": (changed["peak_memory_gb"] / base["peak_memory_gb"]) if base["peak_memory_gb"] else None}


# ------------------------------------------------------------------------------------------------------------
# The wizard's probe


def probe(cfg: TrainConfig, bundle: Any, candidates: list[int], budget_gb: float, steps: int = 2) -> dict[int, float]:
    """Peak GPU memory (GB) of `steps` real training steps at each candidate batch, smallest first; stops at the
    first candidate that runs out of memory or exceeds the budget. Only meaningful on CUDA."""
    from . import memory

    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="lora-probe-") as work:
        for b in sorted(candidates):
            h = None
            try:
                h = Harness(cfg.replace(train_batch_size=b, gradient_accumulation_steps=1), bundle, work, images=b)
                torch.cuda.reset_peak_memory_stats(h.device)
                for _ in range(steps):
                    h.step()
                results[b] = torch.cuda.max_memory_allocated(h.device) / 2**30
            except Exception as e:
                if not memory.is_oom(e):
                    raise
                log.info("probe: batch %d ran out of memory", b)
                break
            finally:
                if h is not None:
                    h.close()
                memory.free(torch.device("cuda"))
            if results[b] > budget_gb:
                break
    return results
