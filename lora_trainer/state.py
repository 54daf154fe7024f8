"""Training state for exact resume: network parameters, optimizer, scheduler, loss scaler, every RNG, and where
in the run we are. A state folder is written under a temporary name, each file fsynced, and renamed into place, so
`resume` only ever sees a complete state, after a kill or a power cut.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .fileio import fsync_dir, fsync_file

STATE_VERSION = 1


@dataclass
class Position:
    """Where the run is: `step` optimizer steps done; in `epoch` (0-based), `batches_done` batches consumed."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0

    @property
    def epochs_started(self) -> int:
        """Epochs begun so far, counting a partly trained one (kohya's ss_epoch)."""
        return self.epoch + (1 if self.batches_done > 0 else 0)


@dataclass
class RunState:
    position: Position
    seed: int
    session_id: int
    started_at: float
    config_fingerprint: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epoch_losses: dict[str, list[float]] = field(default_factory=dict)
    micro_split: int = 1  # batches are split this many times after out-of-memory back-offs


def save_state(folder: str, *, run: RunState, network_state: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               py_rng: random.Random, noise_gen: torch.Generator) -> None:
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-state-", dir=parent)
    try:
        save_file({k: v.contiguous() for k, v in network_state.items()}, os.path.join(tmp, "network.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(), "noise_rng": noise_gen.get_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(tmp, "training.pt"))
        meta = {"version": STATE_VERSION, "run": asdict(run), "py_rng": _py_state_to_json(py_rng.getstate())}
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        for name in ("network.safetensors", "training.pt", "state.json"):
            fsync_file(os.path.join(tmp, name))
        fsync_dir(tmp)
        _replace_dir(tmp, folder)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: str, final: str) -> None:
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def recover(parent: str) -> None:
    """Finish what a process killed inside `_replace_dir` left: `X-state.old` without `X-state` becomes `X-state`
    again (the old state is complete; the new one never got its name), and a redundant `.old` is removed."""
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if not name.endswith("-state.old"):
            continue
        old, final = os.path.join(parent, name), os.path.join(parent, name[:-len(".old")])
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def load_state(folder: str) -> tuple[RunState, dict[str, torch.Tensor], dict[str, Any], tuple]:
    """(run state, network tensors, training blobs, python RNG state) or a UserError naming what is wrong."""
    folder = os.path.normpath(folder)
    recover(os.path.dirname(os.path.abspath(folder)))
    needed = ("network.safetensors", "training.pt", "state.json")
    if not os.path.isdir(folder):
        raise UserError(f"resume: state folder not found: {folder}")
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(f"resume: {folder} is not a complete training state (missing {', '.join(missing)}); point "
                        f"resume at a '<name>-state' folder written with save_state")
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("version") != STATE_VERSION:
        raise UserError(f"resume: {folder} was written by an incompatible version (state version "
                        f"{meta.get('version')})")
    r = meta["run"]
    run = RunState(Position(**r["position"]), r["seed"], r["session_id"], r["started_at"], r["config_fingerprint"],
                   r.get("metrics", []), r.get("epoch_losses", {}), r.get("micro_split", 1))
    network = load_file(os.path.join(folder, "network.safetensors"))
    blobs = torch.load(os.path.join(folder, "training.pt"), map_location="cpu", weights_only=True)
    return run, network, blobs, _py_state_from_json(meta["py_rng"])


def _py_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
