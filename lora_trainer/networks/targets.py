"""Which layers a network wraps, following kohya's rules, on any module tree.

kohya's LoRA wraps every Linear/Conv2d inside the attention blocks (`Transformer2DModel`: proj_in/out, to_q/k/v/out,
ff) and, for LoCon-style algorithms, also inside ResNet blocks and down/up samplers, where 3x3 convs use
`conv_dim`/`conv_alpha`; in the text encoder it wraps the q/k/v/out projections and the MLP. IA3 scales to_k, to_v
and the feed-forward output (the latter on its input). A tree kind says how to recognise those containers in a
diffusers or an ldm/sgm tree, so the same rules give the same keys whichever host built the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

KeyFn = Callable[[str], str]  # module path inside the part's root -> kohya key


@dataclass
class Target:
    key: str
    module: nn.Module  # the layer; for a fused projection, a weightless stand-in with its shape
    part: str  # "unet", "te", "te1", "te2"
    conv_kxk: bool = False  # a conv with a kernel larger than 1x1: uses conv_dim / conv_alpha
    on_input: bool = False  # IA3: scale the layer's input instead of its output
    fused: tuple[nn.MultiheadAttention, int] | None = None  # (attention, 0..3 = q, k, v, out) of a fused MHA


@dataclass
class PartTree:
    """One trainable part of a model (the UNet or a text encoder) as the network builder sees it."""

    part: str
    root: nn.Module
    kind: str  # a key of TREE_KINDS
    key_fn: KeyFn
    fused_attention_in_webui: bool = False  # SD2 TE, SDXL TE2: A1111 applies q/k/v/out only all together
    layers: int | None = None  # only the first N transformer layers (A1111's SD2 encoder runs 23 of 24)

    @property
    def is_unet(self) -> bool:
        return self.part == "unet"


@dataclass(frozen=True)
class UNetKind:
    attention: frozenset[str]
    conv_blocks: frozenset[str]


TREE_KINDS = {
    "diffusers_unet": UNetKind(frozenset({"Transformer2DModel"}),
                               frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})),
    "ldm_unet": UNetKind(frozenset({"SpatialTransformer"}), frozenset({"ResBlock", "Downsample", "Upsample"})),
}

_CLIP_LAYER = re.compile(r"(?:^|\.)(?:encoder\.)?layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_UNET_IA3 = re.compile(r"(?:^|\.)(attn[12]\.to_[kv]|ff\.net\.2)$")
_CLIP_IA3 = re.compile(r"(?:^|\.)(self_attn\.[kv]_proj|mlp\.fc2)$")


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


def _is_kxk(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)


def find_targets(tree: PartTree, *, conv: bool, ia3: bool = False) -> list[Target]:
    if tree.kind in TREE_KINDS:
        found = _unet_targets(tree, TREE_KINDS[tree.kind], conv, ia3)
    elif tree.kind == "hf_clip":
        found = _clip_targets(tree, ia3)
    elif tree.kind == "open_clip":
        found = _open_clip_targets(tree, ia3)
    else:
        raise ValueError(f"unknown tree kind {tree.kind!r}")
    keys = [t.key for t in found]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"duplicate network keys in {tree.part}")  # a naming bug, never user input
    return found


def _unet_targets(tree: PartTree, kind: UNetKind, conv: bool, ia3: bool) -> list[Target]:
    containers = set(kind.attention) | (set(kind.conv_blocks) if conv and not ia3 else set())
    out: dict[str, Target] = {}
    for name, module in tree.root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            if not _is_layer(child) or not child_name:
                continue
            path = f"{name}.{child_name}" if name else child_name
            if ia3 and not _UNET_IA3.search(path):
                continue
            if path not in out:
                out[path] = Target(tree.key_fn(path), child, tree.part, _is_kxk(child),
                                   on_input=ia3 and path.endswith("ff.net.2"))
    return list(out.values())


def _clip_targets(tree: PartTree, ia3: bool) -> list[Target]:
    out = []
    for path, module in tree.root.named_modules():
        if not isinstance(module, nn.Linear) or not _CLIP_LAYER.search(path):
            continue
        if ia3:
            if not _CLIP_IA3.search(path):
                continue
            # A1111 applies q/k/v/out to a fused nn.MultiheadAttention only as a complete set, so a k/v-only
            # network would silently do nothing there: keep IA3 to the MLP on those encoders.
            if tree.fused_attention_in_webui and "self_attn" in path:
                continue
        out.append(Target(tree.key_fn(path), module, tree.part, False, on_input=ia3 and path.endswith("mlp.fc2")))
    return out


_OPEN_CLIP_LAYER = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(attn|mlp\.c_fc|mlp\.c_proj)$")
_OPEN_CLIP_NAMES = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _open_clip_targets(tree: PartTree, ia3: bool) -> list[Target]:
    """OpenCLIP text towers (SD2, SDXL's second encoder): `resblocks.N.attn` is an nn.MultiheadAttention whose
    q/k/v live in one fused `in_proj_weight` and whose `out_proj.forward` is never called. Each projection gets a
    target named like HF CLIP's (`encoder.layers.N.self_attn.q_proj`, which is what kohya writes) with a weightless
    stand-in layer for its shape; the network wraps the attention module itself."""
    out = []
    for path, module in tree.root.named_modules():
        m = _OPEN_CLIP_LAYER.search(path)
        if not m or (tree.layers is not None and int(m.group(1)) >= tree.layers):
            continue
        layer, kind = m.group(1), m.group(2)
        if kind != "attn":
            if ia3 and kind != "mlp.c_proj":
                continue
            name = f"encoder.layers.{layer}.{_OPEN_CLIP_NAMES[kind]}"
            out.append(Target(tree.key_fn(name), module, tree.part, on_input=ia3))
        elif not ia3 and isinstance(module, nn.MultiheadAttention):
            out.extend(_projection_targets(tree, module, layer))
    return out


def _projection_targets(tree: PartTree, mha: nn.MultiheadAttention, layer: str) -> list[Target]:
    d = mha.embed_dim
    targets = []
    for idx, proj in enumerate(_PROJECTIONS):
        stand_in = nn.Linear(d, d, bias=False, device="meta")  # shape only; never called
        targets.append(Target(tree.key_fn(f"encoder.layers.{layer}.self_attn.{proj}"), stand_in, tree.part,
                              fused=(mha, idx)))
    return targets
