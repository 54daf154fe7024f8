"""Performance Wizard: settings that fit the GPU, each with a one-line reason.

`recommend(hardware, dataset, config)` is pure: a memory model (weights + network + optimizer state + activations,
per family, from the real module shapes) and a table of rules. Checkpointing, the 8-bit optimizer and offloading the
VAE are savings that each cost some speed: the batch is the largest that fits with every saving on, and a saving is
turned off only when the target batch still fits without it. That makes the choice monotonic: more VRAM never gives
a smaller batch and never turns a saving on. `probe()` (in bench.py) then measures real steps and keeps a margin.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import config as cfgmod
from .config import TrainConfig
from .optim import OPTIMIZERS

log = logging.getLogger(__name__)

GB = 2**30
SAFETY = 0.90  # use at most this share of the memory the training may take
OVERHEAD_GB = 0.6  # CUDA context, allocator slack, cuBLAS workspaces


@dataclass(frozen=True)
class HardwareInfo:
    device: str  # "cuda" | "cpu" | "mps"
    name: str = ""
    total_vram_gb: float = 0.0
    free_vram_gb: float = 0.0
    bf16: bool = False
    xformers: bool = False
    bitsandbytes: bool = False
    host_model_gb: float = 0.0  # the WebUI's loaded model: already in VRAM, and what we train on
    sdpa: bool = True

    @property
    def budget_gb(self) -> float:
        """Memory the training run may use: what is free, plus the host model it reuses, less a margin."""
        return max(0.0, (self.free_vram_gb + self.host_model_gb) * SAFETY - OVERHEAD_GB)


@dataclass(frozen=True)
class DatasetStats:
    num_images: int  # training samples per epoch (images x repeats)


@dataclass(frozen=True)
class FamilyMemory:
    unet: float  # parameters (billions)
    text_encoders: float
    vae: float
    act_per_mpix: float  # GB of activations per megapixel of image at fp16, without checkpointing
    act_per_mpix_ckpt: float  # ... with gradient checkpointing
    te_act: float  # GB per image when the text encoder trains
    lora_linear: tuple[int, int]  # network parameters per rank: (UNet, text encoders), attention + MLP layers
    locon_linear: int  # extra per rank for LoCon-style algorithms (ResNet 1x1, time embedding projections)
    locon_conv: int  # per conv rank (3x3 convs)


# Parameter counts per rank are sums over the real modules' (in + out) from the kohya key fixtures.
# Activations without checkpointing are calibrated on an H100 (`bench`, bf16, SDPA, text encoder trained, AdamW,
# rank 16) with 15% margin: SD1 at 512 px grew 1.22 GB per image from batch 1 to 16 (3.5 -> 21.8 GB), SDXL at
# 1024 px 8.3 GB per image from batch 1 to 4 (15.8 -> 40.7 GB); SD2 is scaled from SD1. The checkpointed figures
# stay priors that are at or above SD1's measured 0.79 GB per image at batch 8 (12.0 -> 8.6 GB).
FAMILIES = {
    "sd1": FamilyMemory(0.86, 0.123, 0.084, 4.3, 3.0, 0.25, (423_936, 165_888), 82_880, 544_000),
    "sd2": FamilyMemory(0.866, 0.340, 0.084, 4.7, 3.2, 0.35, (432_128, 423_936), 82_880, 544_000),
    "sdxl": FamilyMemory(2.57, 0.818, 0.084, 8.5, 2.2, 0.6, (2_659_840, 903_168), 58_560, 355_840),
}
BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MIN_RESOLUTION = {"sd1": 384, "sd2": 512, "sdxl": 768}


@dataclass(frozen=True)
class Pick:
    field: str
    value: Any
    reason: str


@dataclass
class Recommendation:
    picks: list[Pick]
    warnings: list[str] = field(default_factory=list)
    estimated_peak_gb: float = 0.0
    budget_gb: float = 0.0
    fits: bool = True

    def values(self) -> dict[str, Any]:
        return {p.field: p.value for p in self.picks}

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        return cfgmod.with_overrides(cfg, self.values())

    def as_dict(self) -> dict[str, Any]:
        return {"picks": [{"field": p.field, "value": p.value, "reason": p.reason} for p in self.picks],
                "warnings": self.warnings, "estimated_peak_gb": round(self.estimated_peak_gb, 2),
                "budget_gb": round(self.budget_gb, 2), "fits": self.fits}


# ------------------------------------------------------------------------------------------------------------
# The memory model


@dataclass(frozen=True)
class Plan:
    """The settings the memory model looks at."""

    family: str
    resolution: tuple[int, int]
    batch: int
    dtype_bytes: int  # base weights and activations: 2 for fp16/bf16, 4 for fp32
    checkpointing: bool
    train_te: bool
    te_cached: bool  # text encoders off the GPU
    vae_offloaded: bool
    network_params: int
    optimizer_bytes: int  # optimizer state per network parameter


def network_params(cfg: TrainConfig, family: str) -> int:
    fm = FAMILIES[family]
    if cfg.network_module == "ia3":
        return 200_000
    per_rank = fm.lora_linear[0] * cfg.train_unet + fm.lora_linear[1] * cfg.train_text_encoder
    n = per_rank * cfg.network_dim
    if cfg.network_module in cfgmod.CONV_ALGORITHMS and cfg.train_unet:
        n += fm.locon_linear * cfg.network_dim + fm.locon_conv * cfg.effective_conv_dim
    return n


def estimate_gb(p: Plan) -> float:
    fm = FAMILIES[p.family]
    te_on_gpu = p.train_te or not p.te_cached
    weights = fm.unet + (fm.text_encoders if te_on_gpu else 0) + (0 if p.vae_offloaded else fm.vae * 2)
    weights_gb = weights * 1e9 * p.dtype_bytes / GB
    network_gb = p.network_params * (4 + 4 + p.optimizer_bytes) / GB
    mpix = p.resolution[0] * p.resolution[1] / 1e6
    act = (fm.act_per_mpix_ckpt if p.checkpointing else fm.act_per_mpix) * mpix * p.dtype_bytes / 2
    act_gb = p.batch * (act + (fm.te_act if p.train_te else 0.0))
    return weights_gb + network_gb + act_gb


# ------------------------------------------------------------------------------------------------------------
# Rules


def _precision(hw: HardwareInfo, cfg: TrainConfig) -> list[Pick]:
    if hw.device != "cuda":
        return [Pick("mixed_precision", "no", f"{hw.device.upper()}: full fp32 (half precision is slow or unsupported"
                                              f" there)")]
    if hw.bf16:
        return [Pick("mixed_precision", "bf16", "bf16 is supported: as fast as fp16 and never overflows (no NaN)")]
    return [Pick("mixed_precision", "fp16", "no bf16 on this GPU: fp16 with loss scaling")]


def _save_precision(hw: HardwareInfo, cfg: TrainConfig) -> list[Pick]:
    return [Pick("save_precision", "fp16", "fp16 files are half the size and load in every WebUI and ComfyUI")]


def _attention(hw: HardwareInfo, cfg: TrainConfig) -> list[Pick]:
    if hw.sdpa:
        return [Pick("sdpa", True, "PyTorch's scaled-dot-product attention: flash/memory-efficient kernels, no "
                                   "extra package"), Pick("xformers", False, "not needed with SDPA")]
    if hw.xformers:
        return [Pick("xformers", True, "this PyTorch has no SDPA; xformers is installed"),
                Pick("sdpa", False, "not available")]
    return [Pick("sdpa", False, "not available"), Pick("xformers", False, "not installed")]


def _latent_cache(hw: HardwareInfo, cfg: TrainConfig, data: DatasetStats) -> list[Pick]:
    if cfg.color_aug or cfg.random_crop:
        return [Pick("cache_latents", False, "color_aug/random_crop change the image every step, so latents "
                                             "cannot be cached")]
    w, h = cfg.resolution_wh
    gb = data.num_images * (2 if cfg.flip_aug else 1) * 4 * (w // 8) * (h // 8) * 4 / GB
    disk = gb > 2.0
    why = f"latents take about {gb:.1f} GB: " + ("kept on disk and reused next run" if disk else "kept in memory")
    return [Pick("cache_latents", True, "encode each image once instead of every step (the VAE leaves the loop)"),
            Pick("cache_latents_to_disk", disk, why)]


def _text_cache(cfg: TrainConfig) -> list[Pick]:
    probe = replace(cfg, cache_text_encoder_outputs=True)
    if cfgmod._te_cache_problems(probe):
        return []
    return [Pick("cache_text_encoder_outputs", True, "the text encoders are not trained and captions are fixed: "
                                                     "encode them once and take the encoders off the GPU")]


def _plan(cfg: TrainConfig, family: str, batch: int, hw: HardwareInfo, *, checkpointing: bool, te_cached: bool,
          vae_offloaded: bool, eight_bit: bool, resolution: tuple[int, int] | None = None) -> Plan:
    opt = "AdamW8bit" if eight_bit else cfg.optimizer_type
    dtype = 4 if hw.device != "cuda" else 2
    return Plan(family, resolution or cfg.resolution_wh, batch, dtype, checkpointing, cfg.train_text_encoder,
                te_cached, vae_offloaded, network_params(cfg, family), OPTIMIZERS[opt].memory_per_param)


def _target_batch(cfg: TrainConfig, family: str, data: DatasetStats) -> tuple[int, str]:
    asked = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if asked > 1:
        return asked, f"keeps the effective batch you asked for ({asked})"
    cap = 4 if family == "sdxl" else 8
    target = max(1, min(cap, data.num_images))
    return target, (f"batch 1 was the default; up to {target} images per step keep the GPU busy (fewer, larger "
                    f"steps per epoch)")


def _fit(hw: HardwareInfo, cfg: TrainConfig, family: str, data: DatasetStats,
         te_cached: bool) -> tuple[list[Pick], list[str], float, bool]:
    budget = hw.budget_gb
    target, target_why = _target_batch(cfg, family, data)
    can_8bit = hw.device == "cuda" and hw.bitsandbytes and cfg.optimizer_type == "AdamW"
    can_offload = cfg.cache_latents

    def plan(batch: int, ckpt: bool, eight: bool, offload: bool, res=None) -> float:
        return estimate_gb(_plan(cfg, family, batch, hw, checkpointing=ckpt, te_cached=te_cached,
                                 vae_offloaded=offload, eight_bit=eight, resolution=res))

    frugal = dict(ckpt=True, eight=can_8bit, offload=can_offload)
    resolution, warnings = _resolution_cap(cfg, family, budget, lambda res: plan(1, res=res, **frugal))
    fitting = [b for b in BATCHES if b <= target and plan(b, res=resolution, **frugal) <= budget]
    # on a card that needs a lower resolution, train one image at a time (keeps the batch monotonic in VRAM)
    batch = 1 if resolution != cfg.resolution_wh else max(fitting, default=1)
    ckpt = plan(target, False, can_8bit, can_offload, resolution) > budget
    if not ckpt:
        batch = target
    eight = can_8bit and plan(batch, ckpt, False, can_offload, resolution) > budget
    offload = can_offload and plan(batch, ckpt, eight, False, resolution) > budget
    peak = plan(batch, ckpt, eight, offload, resolution) + OVERHEAD_GB
    fits = peak - OVERHEAD_GB <= budget
    accum = math.ceil(target / batch)
    picks = [
        Pick("train_batch_size", batch, f"{target_why}; {batch} per step fits in {budget:.1f} GB"
             if batch == target else f"{target_why}; {batch} is the largest that fits in {budget:.1f} GB"),
        Pick("gradient_accumulation_steps", accum, f"effective batch = batch x accumulation = {batch * accum}"),
        Pick("gradient_checkpointing", ckpt, "needed to fit: recomputes activations (~25% slower, a fraction of "
                                             "the memory)" if ckpt else "not needed: the batch fits without it"),
        Pick("offload_vae", offload, "moves the VAE (cached latents) off the GPU to make room" if offload else
             "not needed"),
    ]
    if cfg.optimizer_type == "AdamW" or eight:
        why = ("8-bit AdamW keeps a quarter of the optimizer state" if eight else
               "32-bit AdamW fits" if hw.device == "cuda" else "8-bit optimizers need a CUDA GPU")
        picks.append(Pick("optimizer_type", "AdamW8bit" if eight else "AdamW", why))
    if resolution != cfg.resolution_wh:
        picks.append(Pick("resolution", f"{resolution[0]},{resolution[1]}", "lowered until a single image fits"))
    if not fits:
        warnings.append(f"even with every saving this needs about {peak:.1f} GB and only {budget:.1f} GB is free: "
                        f"expect out-of-memory errors, or a much slower run if the driver spills into shared "
                        f"memory; lower network_dim or the resolution, or free GPU memory")
    return picks, warnings, peak, fits


def _resolution_cap(cfg: TrainConfig, family: str, budget: float,
                    cost: Callable[[tuple[int, int]], float]) -> tuple[tuple[int, int], list[str]]:
    w, h = cfg.resolution_wh
    floor = MIN_RESOLUTION[family]
    res = (w, h)
    while cost(res) > budget and min(res) - 64 >= floor:
        res = (res[0] - 64 * res[0] // max(res), res[1] - 64 * res[1] // max(res))
        res = (res[0] // 64 * 64, res[1] // 64 * 64)
    warnings = []
    if res != (w, h):
        warnings.append(f"resolution lowered from {w}x{h} to {res[0]}x{res[1]} so that one image fits in "
                        f"{budget:.1f} GB")
    return res, warnings


def recommend(hw: HardwareInfo, data: DatasetStats, cfg: TrainConfig, family: str) -> Recommendation:
    picks = _precision(hw, cfg) + _save_precision(hw, cfg) + _attention(hw, cfg)
    picks += _latent_cache(hw, cfg, data)
    work = cfg.replace(cache_latents=picks_value(picks, "cache_latents", cfg.cache_latents))
    text = _text_cache(work)
    picks += text
    fit, warnings, peak, fits = _fit(hw, work, family, data, te_cached=bool(text))
    picks += fit
    if hw.device == "cpu":
        warnings.append("no GPU: training runs on the CPU, which is only practical for the tiny test models")
    return Recommendation(picks, warnings, peak, hw.budget_gb, fits)


def refine_with_probe(rec: Recommendation, peaks: dict[int, float], hw: HardwareInfo,
                      target: int) -> Recommendation:
    """Replace the estimated batch by the largest measured one that stays within the memory margin."""
    limit = (hw.free_vram_gb + hw.host_model_gb) * SAFETY
    ok = [b for b, gb in peaks.items() if gb <= limit]
    measured = ", ".join(f"batch {b}: {gb:.1f} GB" for b, gb in sorted(peaks.items()))
    if not ok:
        rec.warnings.append(f"the probe found no batch that stays under {limit:.1f} GB ({measured or 'batch 1 ran out'}"
                            f" of memory): lower the resolution or network_dim")
        rec.fits = False
        return rec
    batch = max(ok)
    picks = [p for p in rec.picks if p.field not in ("train_batch_size", "gradient_accumulation_steps")]
    picks += [Pick("train_batch_size", batch, f"measured on this GPU ({measured}); {batch} stays under "
                                              f"{limit:.1f} GB"),
              Pick("gradient_accumulation_steps", math.ceil(target / batch), f"effective batch {target}")]
    return Recommendation(picks, rec.warnings, peaks[batch], rec.budget_gb, True)


def picks_value(picks: list[Pick], name: str, default: Any) -> Any:
    return next((p.value for p in picks if p.field == name), default)


# ------------------------------------------------------------------------------------------------------------
# Hardware


def detect_hardware(device: torch.device, host_model_gb: float = 0.0) -> HardwareInfo:
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    xformers = importlib.util.find_spec("xformers") is not None
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return HardwareInfo("cuda", torch.cuda.get_device_name(device), total / GB, free / GB,
                            torch.cuda.is_bf16_supported(), xformers, bnb, host_model_gb, sdpa)
    ram = _system_ram_gb()
    return HardwareInfo(device.type, device.type.upper(), ram, ram, device.type == "cpu", False, False, 0.0, sdpa)


def _system_ram_gb() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return 16.0


def simulated_hardware(vram_gb: float, bf16: bool = True, xformers: bool = False,
                       bitsandbytes: bool = True) -> HardwareInfo:
    return HardwareInfo("cuda", f"simulated {vram_gb:g} GB GPU", vram_gb, vram_gb, bf16, xformers, bitsandbytes)
