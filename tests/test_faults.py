"""Faults: a trainer killed at any moment leaves only files that load, and `resume` finishes the run.

The kill test runs `python -m lora_trainer train` as a child and SIGKILLs it many times: during startup, while it
caches latents, mid-step and in the middle of saves (caught by watching for the writers' `.tmp-*` names). After
every kill each visible output must load, and the next run resumes from the newest state as a user would. The unit
tests kill a process at the exact points inside `save_state` where a state folder is half written or half renamed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer import state as statemod
from lora_trainer.errors import UserError
from lora_trainer.fileio import TMP_PREFIX, clean_stale_temporaries
from lora_trainer.state import Position, RunState, load_state, recover, save_state
from lora_trainer.synthetic import make_dataset
from lora_trainer.train import train

from .conftest import base_config, kohya_keys, tiny_bundle

STEPS = 14  # 4 images, batch 2: 2 steps an epoch; no run is killed late enough to finish it
SEED = 20240611
POLL_S = 0.001
CHILD_TIMEOUT_S = 300.0
STEP_FILE = re.compile(r"^t-step(\d{8})\.safetensors$")
STEP_STATE = re.compile(r"^t-step(\d{8})-state$")
OUTPUT = re.compile(r"^t(-step\d{8})?(\.safetensors|-state)$")
SAVING = re.compile(r"^\.tmp-(state-|t(-step\d{8})?\.safetensors\.)")  # a network file or a state being written

needs_kill = pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"),
                                reason="needs POSIX signals and fork")


# == the kill test =====================================================================================================
@dataclass
class Kill:
    """When to kill the child:
    startup    after `delay` seconds (or at its first save, whichever comes first);
    caching    as the `count`-th temporary file appears in the latent cache (or at the first save: cache full);
    saving     as the `count`-th network file or state being written appears (under its temporary name);
    appearing  as the `count`-th new step file or state folder appears (where a non-atomic writer would be mid-write);
    training   `delay` seconds after the `count`-th new step file (mid-step, or in the next save)."""

    phase: str
    count: int = 1
    delay: float = 0.0


@dataclass
class Outcome:
    kill: Kill
    killed: bool
    returncode: int
    seconds: float
    left_behind: list[str] = field(default_factory=list)  # temporaries on disk right after the kill


def schedule(rng: random.Random) -> list[Kill]:
    """Startup first, then latent caching (only the first runs cache), then the rest in a random order."""
    rest = ["saving", "saving", "appearing", "appearing", "training", "startup"]
    rng.shuffle(rest)
    kills = [Kill("startup", delay=rng.uniform(0.2, 2.0)), Kill("caching", count=rng.randint(1, 3))]
    for phase in rest:
        if phase in ("saving", "appearing"):
            kills.append(Kill(phase, count=rng.randint(1, 3)))
        elif phase == "training":
            kills.append(Kill("training", count=rng.randint(1, 2), delay=rng.uniform(0.0, 0.2)))
        else:
            kills.append(Kill("startup", delay=rng.uniform(0.5, 6.0)))
    return kills


def write_config(tmp_path) -> tuple[str, str, str]:
    data = make_dataset(str(tmp_path / "data"), images=4, repeats=1, size=64)
    out = str(tmp_path / "out")
    cfg = {"pretrained_model_name_or_path": "tiny-sd1", "train_data_dir": data, "output_dir": out,
           "output_name": "t", "resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128,
           "bucket_reso_steps": 64, "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-3,
           "train_batch_size": 2, "max_train_steps": STEPS, "seed": 1234, "save_precision": "float",
           "save_every_n_steps": 1, "save_state": True, "cache_latents": True, "cache_latents_to_disk": True,
           "tag_occurrence_txt_file": False}
    path = str(tmp_path / "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return path, out, os.path.join(data, "1_shapetok", ".latent_cache")


def start(config: str, resume: str | None, log_base: str) -> subprocess.Popen:
    extra = ["--resume", resume] if resume else ["--overwrite", "true"]
    # one thread: the tiny model gains nothing from more, and on a busy machine OpenMP's spinning threads make a
    # run several times slower
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LYCORIS_KERNEL_BACKEND": "torch",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log_base + ".out", "wb") as stdout, open(log_base + ".err", "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", config, "--json", *extra],
                                stdout=stdout, stderr=stderr, env=env, start_new_session=True)


def listing(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


def temporaries(folder: str) -> set[str]:
    return {n for n in listing(folder) if n.startswith(TMP_PREFIX)}


class Trigger:
    """Decides, from what the child has put on disk so far, whether to kill it now."""

    def __init__(self, kill: Kill, out: str, cache: str):
        self.kill, self.out, self.cache = kill, out, cache
        self.t0 = time.monotonic()
        self.before = listing(out) | listing(cache)
        self.seen: set[str] = set()
        self.fire_at: float | None = None

    def due(self) -> bool:
        k, now = self.kill, time.monotonic()
        new = listing(self.out) - self.before
        new_steps = sum(1 for n in new if STEP_FILE.match(n))
        if k.phase == "startup":
            return now - self.t0 >= k.delay or new_steps > 0
        if k.phase in ("saving", "appearing"):
            self.seen |= {n for n in new if (SAVING if k.phase == "saving" else OUTPUT).match(n)}
            return len(self.seen) >= k.count
        if k.phase == "caching":
            self.seen |= temporaries(self.cache) - self.before
            return len(self.seen) >= k.count or new_steps > 0
        if self.fire_at is None and new_steps >= k.count:
            self.fire_at = now + k.delay
        return self.fire_at is not None and now >= self.fire_at


def run_and_kill(proc: subprocess.Popen, trigger: Trigger, log_base: str) -> Outcome:
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if trigger.due():
                stop(proc)
                left = sorted(temporaries(trigger.out) | temporaries(trigger.cache))
                return Outcome(trigger.kill, True, proc.returncode, time.monotonic() - t0, left)
            if time.monotonic() - t0 > CHILD_TIMEOUT_S:
                pytest.fail(f"the child ran past {CHILD_TIMEOUT_S}s: {tail(log_base)}")
            time.sleep(POLL_S)
        return Outcome(trigger.kill, False, proc.returncode, time.monotonic() - t0)
    finally:
        stop(proc)


def run_to_the_end(proc: subprocess.Popen, log_base: str) -> None:
    try:
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0, tail(log_base)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it runs in a session of its own), unless it has ended."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(log_base: str) -> str:
    with open(log_base + ".err", encoding="utf-8", errors="replace") as f:
        return f.read()[-3000:]


def expected_modules() -> set[str]:
    return {e["key"] for e in kohya_keys("sd1") if e["algo"] == "lora"}


def check_network_file(path: str, modules: set[str]) -> int:
    """The file loads, has the LoRA keys of every module and finite weights; returns its ss_steps."""
    tensors = load_file(path)
    assert {k.partition(".")[0] for k in tensors} == modules, path
    assert all(torch.isfinite(t).all() for t in tensors.values()), f"non-finite weights in {path}"
    with safe_open(path, "pt") as f:
        return int(f.metadata()["ss_steps"])


def check_outputs(out: str, cache: str, modules: set[str]) -> dict[str, int]:
    """Every visible output loads; returns {state folder: its step}."""
    for name in sorted(listing(out)):
        path = os.path.join(out, name)
        if name.endswith(".safetensors") and not name.startswith("."):
            steps = check_network_file(path, modules)
            m = STEP_FILE.match(name)
            assert steps == (int(m[1]) if m else STEPS), f"{name} says ss_steps={steps}"
        elif name.endswith(".json") and not name.startswith("."):
            with open(path, encoding="utf-8") as f:
                json.load(f)
    for name in sorted(n for n in listing(os.path.join(out, "logs")) if n.endswith(".png")):
        with Image.open(os.path.join(out, "logs", name)) as img:
            img.load()
    for name in sorted(n for n in listing(cache) if not n.startswith(".")):
        assert "latents" in load_file(os.path.join(cache, name)), name
    return check_states(out)


def check_states(out: str) -> dict[str, int]:
    states = {}
    for name in sorted(n for n in listing(out) if n.endswith("-state") and not n.startswith(".")):
        run, network, blobs, _ = load_state(os.path.join(out, name))  # raises on a torn or half-renamed state
        assert network and {"optimizer", "scheduler", "torch_rng", "noise_rng"} <= set(blobs), name
        m = STEP_STATE.match(name)
        assert run.position.step == (int(m[1]) if m else STEPS), f"{name} holds step {run.position.step}"
        states[os.path.join(out, name)] = run.position.step
    assert not [n for n in listing(out) if n.endswith("-state.old")], "recover left a .old folder behind"
    return states


def newest(states: dict[str, int]) -> str | None:
    """The state a user resumes from: the one furthest into the run."""
    return max(states, key=states.get) if states else None


def check_final(out: str, log_base: str, modules: set[str]) -> None:
    with open(log_base + ".out", encoding="utf-8") as f:
        summary = json.loads(f.read().strip().splitlines()[-1])
    assert summary["steps"] == STEPS and summary["final_file"] == os.path.join(out, "t.safetensors")
    assert not [p for p in summary["files"] if os.path.basename(p).startswith(TMP_PREFIX)]
    assert check_network_file(summary["final_file"], modules) == STEPS
    assert not temporaries(out), f"stale temporaries in {out}: {temporaries(out)}"
    with open(os.path.join(out, "logs", "t_metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == list(range(1, STEPS + 1)), f"the metrics history after resumes is {logged}"


@needs_kill
@pytest.mark.slow
def test_killed_at_random_moments_every_file_loads_and_resume_finishes(tmp_path):
    config, out, cache = write_config(tmp_path)
    modules = expected_modules()
    outcomes: list[Outcome] = []
    resume = None
    for i, kill in enumerate(schedule(random.Random(SEED))):
        log_base = str(tmp_path / f"run{i}")
        outcome = run_and_kill(start(config, resume, log_base), Trigger(kill, out, cache), log_base)
        outcomes.append(outcome)
        assert outcome.killed, f"run {i} ended by itself (rc {outcome.returncode}) before {kill}: {tail(log_base)}"
        assert outcome.returncode == -signal.SIGKILL
        resume = newest(check_outputs(out, cache, modules))
    report = "\n".join(f"{o.kill} after {o.seconds:.1f}s left {o.left_behind}" for o in outcomes)
    logging.getLogger(__name__).info("kills:\n%s", report)
    log_base = str(tmp_path / "final")
    t0 = time.monotonic()
    run_to_the_end(start(config, resume, log_base), log_base)
    logging.getLogger(__name__).info("final run from %s: %.1fs", resume, time.monotonic() - t0)
    check_outputs(out, cache, modules)
    check_final(out, log_base, modules)
    assert any(SAVING.match(n) for o in outcomes for n in o.left_behind), f"no kill landed inside a save:\n{report}"


LEFT_BY_A_KILL = {"log folder": ("out/logs", ".tmp-t_loss.png.a1b2c3d4"),
                  "latent cache": ("data/1_shapetok/.latent_cache", ".tmp-000.0123456789abcdef0123.safetensors.x1")}


@pytest.mark.parametrize("where", list(LEFT_BY_A_KILL))
def test_the_next_run_removes_the_temporaries_a_killed_run_left(tmp_path, where):
    """The kill test finds these: a chart or a latent being written when the kill came stays as a hidden `.tmp-*`
    file for good (harmless, never mistaken for output, but it piles up with every kill)."""
    folder, name = LEFT_BY_A_KILL[where]
    data = make_dataset(str(tmp_path / "data"), images=2, repeats=1, size=64, aspect_variety=False)
    os.makedirs(tmp_path / folder)
    (tmp_path / folder / name).write_bytes(b"torn")
    train(base_config(data, str(tmp_path / "out"), max_train_steps=1, cache_latents_to_disk=True), tiny_bundle())
    assert not temporaries(str(tmp_path / folder))


# == kills at exact points inside save_state ===========================================================================
def tiny_training(step: int):
    torch.manual_seed(step)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = RunState(Position(step=step, epoch=0, batches_done=step), seed=1, session_id=2, started_at=3.0,
                   config_fingerprint="f")
    return dict(run=run, network_state={k: v.detach() for k, v in net.state_dict().items()}, optimizer=opt,
                scheduler=sched, scaler=None, py_rng=random.Random(step),
                noise_gen=torch.Generator().manual_seed(step))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def save_and_die(folder: str, step: int, arm: Callable[[], None]) -> None:
    """Fork; the child arms a fatal wrapper around a library call and runs save_state; the parent waits. (The
    training state is built before the fork: the child only serialises, it runs no parallel torch kernels.)"""
    training = tiny_training(step)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            arm()
            save_state(folder, **training)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the save was not killed"


def on_call(module, name: str, n: int, after: bool = False, partial: Callable | None = None) -> Callable[[], None]:
    """An `arm` function: the n-th call of module.name dies before it (or after it, or after `partial` ran)."""

    def arm() -> None:
        real, calls = getattr(module, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n and not after:
                if partial is not None:
                    partial(*args, **kwargs)
                die()
            result = real(*args, **kwargs)
            if calls[0] == n:
                die()
            return result

        setattr(module, name, wrapper)

    return arm


def half_torch_save(obj, path) -> None:
    torch.serialization.save(obj, path)  # the real one: torch.save is the armed wrapper
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def remove_one_file(path, *args, **kwargs) -> None:
    os.remove(os.path.join(path, sorted(os.listdir(path))[0]))


# (how the save dies, the step load_state must find afterwards: 1 = the old state, 2 = the new one)
KILL_POINTS = {
    "writing training.pt": (on_call(statemod.torch, "save", 1, partial=half_torch_save), 1),
    "before renaming the old state away": (on_call(statemod.os, "replace", 1), 1),
    "between the two renames": (on_call(statemod.os, "replace", 2), 1),
    "right after the new state got its name": (on_call(statemod.os, "replace", 2, after=True), 2),
    "while removing the old state": (on_call(statemod.shutil, "rmtree", 2, partial=remove_one_file), 2),
}


@needs_kill
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_save_killed_inside_save_state_leaves_a_state_that_loads(tmp_path, point):
    arm, expected = KILL_POINTS[point]
    folder = str(tmp_path / "t-step00000001-state")
    save_state(folder, **tiny_training(1))
    save_and_die(folder, 2, arm)
    left = sorted(os.listdir(tmp_path))
    run, network, blobs, _ = load_state(folder)  # what `resume` does
    assert run.position.step == expected, f"killed {point}, left {left}: resumed at step {run.position.step}"
    assert set(network) == {"weight", "bias"} and blobs["optimizer"]["state"]
    clean_stale_temporaries(str(tmp_path))  # what the next run does first
    assert sorted(os.listdir(tmp_path)) == ["t-step00000001-state"], f"killed {point}, left {left}"


@needs_kill
def test_a_first_save_killed_before_its_rename_leaves_only_a_temporary(tmp_path):
    folder = str(tmp_path / "t-step00000001-state")
    save_and_die(folder, 1, on_call(statemod.os, "replace", 1))
    assert [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)], "the unfinished state was not left hidden"
    with pytest.raises(UserError, match="state folder not found: .*t-step00000001-state"):
        load_state(folder)
    assert clean_stale_temporaries(str(tmp_path)) == 1 and os.listdir(tmp_path) == []


def test_recover_puts_back_an_old_state_whose_successor_never_got_its_name(tmp_path):
    folder = str(tmp_path / "t-state")
    save_state(folder, **tiny_training(3))
    os.replace(folder, folder + ".old")  # what a kill between the two renames of _replace_dir leaves
    os.mkdir(tmp_path / ".tmp-state-abcd1234")
    recover(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".tmp-state-abcd1234", "t-state"]
    assert load_state(folder)[0].position.step == 3


def test_a_torn_state_folder_is_a_user_error_naming_what_is_missing(tmp_path):
    folder = str(tmp_path / "t-state")
    save_state(folder, **tiny_training(3))
    os.remove(os.path.join(folder, "training.pt"))
    with pytest.raises(UserError, match=r"t-state is not a complete training state \(missing training.pt\)"):
        load_state(folder)


def test_state_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """A power cut after the rename must not leave a complete-looking state with empty files: every file of the state
    is fsynced before the folder gets its name."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file behind a descriptor")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    training = tiny_training(1)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_state(str(tmp_path / "t-state"), **training)
    files = {os.path.basename(p): p for p in synced if os.path.basename(os.path.dirname(p)).startswith(TMP_PREFIX)}
    assert {"network.safetensors", "training.pt", "state.json"} <= set(files), f"fsynced: {synced}"
    assert [p for p in synced if os.path.basename(p).startswith(".tmp-state-")], "the state's own entries not fsynced"
    assert os.path.realpath(tmp_path) in synced, "the folder holding the renamed state was not fsynced"
