"""Double of the built-in Lora extension's `networks` module (extensions-builtin/Lora/networks.py, v1.10.1).

Keys are resolved to A1111 layer names with the shared fixtures, which record what the real extension resolves each
kohya key to (including q/k/v/out onto a fused MultiheadAttention); deltas are computed with A1111's formulas
(tests/a1111_emulation.py) and merged into the weights with a backup, as `network_apply_weights` does, and undone
from the backup when the wanted set of networks changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch
from modules import shared
from safetensors.torch import load_file

loaded_networks: list = []
available_networks: dict[str, str] = {}
_resolution_cache: dict[str, dict] = {}


@dataclass
class LoadedNetwork:
    name: str
    multiplier: float
    shorthash: str
    deltas: dict[str, dict] = field(default_factory=dict)  # a1111 layer name -> {"tensors", "chunk"}


def list_available_networks():
    available_networks.clear()
    root = shared.cmd_opts.lora_dir
    os.makedirs(root, exist_ok=True)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".safetensors", ".pt", ".ckpt")):
                available_networks[os.path.splitext(f)[0]] = os.path.join(dirpath, f)


def _family(model) -> str:
    return "sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False) else "sd1"


def _resolution(family: str) -> dict:
    if family not in _resolution_cache:
        from tests.conftest import fixture_path

        with open(fixture_path(f"kohya-{family}-keys.json"), encoding="utf-8") as f:
            _resolution_cache[family] = {e["key"]: e for e in json.load(f)}
    return _resolution_cache[family]


def _load(name: str, multiplier: float) -> LoadedNetwork:
    path = available_networks.get(name)
    if path is None:
        list_available_networks()
        path = available_networks[name]
    tensors = load_file(path)
    with open(path, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[:8], "little")
    net = LoadedNetwork(name, multiplier, hashlib.sha256(data[8 + header:]).hexdigest()[:12])
    table = _resolution(_family(shared.sd_model))
    grouped: dict[str, dict] = {}
    for k, v in tensors.items():
        mod, _, suffix = k.partition(".")
        grouped.setdefault(mod, {})[suffix] = v
    for key, w in grouped.items():
        entry = table.get(key)
        if entry is None:
            continue  # the real extension logs unmatched keys and goes on
        target = entry["via"] or entry["module"]
        chunk = None
        if entry["via"]:
            chunk = ("q", "k", "v", "out").index(re.search(r"_(q|k|v|out)_proj$", key).group(1))
        net.deltas.setdefault(target, []).append({"tensors": w, "chunk": chunk})
    return net


def activate(names_and_multipliers: list[tuple[str, float]]):
    """What extra_networks_lora.activate + load_networks + network_apply_weights amount to."""
    wanted = [(n, m) for n, m in names_and_multipliers]
    current = [(n.name, n.multiplier) for n in loaded_networks]
    if wanted == current:
        return
    mapping = shared.sd_model.network_layer_mapping
    for module in mapping.values():
        network_restore_weights_from_backup(module)
        module.network_current_names = ()
    loaded_networks.clear()
    loaded_networks.extend(_load(n, m) for n, m in wanted)
    for net in loaded_networks:
        for layer_name, parts in net.deltas.items():
            _apply(mapping[layer_name], parts, net.multiplier, net.name)


@torch.no_grad()
def _apply(module, parts: list[dict], multiplier: float, name: str) -> None:
    from tests.a1111_emulation import delta_weight

    is_mha = isinstance(module, torch.nn.MultiheadAttention)
    if getattr(module, "network_weights_backup", None) is None:
        module.network_weights_backup = ((module.in_proj_weight.detach().cpu().clone(),
                                          module.out_proj.weight.detach().cpu().clone()) if is_mha
                                         else module.weight.detach().cpu().clone())
    if is_mha and len(parts) < 4:
        return  # the real extension applies a fused attention's deltas only as a complete q/k/v/out set
    for part in parts:
        if is_mha:
            d = module.embed_dim
            idx = part["chunk"]
            target = module.out_proj.weight if idx == 3 else module.in_proj_weight[idx * d:(idx + 1) * d]
        else:
            target = module.weight
        target += delta_weight(part["tensors"], target, multiplier).to(target.dtype)
    module.network_current_names = ((name, multiplier),)


@torch.no_grad()
def network_restore_weights_from_backup(module):
    backup = getattr(module, "network_weights_backup", None)
    if backup is None:
        return
    if isinstance(module, torch.nn.MultiheadAttention):
        module.in_proj_weight.copy_(backup[0])
        module.out_proj.weight.copy_(backup[1])
    else:
        module.weight.copy_(backup)
