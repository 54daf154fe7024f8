"""The network algorithms, as a table.

Each algorithm's parameters, initialisation and file layout come from the LyCORIS module classes (lycoris-lora
3.4.0 in the WebUI's torch 2.1, 4.x elsewhere). Their contribution to a layer's output is computed here, with
exactly the formulas the loaders use (A1111's `network_*.py`, ComfyUI, diffusers): a file then reproduces in
txt2img what the network did while training. This matters because LyCORIS's own LoHa/LoKr `get_diff_weight`
applies `alpha/dim` twice and its DyLoRA trains at `alpha/(b+1)` while loaders use `alpha/dim`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .targets import Target


@dataclass(frozen=True)
class NetworkSettings:
    dim: int = 16
    alpha: float = 8.0
    conv_dim: int = 16
    conv_alpha: float = 8.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    dylora_unit: int = 1
    lokr_factor: int = -1

    def rank_alpha(self, target: Target) -> tuple[int, float]:
        return (self.conv_dim, self.conv_alpha) if target.conv_kxk else (self.dim, self.alpha)


def _lycoris(module: str, cls: str) -> type:
    return getattr(importlib.import_module(f"lycoris.modules.{module}"), cls)


# ------------------------------------------------------------------------------------------------------------
# Builders: a LyCORIS module for one target layer


def _build_locon(t: Target, s: NetworkSettings) -> nn.Module:
    dim, alpha = s.rank_alpha(t)
    return _lycoris("locon", "LoConModule")(t.key, t.module, 1.0, lora_dim=dim, alpha=alpha, dropout=s.dropout,
                                            rank_dropout=s.rank_dropout, module_dropout=s.module_dropout,
                                            bypass_mode=True)


def _build_loha(t: Target, s: NetworkSettings) -> nn.Module:
    dim, alpha = s.rank_alpha(t)
    return _lycoris("loha", "LohaModule")(t.key, t.module, 1.0, lora_dim=dim, alpha=alpha,
                                          rank_dropout=s.rank_dropout, module_dropout=s.module_dropout)


def _build_lokr(t: Target, s: NetworkSettings) -> nn.Module:
    dim, alpha = s.rank_alpha(t)
    return _lycoris("lokr", "LokrModule")(t.key, t.module, 1.0, lora_dim=dim, alpha=alpha, factor=s.lokr_factor,
                                          rank_dropout=s.rank_dropout, module_dropout=s.module_dropout)


def _build_ia3(t: Target, s: NetworkSettings) -> nn.Module:
    return _lycoris("ia3", "IA3Module")(t.key, t.module, 1.0, module_dropout=s.module_dropout,
                                        train_on_input=t.on_input)


def _build_dylora(t: Target, s: NetworkSettings) -> nn.Module:
    dim, alpha = s.rank_alpha(t)
    return _lycoris("dylora", "DyLoraModule")(t.key, t.module, 1.0, lora_dim=dim, alpha=alpha,
                                              block_size=s.dylora_unit, module_dropout=s.module_dropout)


# ------------------------------------------------------------------------------------------------------------
# Deltas: what a module adds to its layer's output, in the loaders' formulas


def _conv_kwargs(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return {}


def _apply(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, **_conv_kwargs(layer))
    return F.linear(x, weight)


def _rank_mask(m: nn.Module, h: Tensor) -> Tensor:
    """kohya/LyCORIS rank dropout: drop whole rank channels of the down projection's output."""
    keep = (torch.rand(h.shape[1] if h.dim() == 4 else h.shape[-1], device=h.device) > m.rank_dropout).to(h.dtype)
    shape = (1, -1, 1, 1) if h.dim() == 4 else (*([1] * (h.dim() - 1)), -1)
    return h * keep.view(shape)


def delta_locon(m: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, float | Tensor]:
    down = m.lora_down.weight.to(x.dtype)
    up = m.lora_up.weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        h = F.conv2d(x, down, None, **_conv_kwargs(layer))
    else:
        h = F.linear(x, down.reshape(down.shape[0], -1))
    if m.rank_dropout and m.training:
        h = _rank_mask(m, h)
    y = F.conv2d(h, up) if isinstance(layer, nn.Conv2d) else F.linear(h, up.reshape(up.shape[0], -1))
    y = m.dropout(y) if isinstance(m.dropout, nn.Module) else y
    return y, _output_scale(m, y.dtype)


