"""Reading network files (network_weights): safetensors, or the .ckpt/.pt kohya writes with torch.save."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError


def read_network_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(f"network_weights: file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise UserError(f"network_weights: {path} is not a readable network file ({e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"network_weights: {path} does not hold a flat dict of tensors")
    return tensors
