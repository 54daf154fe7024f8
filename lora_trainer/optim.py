"""Optimizer and learning-rate scheduler tables.

Each optimizer entry says how to build it, its default arguments (Prodigy: what the diffusers team recommends for
LoRA) and which package it needs; a missing package is a clear error naming the pip package. Schedules are pure
functions of the step (diffusers' definitions), wrapped in a LambdaLR.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import TrainConfig, parse_optimizer_args
from .errors import UserError


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    factory: Callable[[], type]
    defaults: dict[str, Any] = field(default_factory=dict)
    package: str = ""  # pip package when not in torch
    recommended_lr: float | None = None  # adaptive optimizers want 1.0
    memory_per_param: int = 8  # bytes of optimizer state per fp32 parameter (for the wizard)
    fusable: bool = False  # torch's own, with a fused (single multi-tensor kernel) implementation


def _import(module: str, attr: str, package: str) -> Callable[[], type]:
    def load() -> type:
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise UserError(f"optimizer needs the '{package}' package ({e}); install it with: pip install {package}") \
                from None
    return load


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with an explicit learning rate, as kohya runs it (relative_step=False,
    scale_parameter=False, no first moment): factored second moments for matrices, update clipping at 1."""

    def __init__(self, params, lr: float = 1e-4, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = grad * grad + group["eps"][0]
        if grad.dim() >= 2:
            rows = state.setdefault("exp_avg_sq_row", torch.zeros(grad.shape[:-1], device=p.device))
            cols = state.setdefault("exp_avg_sq_col", torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=p.device))
            rows.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
            cols.mul_(beta2).add_(sq.mean(dim=-2), alpha=1 - beta2)
            r = (rows / rows.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = grad * r * cols.unsqueeze(-2).rsqrt()
        else:
            v = state.setdefault("exp_avg_sq", torch.zeros_like(grad))
            v.mul_(beta2).add_(sq, alpha=1 - beta2)
            update = grad * v.rsqrt()
        rms = update.norm() / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        if group["weight_decay"]:
            p.mul_(1 - group["weight_decay"] * group["lr"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("AdamW", lambda: torch.optim.AdamW, {"weight_decay": 0.01}, fusable=True),
    OptimizerSpec("AdamW8bit", _import("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"), {"weight_decay": 0.01},
                  "bitsandbytes", memory_per_param=2),
    OptimizerSpec("Lion", lambda: Lion, {}, memory_per_param=4),
    OptimizerSpec("Lion8bit", _import("bitsandbytes.optim", "Lion8bit", "bitsandbytes"), {"weight_decay": 0.01},
                  "bitsandbytes", memory_per_param=1),
    OptimizerSpec("Prodigy", _import("prodigyopt", "Prodigy", "prodigyopt"),
                  {"safeguard_warmup": True, "use_bias_correction": True, "betas": (0.9, 0.99),
                   "weight_decay": 0.01}, "prodigyopt", recommended_lr=1.0, memory_per_param=16),
    OptimizerSpec("Adafactor", lambda: Adafactor, {}, memory_per_param=1),
    OptimizerSpec("DAdaptAdam", _import("dadaptation", "DAdaptAdam", "dadaptation"), {"weight_decay": 0.01},
                  "dadaptation", recommended_lr=1.0, memory_per_param=12),
    OptimizerSpec("SGDNesterov", lambda: torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, memory_per_param=4),
)}


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Config values to set when the user picks this optimizer (adaptive ones want learning rates of 1.0)."""
    spec = OPTIMIZERS[name]
    if spec.recommended_lr is None:
        return {}
    lr = spec.recommended_lr
    return {"learning_rate": lr, "unet_lr": lr, "text_encoder_lr": lr}


def build_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    spec = OPTIMIZERS[cfg.optimizer_type]
    cls = spec.factory()
    user = parse_optimizer_args(cfg.optimizer_args)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in user if k not in accepted]
        if unknown:
            raise UserError(f"optimizer_args: {cfg.optimizer_type} does not take {', '.join(unknown)}; it takes "
                            f"{', '.join(n for n in accepted if n not in ('self', 'params'))}")
    kwargs = {**spec.defaults, **user}
    groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups]
    if spec.fusable and not {"fused", "foreach"} & set(user) and _fused_supported(groups):
        kwargs["fused"] = True
    try:
        return cls(groups, lr=groups[0]["lr"], **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"optimizer_args for {cfg.optimizer_type}: {e}") from None


def _fused_supported(groups: list[dict]) -> bool:
    """torch's fused optimizer kernels take every parameter's update in a few launches (foreach: one per chunk of
    tensors and operation; the CPU default: several per parameter plus a host read of its step count)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    return all(p.device.type in devices and p.is_floating_point() for g in groups for p in g["params"])


# ------------------------------------------------------------------------------------------------------------
# Schedules: step -> multiplier of the base learning rate


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / (warmup + 1) if step < warmup else None


def constant(step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    return 1.0


def constant_with_warmup(step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def linear(step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_with_restarts(step: int, total: int, warmup: int, cycles: int, power: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def polynomial(step: int, total: int, warmup: int, cycles: int, power: float, lr_end_ratio: float = 1e-3) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    if step >= total:
        return lr_end_ratio
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return (1 - lr_end_ratio) * remaining ** power + lr_end_ratio


SCHEDULES: dict[str, Callable[..., float]] = {f.__name__: f for f in (
    constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)}


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """lr_warmup_steps is a count, or a ratio of the total when below 1."""
    w = cfg.lr_warmup_steps
    return int(w * total_steps) if w < 1 else int(w)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    fn = SCHEDULES[cfg.lr_scheduler]
    warm = warmup_steps(cfg, total_steps)
    cycles, power = cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power
    return LambdaLR(optimizer, lambda step: fn(step, total_steps, warm, cycles, power))
