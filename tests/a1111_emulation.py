"""Test oracle: what AUTOMATIC1111 v1.10.1's built-in Lora extension does with a file's tensors.

Written from reading `extensions-builtin/Lora/network_{lora,hada,lokr,ia3}.py`, `lyco_helpers.py` and
`network.py` (`finalize_updown`, `calc_scale`) at tag v1.10.1: for every module, the weight delta the extension
merges into the layer, `updown * alpha/dim * multiplier` (IA3: `W * w`, no alpha).
"""

from __future__ import annotations

import torch


def _scale(w: dict[str, torch.Tensor], dim: int | None) -> float:
    if "scale" in w:
        return float(w["scale"])
    if dim is not None and "alpha" in w:
        return float(w["alpha"]) / dim
    return 1.0


def _lora(w: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()
    if down.dim() == 2 and weight.dim() == 4:  # A1111 reshapes 2-D LoRA tensors to 1x1 convs
        down = down.reshape(down.shape[0], -1, 1, 1)
    shape = [up.shape[0], down.shape[1]] + (list(down.shape[2:]) if down.dim() == 4 else [])
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
    return updown, down.shape[0]


def _hada(w: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    w1a, w1b, w2a, w2b = (w[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    shape = [w1a.shape[0], w1b.shape[1]] + (list(w1b.shape[2:]) if w1b.dim() == 4 else [])
    u1 = (w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)).reshape(shape)
    u2 = (w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)).reshape(shape)
    return u1 * u2, w1b.shape[0]


def _lokr(w: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"].float()
    else:
        w1 = w["lokr_w1_a"].float() @ w["lokr_w1_b"].float()
        dim = w["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"].float()
    else:
        w2 = w["lokr_w2_a"].float() @ w["lokr_w2_b"].float()
        dim = w["lokr_w2_b"].shape[0]
    shape = list(weight.shape) if weight.dim() == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape), dim


def delta_weight(w: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The delta A1111 merges into `weight` for one module's tensors."""
    weight = weight.float()
    if "on_input" in w:  # IA3
        scale = w["weight"].float()
        scale = scale.reshape(1, -1) if int(w["on_input"]) else scale.reshape(-1, 1)
        return weight * scale * multiplier
    if "lora_up.weight" in w:
        updown, dim = _lora(w, weight)
    elif "hada_w1_a" in w:
        updown, dim = _hada(w, weight)
    elif any(k.startswith("lokr_") for k in w):
        updown, dim = _lokr(w, weight)
    else:
        raise AssertionError(f"A1111 would raise: no module type accepts keys {sorted(w)}")
    return updown.reshape(weight.shape) * _scale(w, dim) * multiplier


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        mod, _, suffix = k.partition(".")
        out.setdefault(mod, {})[suffix] = v
    return out


@torch.no_grad()
def merge_into(modules_by_key: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor],
               multiplier: float = 1.0) -> list[str]:
    """Merge every module's delta into its layer, as A1111 does; returns the keys that matched no layer."""
    unmatched = []
    for key, w in group_by_module(tensors).items():
        layer = modules_by_key.get(key)
        if layer is None:
            unmatched.append(key)
            continue
        layer.weight += delta_weight(w, layer.weight, multiplier).to(layer.weight.dtype)
    return unmatched


@torch.no_grad()
def merge_into_targets(targets, tensors: dict[str, torch.Tensor], multiplier: float = 1.0) -> list[str]:
    """Like `merge_into`, for network targets; q/k/v/out of a fused nn.MultiheadAttention are merged into the
    matching chunk of `in_proj_weight` or into `out_proj.weight`, as A1111 does for OpenCLIP text encoders."""
    by_key = {t.key: t for t in targets}
    unmatched = []
    for key, w in group_by_module(tensors).items():
        t = by_key.get(key)
        if t is None:
            unmatched.append(key)
            continue
        if t.fused is None:
            t.module.weight += delta_weight(w, t.module.weight, multiplier).to(t.module.weight.dtype)
            continue
        mha, idx = t.fused
        d = mha.embed_dim
        target = mha.out_proj.weight if idx == 3 else mha.in_proj_weight[idx * d:(idx + 1) * d]
        target += delta_weight(w, target, multiplier).to(target.dtype)
    return unmatched
