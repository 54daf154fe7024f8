"""A trainable network over any model tree: build, attach, detach, optimise, export.

Layers are wrapped by replacing the *instance* `forward` of each target layer (never by swapping child modules), so
module names stay stable and the WebUI's own Lora extension, which patches `forward` at class level, keeps working
underneath. `remove()` puts every layer back exactly as it was: an instance `forward` that was not there before is
deleted rather than re-assigned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .algorithms import ALGORITHMS, Algorithm, NetworkSettings
from .targets import PartTree, Target, find_targets

log = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class _Attachment:
    layer: nn.Module
    previous_forward: object  # the instance attribute before we attached, or _MISSING


class LoraNetwork(nn.Module):
    def __init__(self, algorithm: str, trees: Iterable[PartTree], settings: NetworkSettings,
                 train_parts: Iterable[str] | None = None):
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise UserError(f"network_module: unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        self.algo: Algorithm = ALGORITHMS[algorithm]
        self.settings = settings
        wanted = set(train_parts) if train_parts is not None else None
        self.targets: list[Target] = []
        for tree in trees:
            if wanted is None or tree.part in wanted:
                self.targets.extend(find_targets(tree, conv=self.algo.conv, ia3=self.algo.ia3))
        if not self.targets:
            raise UserError(f"the {algorithm} network found no layer to train in this model")
        self.modules_by_key = nn.ModuleDict({t.key: self.algo.build(t, settings) for t in self.targets})
        self._parts = {t.key: t.part for t in self.targets}
        self._attached: dict[str, _Attachment] = {}
        self._multiplier = 1.0

    # -- attaching ---------------------------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Wrap every target layer's forward (fused attentions: the attention module's). Idempotent."""
        fused: dict[int, list[Target]] = {}
        for t in self.targets:
            if t.fused is not None:
                fused.setdefault(id(t.fused[0]), []).append(t)
            elif t.key not in self._attached:
                forward = self._make_forward(self.modules_by_key[t.key], t.module, t.module.forward)
                self._attach(t.key, t.module, forward)
        for group in fused.values():
            mha = group[0].fused[0]
            projections = {t.fused[1]: self.modules_by_key[t.key] for t in group}
            key = f"{group[0].key}#attention"
            if key not in self._attached:
                self._attach(key, mha, _fused_attention_forward(self.algo, mha, projections))

    def _attach(self, key: str, layer: nn.Module, forward) -> None:
        previous = layer.__dict__.get("forward", _MISSING)
        layer.forward = forward
        self._attached[key] = _Attachment(layer, previous)

    def remove(self) -> None:
        """Restore every wrapped layer exactly as it was before `apply_to`."""
        for att in self._attached.values():
            if att.previous_forward is _MISSING:
                att.layer.__dict__.pop("forward", None)
            else:
                att.layer.forward = att.previous_forward
        self._attached.clear()

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def _make_forward(self, mod: nn.Module, layer: nn.Module, org_forward):
        if self.algo.output is not None:
            return _output_forward(self.algo.output, mod, org_forward)
        return _additive_forward(self.algo.delta, mod, layer, org_forward)

    # -- multiplier / modes ------------------------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self._multiplier

    def set_multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for m in self.modules_by_key.values():
            m.multiplier = float(value)

    # -- optimisation ------------------------------------------------------------------------------------------
    def parameters_of(self, part_prefix: str) -> Iterator[nn.Parameter]:
        for key, m in self.modules_by_key.items():
            if self._parts[key].startswith(part_prefix):
                yield from m.parameters()

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """One group per part; a part with learning rate 0 is left out (frozen), as in kohya."""
        groups = []
        for name, prefix, lr in (("unet", "unet", unet_lr), ("text_encoder", "te", text_encoder_lr)):
            params = [p for p in self.parameters_of(prefix) if p.requires_grad]
            if params and lr > 0:
                groups.append({"params": params, "lr": lr, "name": name})
        if not groups:
            raise UserError("no parameter would be trained: every trained part has learning rate 0")
        return groups

    def trained_parts(self) -> set[str]:
        return set(self._parts.values())

    # -- export / import ---------------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, Tensor]:
        """kohya/LyCORIS-format tensors: `<key>.<suffix>`."""
        out = {}
        for key, m in self.modules_by_key.items():
            for suffix, tensor in self.algo.export(m).items():
                out[f"{key}.{suffix}"] = tensor.detach().cpu().contiguous()
        return out

    def load_exported(self, tensors: dict[str, Tensor], source: str) -> None:
        """Load a file written by `export_state_dict` (network_weights); shapes must match this network."""
        by_module: dict[str, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            mod_key, _, suffix = k.partition(".")
            by_module.setdefault(mod_key, {})[suffix] = v
        missing = [k for k in self.modules_by_key if k not in by_module]
        unexpected = [k for k in by_module if k not in self.modules_by_key]
        if unexpected:
            raise UserError(f"network_weights: {source} has {len(unexpected)} module(s) this {self.algo.name} network "
                            f"does not have (e.g. {unexpected[0]}); was it trained with another algorithm, model "
                            f"family or network_train_* setting?")
        expected = self.export_state_dict()
        problems = [f"{k}: file {tuple(v.shape)} vs network {tuple(expected[k].shape)}"
                    for k, v in tensors.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if problems:
            raise UserError(f"network_weights: {source} does not match network_dim/conv_dim/algorithm of this "
                            f"config ({len(problems)} tensor(s) differ, e.g. {problems[0]}); set the same rank as the "
                            f"file")
        for key, sub in by_module.items():
            m = self.modules_by_key[key]
            self.algo.load(m, {s: t.to(torch.float32) for s, t in sub.items()})
        if missing:
            log.warning("network_weights: %d module(s) are not in %s and start fresh", len(missing), source)

    # -- training state (exact, for resume) --------------------------------------------------------------------
    def training_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in
                list(self.named_parameters()) + [(n, b) for n, b in self.named_buffers() if n.endswith("alpha")]}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        own = dict(self.named_parameters()) | {n: b for n, b in self.named_buffers() if n.endswith("alpha")}
        if set(own) != set(state):
            raise UserError("the saved training state does not belong to this network (different algorithm, rank or "
                            "model); resume with the config it was saved with")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)


