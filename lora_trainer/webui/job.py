"""A training run inside the WebUI: one at a time, in a worker thread, under the host's queue lock.

While it runs, txt2img requests wait in the same queue instead of generating on a half-trained model. Progress goes
to `shared.state` and the host's progress API (the standard progress bar, live preview and Interrupt button work),
the model is guarded by `HostGuard`, and the result is saved into the Lora folder and the Lora list refreshed.
"""

from __future__ import annotations

import html
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .. import config as cfgmod
from .. import runqueue
from ..config import TrainConfig
from ..errors import UserError
from ..logs import run_log, run_log_path
from ..model import SamplePrompt
from ..runqueue import RunQueue
from ..samples import load_prompts
from ..train import Progress, TrainCallbacks, train
from . import guard, host
from .bundle import WebUIBundle

log = logging.getLogger(__name__)

CHECK_LIMIT = 0.01  # the file, loaded by the WebUI's Lora, must render within 1 % of the live preview


class BusyError(UserError):
    """A run is already in progress."""


@dataclass
class JobStatus:
    state: str = "idle"  # idle, running, paused, finished, cancelled, failed
    id_task: str = ""
    phase: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    vram_gb: float | None = None  # peak memory so far
    outputs: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    final_file: str | None = None
    lora_name: str = ""
    preview_diff: float | None = None  # mean pixel difference: live preview vs the file through the WebUI's Lora
    check: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_config(cfg: TrainConfig, model: Any) -> TrainConfig:
    """The config as it runs inside the WebUI: files into the Lora folder, the rest under outputs/, the host's
    precision; the model and device are the loaded ones."""
    lora_dir = host.lora_dir()
    out = cfg.output_dir
    if not os.path.isabs(out):
        out = os.path.join(lora_dir, "" if out in ("", "output") else out)
    work = cfg.work_dir or os.path.join(_data_path(), "outputs", "train-lora", cfg.output_name)
    dtype = str(getattr(host.devices(), "dtype_unet", "torch.float32"))
    precision = "fp16" if "float16" in dtype and "bfloat" not in dtype else "bf16" if "bfloat16" in dtype else "no"
    if precision != cfg.mixed_precision:
        log.info("mixed_precision follows the WebUI's weights: %s", precision)
    return cfg.replace(output_dir=os.path.normpath(out), work_dir=work, mixed_precision=precision,
                       pretrained_model_name_or_path=host.checkpoint_title(model) or "webui", device="auto")


def _data_path() -> str:
    try:
        return host.mod("paths").data_path
    except (ImportError, AttributeError):
        return os.getcwd()