def _output_scale(m: nn.Module, dtype: torch.dtype) -> float | Tensor:
    """scale x multiplier, x the scalar when LyCORIS trains one (`use_scalar`); otherwise its scalar is a fixed
    buffer of 1.0 and a Python number saves each wrapped layer two kernel launches forward and backward."""
    factor = m.scale * m.multiplier
    return factor * m.scalar.to(dtype) if isinstance(m.scalar, nn.Parameter) else factor


def weight_locon(m: nn.Module, shape: torch.Size) -> Tensor:
    up, down = m.lora_up.weight, m.lora_down.weight
    w = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return w.reshape(shape) * (m.scale * m.scalar)


def weight_loha(m: nn.Module, shape: torch.Size) -> Tensor:
    w1 = m.hada_w1_a @ m.hada_w1_b
    w2 = m.hada_w2_a @ m.hada_w2_b
    return (w1 * w2).reshape(shape) * m.scale


def weight_lokr(m: nn.Module, shape: torch.Size) -> Tensor:
    w1 = m.lokr_w1 if m.use_w1 else m.lokr_w1_a @ m.lokr_w1_b
    w2 = m.lokr_w2 if m.use_w2 else m.lokr_w2_a @ m.lokr_w2_b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape) * m.scale


def _weight_delta(weight_fn: Callable[[nn.Module, torch.Size], Tensor]):
    def delta(m: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, float]:
        w = weight_fn(m, layer.weight.shape)
        if m.rank_dropout and m.training:
            keep = (torch.rand(w.shape[0], device=w.device) > m.rank_dropout).to(w.dtype)
            w = w * keep.view(-1, *([1] * (w.dim() - 1)))
        return _apply(layer, x, (w * (m.multiplier * m.scalar)).to(x.dtype)), 1.0
    return delta


def _dylora_factors(m: nn.Module) -> tuple[Tensor, Tensor]:
    """(down, up) of the ranks this forward uses: in training [0, (b+1)*unit) with only block b trainable."""
    if m.training:
        b = int(torch.randint(0, m.block_count, (1,)).item())  # torch RNG: replayed exactly under checkpointing
        downs = [d.detach() for d in m.down_list[:b]] + [m.down_list[b]]
        ups = [u.detach() for u in m.up_list[:b]] + [m.up_list[b]]
    else:
        downs, ups = list(m.down_list), list(m.up_list)
    return torch.cat(downs), torch.cat(ups, dim=1)


def delta_dylora(m: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, float]:
    """DyLoRA: each training forward uses a random leading block of ranks; the scale is alpha/dim, which is what
    loaders apply at every truncation (A1111's `dyn`), so each truncated rank is itself a valid LoRA."""
    down, up = (t.to(x.dtype) for t in _dylora_factors(m))
    if isinstance(layer, nn.Conv2d):
        h = F.conv2d(x, down.reshape(down.shape[0], -1, *layer.kernel_size), None, **_conv_kwargs(layer))
        y = F.conv2d(h, up[:, :, None, None])
    else:
        y = F.linear(F.linear(x, down), up)
    return y, m.scale * m.multiplier


def weight_dylora(m: nn.Module, shape: torch.Size) -> Tensor:
    down, up = _dylora_factors(m)
    return (up @ down).reshape(shape) * m.scale


def fused_weight(algo: Algorithm, m: nn.Module, shape: torch.Size) -> Tensor:
    """The weight delta of one projection of a fused attention (multiplier and rank dropout applied)."""
    w = algo.weight(m, shape)
    if m.rank_dropout and m.training and algo.name != "dylora":
        keep = (torch.rand(w.shape[0], device=w.device) > m.rank_dropout).to(w.dtype)
        w = w * keep.view(-1, *([1] * (w.dim() - 1)))
    return w * m.multiplier


def output_ia3(m: nn.Module, org_forward: Callable, x: Tensor, *args, **kwargs) -> Tensor:
    scale = (m.weight * m.multiplier + 1).to(x.dtype)
    if m.train_input:
        return org_forward(x * scale, *args, **kwargs)
    return org_forward(x, *args, **kwargs) * scale


# ------------------------------------------------------------------------------------------------------------
# Export: the tensors a loader reads, keyed by suffix


def export_lycoris(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in m.custom_state_dict().items()}