def _output_forward(output, mod: nn.Module, org_forward):
    def forward(x, *args, **kwargs):
        if _skip(mod):
            return org_forward(x, *args, **kwargs)
        return output(mod, org_forward, x, *args, **kwargs)
    return forward


def _additive_forward(delta, mod: nn.Module, layer: nn.Module, org_forward):
    def forward(x, *args, **kwargs):
        out = org_forward(x, *args, **kwargs)
        if _skip(mod):
            return out
        y, factor = delta(mod, layer, x)
        y = y.to(out.dtype)
        if isinstance(factor, Tensor):  # a trained LyCORIS scalar
            return out + y * factor
        return torch.add(out, y, alpha=factor)  # scale and sum in one kernel
    return forward


def _fused_attention_forward(algo, mha: nn.MultiheadAttention, projections: dict[int, nn.Module]):
    """nn.MultiheadAttention with the network's q/k/v deltas added to the fused `in_proj_weight` chunks and the out
    delta to `out_proj.weight` (which is exactly how A1111 applies such a file), computed like the module's own
    (non-fast-path) forward."""
    from .algorithms import fused_weight

    d = mha.embed_dim

    def delta(i: int) -> torch.Tensor | None:
        m = projections.get(i)
        return None if m is None or _skip(m) else fused_weight(algo, m, torch.Size((d, d)))

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        dq = [delta(i) for i in range(3)]
        in_w = mha.in_proj_weight
        if any(x is not None for x in dq):
            zero = torch.zeros((d, d), device=in_w.device, dtype=in_w.dtype)
            in_w = in_w + torch.cat([x.to(in_w.dtype) if x is not None else zero for x in dq])
        out_d = delta(3)
        out_w = mha.out_proj.weight if out_d is None else mha.out_proj.weight + out_d.to(mha.out_proj.weight.dtype)
        if mha.batch_first:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, d, mha.num_heads, in_w, mha.in_proj_bias, mha.bias_k, mha.bias_v, mha.add_zero_attn,
            mha.dropout, out_w, mha.out_proj.bias, training=mha.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        return (out.transpose(1, 0) if mha.batch_first else out), weights
    return forward


def _skip(mod: nn.Module) -> bool:
    """kohya/LyCORIS module dropout: skip the whole layer's delta for this forward."""
    return bool(mod.module_dropout) and mod.training and bool(torch.rand(1) < mod.module_dropout)