class TrainingJob:
    def __init__(self, cfg: TrainConfig, id_task: str):
        self.cfg = cfg
        self.status = JobStatus(state="running", id_task=id_task, phase="queued",
                                message="waiting for the WebUI's queue (a generation is running)")
        self.stop_requested = False
        self.pause_requested = False
        self.sample_requested = False
        self.thread = threading.Thread(target=self.run, name="lora-trainer", daemon=True)
        self._check_image: Image.Image | None = None
        self.effective_cfg: TrainConfig | None = None  # the config as it runs in the WebUI (folders, precision)
        self.abort_reason: str | None = None
        self._renders = 0  # preview images rendered so far (each is a unit of the WebUI's progress bar)
        self._class_images = 0  # class images this run generates (units of the bar before the training steps)
        self.log_file: str | None = None

    # -- the thread --------------------------------------------------------------------------------------------
    def run(self) -> None:
        call_queue, progress, state = host.mod("call_queue"), host.mod("progress"), host.state()
        with call_queue.queue_lock:
            progress.start_task(self.status.id_task)
            state.begin(job="train-lora")
            self._set(state="running", started_at=time.time(), message="preparing")
            try:
                self._train()
            except UserError as e:
                self._set(state="failed", error=str(e), message=str(e))
                log.error("Train LoRA: %s", e)
            except Exception as e:  # an internal error: keep the traceback in the console log and the run's log
                log.exception("Train LoRA failed")
                where = f" and in {self.log_file}" if self.log_file else ""
                self._set(state="failed", error=f"internal error: {e!r} (the traceback is in the WebUI console"
                                                f"{where})")
            finally:
                self.status.finished_at = time.time()
                state.end()
                progress.finish_task(self.status.id_task)

    def _train(self) -> None:
        model = host.current_model()
        if model is None:
            raise UserError("no checkpoint is loaded in the WebUI: pick one in the checkpoint dropdown first")
        cfg = host_config(self.cfg, model)
        self.effective_cfg = cfg
        guard.check(model, cfg)
        bundle = WebUIBundle(model)
        self.log_file = run_log_path(cfg.resolved_log_dir, cfg.output_name)
        with run_log(self.log_file), guard.HostGuard(model):
            result = train(cfg, bundle, self._callbacks(bundle))
            self._refresh_lora_list()
            if result.final_file and not result.stopped:
                self._final_check(bundle, cfg, result.final_file)
        stem = os.path.splitext(os.path.basename(result.final_file))[0] if result.final_file else cfg.output_name
        self._set(state="cancelled" if result.stopped else "finished", final_file=result.final_file,
                  outputs=result.files, lora_name=stem, phase="done",
                  message=self.abort_reason or self._summary(result.stopped, result.final_file))

    def _summary(self, stopped: bool, final: str | None) -> str:
        what = "cancelled" if stopped else "finished"
        if not final:
            return f"{what}; nothing was saved"
        check = self.status.check
        diff = f"; the saved file renders within {check['mean_diff'] * 100:.2f}% of the live preview" \
            if check.get("mean_diff") is not None else ""
        stem = os.path.splitext(os.path.basename(final))[0]
        return f"{what}: {final}{diff}. Use it in txt2img as <lora:{stem}:1>"

    # -- callbacks ---------------------------------------------------------------------------------------------
    def _callbacks(self, bundle: WebUIBundle) -> TrainCallbacks:
        state = host.state()

        def should_stop() -> bool:
            if self.stop_requested or state.interrupted or getattr(state, "stopping_generation", False):
                return True
            self.abort_reason = model_changed(bundle)
            return self.abort_reason is not None

        def sample_now() -> bool:
            asked, self.sample_requested = self.sample_requested, False
            return asked

        return TrainCallbacks(on_progress=self._on_progress, on_samples=self._on_samples, on_save=self._on_save,
                              should_stop=should_stop, should_pause=lambda: self.pause_requested,
                              sample_now=sample_now, before_detach=lambda final: self._render_live(bundle))

    def _on_progress(self, p: Progress) -> None:
        """Training progress updates every number; other phases (caching, sampling, saving) only say what they do."""
        state = host.state()
        if p.phase == "generating":  # the plan already counts the class images, so the total stays the same
            self._class_images = p.class_images_total
            state.job_count = p.total_steps + p.total_samples + p.class_images_total + 2
            state.job_no = p.class_images_done
        elif p.phase in ("training", "paused"):
            # the bar's units: a generated class image, a training step, a preview image (the WebUI counts those
            # itself), and the two renders of the end-of-run check; so it only ever moves forward and reaches 100%
            # at the very end
            done = p.step + self._renders + self._class_images
            state.job_count = max(p.total_steps + p.total_samples + self._class_images, done) + 2
            state.job_no = done
            self._set(step=p.step, total_steps=p.total_steps, epoch=p.epoch, total_epochs=p.total_epochs,
                      loss=p.loss, avg_loss=p.avg_loss, lr=p.lr, it_per_s=p.it_per_s, eta_s=p.eta_s,
                      vram_gb=p.peak_memory_gb)
        elif p.phase != "done":
            self._set(total_steps=p.total_steps or self.status.total_steps,
                      total_epochs=p.total_epochs or self.status.total_epochs)
        self._set(phase=p.phase, message=p.message or p.phase, state="paused" if p.phase == "paused" else "running")
        state.textinfo = status_text(self.status)  # the WebUI's progress bar shows it as plain text

    def _on_samples(self, paths: list[str]) -> None:
        self.status.samples.extend(paths)
        self._renders += len(paths)

    def _on_save(self, path: str) -> None:
        self.status.outputs.append(path)
        self._refresh_lora_list()

    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            setattr(self.status, k, v)

    # -- the Lora folder and the end-of-run check --------------------------------------------------------------
    @staticmethod
    def _refresh_lora_list() -> None:
        networks = host.lora_networks()
        if networks is not None:
            networks.list_available_networks()

    def _check_prompt(self) -> SamplePrompt:
        w, h = self.cfg.resolution_wh
        defaults = SamplePrompt("", width=w, height=h, sampler=self.cfg.sample_sampler, steps=20)
        prompts = load_prompts(self.cfg.sample_prompts, defaults, self.cfg.seed or 0) if self.cfg.sample_prompts \
            else []
        if prompts:
            return prompts[-1]
        return SamplePrompt(self.cfg.output_name, width=w, height=h, seed=self.cfg.seed or 0,
                            sampler=self.cfg.sample_sampler, steps=20)

    def _render_live(self, bundle: WebUIBundle) -> None:
        """The check prompt with the network still attached (what the previews showed)."""
        state = host.state()
        state.job_count = max(state.job_count, state.job_no + 2)
        state.job_no = state.job_count - 2  # each of the check's two renders moves the bar one unit
        self._set(phase="checking", message="checking the saved file through the WebUI's own Lora")
        state.textinfo = status_text(self.status)
        rendered = bundle.sample_with_info([self._check_prompt()], extra_networks=False)
        self._check_image = rendered[0][0] if rendered else None

    def _final_check(self, bundle: WebUIBundle, cfg: TrainConfig, final_file: str) -> None:
        """Render the same prompt through the WebUI's own Lora loader and compare with the live preview."""
        if self._check_image is None:
            return
        name = os.path.splitext(os.path.basename(final_file))[0]
        sp = self._check_prompt()
        sp.prompt = f"{sp.prompt} <lora:{name}:1>"
        rendered = bundle.sample_with_info([sp], extra_networks=True)
        if not rendered:
            return
        loaded, info = rendered[0]
        diff = mean_pixel_difference(self._check_image, loaded)
        self.status.preview_diff = diff
        self.status.check = {"prompt": sp.prompt, "mean_diff": diff, "ok": diff < CHECK_LIMIT,
                             "lora_applied": "Lora hashes" in info or f"<lora:{name}" in info}
        level = logging.INFO if diff < CHECK_LIMIT else logging.WARNING
        log.log(level, "Train LoRA: %s rendered through the WebUI's Lora differs from the live preview by %.3f%%",
                name, diff * 100)