def export_ia3(m: nn.Module) -> dict[str, Tensor]:
    return {"weight": m.weight.detach(), "on_input": m.on_input.detach().clone()}


def export_dylora(m: nn.Module) -> dict[str, Tensor]:
    """Plain LoRA tensors (every loader reads DyLoRA files as LoRA); conv `lora_up` kept 4-D for diffusers."""
    layer = m.org_module[0]
    down = torch.cat([d.detach() for d in m.down_list])
    up = torch.cat([u.detach() for u in m.up_list], dim=1)
    if isinstance(layer, nn.Conv2d):
        down = down.reshape(down.shape[0], -1, *layer.kernel_size)
        up = up[:, :, None, None]
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": m.alpha.detach().clone()}


def import_dylora(m: nn.Module, tensors: dict[str, Tensor]) -> None:
    down = tensors["lora_down.weight"].reshape(m.lora_dim, -1)
    up = tensors["lora_up.weight"].reshape(tensors["lora_up.weight"].shape[0], m.lora_dim)
    unit = m.block_size
    with torch.no_grad():
        for i, p in enumerate(m.down_list):
            p.copy_(down[i * unit:(i + 1) * unit])
        for i, p in enumerate(m.up_list):
            p.copy_(up[:, i * unit:(i + 1) * unit])
        m.alpha.copy_(tensors["alpha"])
    m.scale = float(m.alpha) / m.lora_dim


def import_lycoris(m: nn.Module, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        params = dict(m.named_parameters()) | dict(m.named_buffers())
        for k, v in tensors.items():
            if k == "lora_up.weight" and "scalar" in params:  # the file holds up * scalar
                m.scalar.fill_(1.0)
            params[k].copy_(v.reshape(params[k].shape))
    if "alpha" in tensors and hasattr(m, "lora_dim"):
        m.scale = float(m.alpha) / m.lora_dim


# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    name: str
    conv: bool  # also wraps ResNet / sampler layers (3x3 convs at conv_dim)
    ia3: bool  # IA3 target set instead of the LoRA one
    build: Callable[[Target, NetworkSettings], nn.Module]
    export: Callable[[nn.Module], dict[str, Tensor]]
    load: Callable[[nn.Module, dict[str, Tensor]], None]
    # additive algorithms: what a module adds to its layer's output, as (output, factor to scale it by)
    delta: Callable[[nn.Module, nn.Module, Tensor], tuple[Tensor, float | Tensor]] | None = None
    weight: Callable[[nn.Module, torch.Size], Tensor] | None = None  # weight delta (fused attention projections)
    output: Callable | None = None  # algorithms that change the layer's output in another way (IA3)
    kohya_module: str = "lycoris.kohya"  # ss_network_module
    diffusers_loadable: bool = False
    file_keys: tuple[str, ...] = ()  # suffixes of a module's tensors, for checks and loaders


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("lora", False, False, _build_locon, export_lycoris, import_lycoris, delta=delta_locon,
              weight=weight_locon, kohya_module="networks.lora", diffusers_loadable=True,
              file_keys=("lora_down.weight", "lora_up.weight", "alpha")),
    Algorithm("locon", True, False, _build_locon, export_lycoris, import_lycoris, delta=delta_locon,
              weight=weight_locon, kohya_module="networks.lora", diffusers_loadable=True,
              file_keys=("lora_down.weight", "lora_up.weight", "alpha")),
    Algorithm("loha", True, False, _build_loha, export_lycoris, import_lycoris,
              delta=_weight_delta(weight_loha), weight=weight_loha,
              file_keys=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")),
    Algorithm("lokr", True, False, _build_lokr, export_lycoris, import_lycoris,
              delta=_weight_delta(weight_lokr), weight=weight_lokr, file_keys=("lokr_w1", "lokr_w2", "alpha")),
    Algorithm("ia3", False, True, _build_ia3, export_ia3, import_lycoris, output=output_ia3,
              file_keys=("weight", "on_input")),
    Algorithm("dylora", True, False, _build_dylora, export_dylora, import_dylora, delta=delta_dylora,
              weight=weight_dylora,
              kohya_module="networks.dylora", file_keys=("lora_down.weight", "lora_up.weight", "alpha")),
)}


@functools.cache
def lycoris_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lycoris-lora")
    except PackageNotFoundError:
        return "not installed"
