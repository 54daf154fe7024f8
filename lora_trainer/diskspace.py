"""Disk space: refuse a run that cannot write its files before it starts, and turn a full disk in the middle of a
run into a clear error that says which earlier saves are intact.

The estimate counts what the run will write with the configured intervals: network files (kept ones only with
save_last_n_*), training states (network + optimizer moments in fp32), latents cached to disk, and samples.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from .config import TrainConfig
from .errors import UserError
from .steps import StepPlan

log = logging.getLogger(__name__)

MARGIN_BYTES = 64 * 2**20  # logs, charts, configs, and file-system slack
_SAVE_BYTES = {"float": 4, "fp16": 2, "bf16": 2}
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@dataclass
class Need:
    folder: str
    bytes: int
    what: str


def network_saves(cfg: TrainConfig, plan: StepPlan) -> int:
    """Network files on disk at the end of the run (the final one included)."""
    epochs = (plan.epochs - 1) // cfg.save_every_n_epochs if cfg.save_every_n_epochs else 0
    if cfg.save_last_n_epochs:
        epochs = min(epochs, cfg.save_last_n_epochs)
    steps = (plan.total_steps - 1) // cfg.save_every_n_steps if cfg.save_every_n_steps else 0
    if cfg.save_last_n_steps and cfg.save_every_n_steps:
        steps = min(steps, math.ceil(cfg.save_last_n_steps / cfg.save_every_n_steps))
    return epochs + steps + 1


def estimate(cfg: TrainConfig, plan: StepPlan, n_params: int, latent_elements: int, samples: int) -> list[Need]:
    saves = network_saves(cfg, plan)
    needs = [Need(cfg.output_dir, saves * n_params * _SAVE_BYTES[cfg.save_precision],
                  f"{saves} network file(s)")]
    work = cfg.resolved_work_dir
    if cfg.save_state:
        needs.append(Need(work, saves * n_params * 4 * 4, f"{saves} training state(s)"))
    if samples:
        needs.append(Need(work, samples * 1_500_000, f"about {samples} sample image(s)"))
    if cfg.cache_latents and cfg.cache_latents_to_disk and cfg.train_data_dir:
        needs.append(Need(cfg.train_data_dir, latent_elements * 4 * (2 if cfg.flip_aug else 1), "cached latents"))
    return needs


def check(needs: list[Need]) -> None:
    """Sum the needs per file system and compare with its free space."""
    per_device: dict[int, tuple[str, int, list[str]]] = {}
    for n in needs:
        folder = _existing(n.folder)
        dev = os.stat(folder).st_dev
        path, total, whats = per_device.get(dev, (folder, 0, []))
        per_device[dev] = (path, total + n.bytes, whats + [n.what])
    for path, total, whats in per_device.values():
        free = shutil.disk_usage(path).free
        if total + MARGIN_BYTES > free:
            raise UserError(f"not enough free disk space in {path}: this run writes about {_mb(total + MARGIN_BYTES)}"
                            f" ({', '.join(whats)}) but only {_mb(free)} is free; free some space, choose another "
                            f"output_dir/work_dir, or keep fewer saves (save_last_n_epochs, save_state off)")


def _existing(folder: str) -> str:
    folder = os.path.abspath(folder or ".")
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


@contextlib.contextmanager
def writing(path: str, intact: list[str]) -> Iterator[None]:
    """Turn a full disk (or a folder that became read-only) while writing `path` into a clear UserError."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        kept = ", ".join(os.path.basename(p) for p in intact if os.path.exists(p)) or "none yet"
        raise UserError(f"cannot write {path}: {e.strerror or e}; nothing was half-written, and the files saved "
                        f"before are intact ({kept}). Free some space (or fix the folder's permissions) and resume "
                        f"or start again") from None