def model_changed(bundle: WebUIBundle) -> str | None:
    """Why training must stop because the model under it changed (another checkpoint, or unloaded to the CPU)."""
    current = host.loaded_model()
    if current is not bundle.m or host.checkpoint_title(current) != bundle.checkpoint_title:
        return "cancelled: the WebUI switched to another checkpoint while training; what was trained is saved"
    if next(bundle.unet().parameters()).device != bundle.unet_device:
        return "cancelled: the model was moved off the GPU (Unload checkpoint?) while training; what was trained is " \
               "saved"
    return None


def mean_pixel_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference as a fraction of the full range (0 = identical, 1 = opposite)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB").resize(a.size), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0)


def _status_parts(s: JobStatus, with_eta: bool = True) -> list[str]:
    parts = []
    if s.total_steps:
        parts.append(f"step {s.step}/{s.total_steps}, epoch {s.epoch}/{s.total_epochs}")
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4f} (avg {s.avg_loss:.4f})")
    if s.it_per_s:
        parts.append(f"{s.it_per_s:.2f} it/s")
    if s.eta_s is not None and with_eta:
        parts.append(f"ETA {int(s.eta_s // 60)}:{int(s.eta_s % 60):02d}")
    if s.lr is not None:
        parts.append(f"lr {s.lr:.2e}")
    if s.vram_gb:
        parts.append(f"peak {s.vram_gb:.1f} GB")
    return parts


