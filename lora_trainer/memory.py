"""GPU memory: recognising out-of-memory errors, splitting batches after one, and spotting shared-memory spill."""

from __future__ import annotations

import gc
import math

import torch

_OOM_TEXT = ("out of memory", "can't allocate memory", "cudnn_status_not_supported", "cuda error: out of memory")


def is_oom(e: BaseException) -> bool:
    oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def split_batch(indices: list[int], parts: int) -> list[list[int]]:
    """`indices` in `parts` nearly equal consecutive micro-batches (fewer when there are fewer samples)."""
    size = math.ceil(len(indices) / parts)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def total_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def shared_memory_warning(device: torch.device) -> str | None:
    """Drivers that fall back to system memory (Windows "sysmem fallback") let allocations exceed the card's VRAM
    and then run many times slower instead of failing; reserved memory above physical VRAM is the tell."""
    total = total_memory_gb(device)
    if total is None:
        return None
    reserved = torch.cuda.max_memory_reserved(device) / 2**30
    if reserved <= total:
        return None
    return (f"this run uses {reserved:.1f} GB on a {total:.1f} GB card: the driver is spilling into shared system "
            f"memory, which is many times slower. Use the Performance Wizard's settings (gradient checkpointing, "
            f"smaller batch, cached latents/text-encoder outputs) or turn off the driver's sysmem fallback.")
