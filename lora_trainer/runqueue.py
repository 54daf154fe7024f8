"""Several configs run one after another (`train --config a.json --config b.json`, the tab's queue, a JSON array
posted to the API).

Everything that can be checked without training is checked for every config before the first run starts: each
config's options, that no two runs share an output name (the name is how a LoRA is picked in a prompt),
and (by the caller, through `train.preflight`) each dataset and output folder. With
`multi_run_folder` each run gets its own `run{N}` folder under it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import config as cfgmod
from .config import TrainConfig
from .errors import UserError

log = logging.getLogger(__name__)


def plan(configs: Sequence[TrainConfig], multi_run_folder: str = "",
         refusal: str = "the queue cannot start") -> list[TrainConfig]:
    """The configs as they will run: validated, each in `multi_run_folder/run{N}` when that is set (the argument,
    else the first config that sets one); refuses duplicate output names before anything runs."""
    if not configs:
        raise UserError("the queue is empty: give at least one config")
    folder = multi_run_folder or next((c.multi_run_folder for c in configs if c.multi_run_folder), "")
    runs = []
    for i, cfg in enumerate(configs, 1):
        if folder:
            run_dir = os.path.join(folder, f"run{i}")
            cfg = cfg.replace(output_dir=run_dir, work_dir="", log_dir="", multi_run_folder=folder)
        runs.append(cfgmod.validate(cfg))
    check_duplicates(runs, refusal)
    return runs


def check_duplicates(runs: Sequence[TrainConfig], refusal: str = "the queue cannot start") -> None:
    """Two runs with one output name would overwrite each other's files, or (in their own run folders) give two
    LoRAs the WebUI's Lora list cannot tell apart; names are compared ignoring case, as that list and many disks do."""
    first: dict[str, int] = {}
    problems = []
    for i, cfg in enumerate(runs, 1):
        key = cfg.output_name.casefold()
        if key in first:
            problems.append(f"runs {first[key]} and {i} both have output_name {cfg.output_name!r}")
        first.setdefault(key, i)
    if problems:
        raise UserError(f"{refusal}: " + "; ".join(problems) + ". Give each run its own output_name")


@dataclass
class QueueEntry:
    position: int
    output_name: str
    output_dir: str
    state: str = "queued"  # queued, running, finished, cancelled, failed, skipped
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"position": self.position, "output_name": self.output_name, "output_dir": self.output_dir,
                "state": self.state, "message": self.message}


@dataclass
class RunQueue:
    """The runs of a queue and how each went; `run(one)` runs them in order, stopping the rest on a stop request."""

    runs: list[TrainConfig]
    entries: list[QueueEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.entries:
            self.entries = [QueueEntry(i, c.output_name, c.output_dir) for i, c in enumerate(self.runs, 1)]

    def run(self, one: Callable[[TrainConfig], str], should_stop: Callable[[], bool] = lambda: False) -> bool:
        """`one` trains a config and returns its end state; a UserError fails that run and the queue goes on
        (its options were checked up front; a full disk or a NaN streak in one run need not stop the others).
        Returns True when every run finished."""
        for cfg, entry in zip(self.runs, self.entries):
            if should_stop():
                entry.state, entry.message = "skipped", "the queue was stopped"
                continue
            entry.state = "running"
            log.info("queue: run %d of %d (%s)", entry.position, len(self.runs), cfg.output_name)
            try:
                entry.state = one(cfg)
            except UserError as e:
                entry.state, entry.message = "failed", str(e)
                log.error("queue: run %d (%s) failed: %s", entry.position, cfg.output_name, e)
            if entry.state == "cancelled":
                for rest in self.entries[entry.position:]:
                    rest.state, rest.message = "skipped", "the queue was cancelled"
                break
        return all(e.state == "finished" for e in self.entries)

    def add(self, cfg: TrainConfig) -> None:
        """Another run at the end (also while the queue runs: `run` picks it up)."""
        self.runs.append(cfg)
        self.entries.append(QueueEntry(len(self.runs), cfg.output_name, cfg.output_dir))

    def as_list(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.entries]