def status_text(s: JobStatus) -> str:
    """One plain line (the WebUI's progress bar puts it in textContent and adds its own ETA)."""
    head = f"{s.phase}: {s.message}" if s.phase == "generating" and s.message else s.phase or s.state
    return " · ".join([head, *_status_parts(s, with_eta=False)])


def status_html(s: JobStatus) -> str:
    text = " &middot; ".join([f"<b>{html.escape(s.state)}</b>", *(html.escape(p) for p in _status_parts(s))])
    if s.message and s.message != s.error:
        text += f"<br>{html.escape(s.message)}"
    if s.error:
        text += f"<br><span class='lora-trainer-error'>{html.escape(s.error)}</span>"
    return text


class JobManager:
    """The one training run the WebUI process can have at a time, and the queue of runs waiting behind it."""

    def __init__(self) -> None:
        self.job: TrainingJob | None = None
        self.queue: RunQueue | None = None
        self._queue_thread: threading.Thread | None = None
        self._queue_stop = False
        self._lock = threading.Lock()

    def busy(self) -> bool:
        return self._queue_running() or (self.job is not None and self.job.status.state in ("running", "paused"))

    def _queue_running(self) -> bool:
        return self._queue_thread is not None and self._queue_thread.is_alive()

    def start(self, cfg: TrainConfig, id_task: str = "") -> TrainingJob:
        cfg = cfgmod.validate(cfg)
        with self._lock:
            if self.busy():
                raise BusyError("a training run is already in progress; stop it first or wait for it to finish")
            self.queue = None
            return self._start_job(cfg, id_task)

    def _start_job(self, cfg: TrainConfig, id_task: str = "") -> TrainingJob:
        progress = host.mod("progress")
        id_task = id_task or progress.create_task_id("train-lora")
        progress.add_task_to_queue(id_task)
        self.job = TrainingJob(cfg, id_task)
        self.job.thread.start()
        return self.job

    # -- the queue ---------------------------------------------------------------------------------------------
    def start_queue(self, configs: list[TrainConfig]) -> RunQueue:
        """Run `configs` one after another (each checked, and duplicate output names refused, before the first)."""
        runs = runqueue.plan([cfgmod.validate(c) for c in configs])
        with self._lock:
            if self.busy():
                raise BusyError("a training run is already in progress; add to its queue or wait for it to finish")
            self.queue, self._queue_stop = RunQueue(runs), False
            self._queue_thread = threading.Thread(target=self._run_queue, args=(self.queue,),
                                                  name="lora-trainer-queue", daemon=True)
            self._queue_thread.start()
            return self.queue

    def enqueue(self, cfg: TrainConfig) -> RunQueue:
        """Add a run behind the running queue, or start a queue of one when nothing runs."""
        cfg = cfgmod.validate(cfg)
        with self._lock:
            queue = self.queue
            if queue is not None and self._queue_running():  # the queued runs carry its multi_run_folder
                planned = runqueue.plan([*queue.runs, cfg],
                                        refusal=f"{cfg.output_name} was not added to the queue (the queued runs go on)")
                queue.add(planned[-1])
                return queue
            if self.busy():
                raise BusyError("a single run (not a queue) is in progress; wait for it to finish")
        return self.start_queue([cfg])

    def _run_queue(self, queue: RunQueue) -> None:
        def one(cfg: TrainConfig) -> str:
            with self._lock:
                job = self._start_job(cfg)
            job.thread.join()
            if job.status.state == "failed":
                raise UserError(job.status.error)
            return job.status.state

        queue.run(one, should_stop=lambda: self._queue_stop)

    def status(self) -> dict[str, Any]:
        out = self.job.status.as_dict() if self.job else JobStatus().as_dict()
        out["queue"] = self.queue.as_list() if self.queue is not None else []
        return out

    def stop(self) -> None:
        self._queue_stop = True
        if self.job is not None:
            self.job.stop_requested = True

    def pause(self, paused: bool) -> None:
        if self.job is not None:
            self.job.pause_requested = paused

    def sample(self) -> None:
        if self.job is not None:
            self.job.sample_requested = True


MANAGER = JobManager()
