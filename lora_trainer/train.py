"""The training loop: `train(config, bundle, callbacks) -> TrainResult`.

`Trainer.run` reads top to bottom: scan the dataset and print the step arithmetic, prepare the model, attach the
network, cache latents, build the optimizer and schedule, optionally resume, then loop over epochs and batches,
saving and sampling at the configured intervals. Everything the loop changes on the model is undone in `finally`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import classimages, diskspace, losses, memory
from . import config as cfgmod
from .config import TrainConfig
from .data.buckets import BucketPlanner
from .data.captions import CaptionOptions, find_caption, format_tag_file
from .data.concepts import file_text, load_concepts, sample_requests
from .data.dataset import Dataset, build_dataset
from .data.images import parse_color
from .data.pipeline import CACHE_DIR, AugmentOptions, Batch, BatchBuilder, LatentCache, TextCache, cache_latents
from .errors import UserError
from .fileio import TMP_PREFIX, atomic_write_text, atomic_write_with, clean_stale_temporaries
from .logs import MetricsLog, TensorBoardLog, write_charts
from .model import ModelBundle, SamplePrompt, TrainingSetup, dtype_of, eval_mode
from .networks.algorithms import NetworkSettings
from .networks.export import RunInfo, build_metadata, legacy_checkpoint_hash, save_network
from .networks.network import LoraNetwork
from .optim import build_optimizer, build_scheduler, warmup_steps
from .samples import load_prompts
from .state import Position, RunState, load_state, save_state
from .state import recover as recover_states
from .steps import StepPlan, plan_steps

log = logging.getLogger(__name__)


@dataclass
class Progress:
    phase: str  # scanning, generating (class images), caching, training, sampling, saving, paused, done
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    peak_memory_gb: float | None = None
    message: str = ""
    total_samples: int = 0  # preview images the configured intervals will render
    class_images_done: int = 0  # generating: class images saved so far
    class_images_total: int = 0  # generating: class images this run makes


@dataclass
class TrainCallbacks:
    on_progress: Callable[[Progress], None] | None = None
    on_samples: Callable[[list[str]], None] | None = None
    on_save: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None
    should_pause: Callable[[], bool] | None = None
    sample_now: Callable[[], bool] | None = None
    before_detach: Callable[[str | None], None] | None = None  # after the final save, network still attached


@dataclass
class TrainResult:
    output_dir: str
    final_file: str | None
    files: list[str]
    samples: list[str]
    charts: list[str]
    steps: int
    epochs: int
    plan: StepPlan
    first_epoch_loss: float | None
    last_epoch_loss: float | None
    peak_memory_gb: float
    seconds: float
    stopped: bool
    state_dir: str | None = None
    skipped_steps: int = 0  # not applied: NaN/inf loss or gradients
    dataset_summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.as_dict()
        return d


def train(cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks | None = None) -> TrainResult:
    return Trainer(cfgmod.validate(cfg), bundle, callbacks or TrainCallbacks()).run()


def preflight(cfg: TrainConfig) -> StepPlan:
    """Check the dataset and the output folder before anything heavy (loading a checkpoint) happens."""
    trainer = Trainer(cfgmod.validate(cfg), None, TrainCallbacks())  # type: ignore[arg-type]
    trainer.dataset = trainer._build_dataset()
    trainer.plan = trainer._plan_steps()
    trainer._check_outputs()
    return trainer.plan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name} requested but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)


def config_fingerprint(cfg: TrainConfig) -> str:
    """Hash of the options that shape the training trajectory (not paths, intervals or lengths)."""
    ignore = {"output_dir", "work_dir", "output_name", "resume", "overwrite", "save_json_only", "json_load_skip_list",
              "training_comment", "log_with", "log_dir", "max_train_epochs", "max_train_steps", "device"}
    ignore |= {n for n in cfgmod.field_names() if n.startswith(("save_", "sample_"))}
    d = {k: v for k, v in cfgmod.to_dict(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: TrainConfig, bundle: ModelBundle, callbacks: TrainCallbacks):
        self.cfg = cfg
        self.bundle = bundle
        self.cb = callbacks
        # A host that owns the model (the WebUI) fixes the device; headless runs pick it from the config.
        self.device = getattr(bundle, "fixed_device", None) or resolve_device(cfg.device)
        self.prior_metrics: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.sample_files: list[str] = []
        self.epoch_files: list[str] = []
        self.step_files: list[tuple[int, str]] = []
        self.epoch_losses: dict[str, list[float]] = {}
        self.stopped = False
        self.split = 1  # micro-batches per batch; doubles after an out-of-memory error
        self.nonfinite_streak = 0
        self.skipped_steps = 0  # steps not applied because the loss or gradients were NaN/inf
        self._warned_shared = False
        self.text_cache: TextCache | None = None
        self._last_sample_step = -1
        self.t0 = time.time()

    # ==========================================================================================================
    def run(self) -> TrainResult:
        cfg = self.cfg
        for w in cfgmod.warnings_for(cfg):
            log.warning("%s", w)
        self._progress("scanning", message="scanning the dataset")
        self.dataset = self._build_dataset()
        self.plan = self._plan_steps()
        log.info("steps: %s", self.plan.explain())
        self._check_outputs()
        if cfg.save_json_only:
            return self._dry_run()
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
        self.resumed = load_state(cfg.resume) if cfg.resume else None
        if self.resumed is not None:
            self.seed = self.resumed[0].seed
        torch.manual_seed(self.seed)
        self.network: LoraNetwork | None = None
        try:
            self._prepare_model()
            self._generate_class_images()
            if self.stopped:
                return self._result(None, Position())
            self._build_network()
            self._check_disk_space()
            self._cache_latents()
            if self.stopped:
                return self._result(None, Position())
            self._cache_text_outputs()
            self._offload_cached_parts()
            self._build_optimizer()
            position = self._restore_or_start()
            self._open_logs()
            self._write_tag_file()
            self._maybe_sample_first(position)
            position = self._train_loop(position)
            final = self._save_final(position)
            if self.cb.before_detach is not None and not self.stopped:
                for part in self._offloaded():
                    self.bundle.reload(part)
                with torch.no_grad(), eval_mode(self.network):
                    self.cb.before_detach(final)
        finally:
            if self.network is not None:
                self.network.remove()
            self.bundle.restore()
            self._close_logs()
        return self._result(final, position)

    # -- dataset / plan ----------------------------------------------------------------------------------------
    def _build_dataset(self) -> Dataset:
        """Scan the folders and concepts, and plan the class images they still lack (`self.class_jobs`)."""
        c = self.cfg
        planner = BucketPlanner(c.resolution_wh, c.enable_bucket, c.min_bucket_reso, c.max_bucket_reso,
                                c.bucket_reso_steps, c.bucket_no_upscale)
        if not hasattr(self, "concepts"):
            self.concepts = load_concepts(c.concepts_list) if c.concepts_list.strip() else []
        ds = build_dataset(c.train_data_dir, c.reg_data_dir, planner, c.caption_extension, self.concepts,
                           c.resolved_work_dir, c.num_class_images_per)
        rep = ds.report
        log.info("dataset: %d training image(s), %d regularisation image(s), %d bucket(s); %d skipped",
                 len(ds.train_items), len(ds.reg_items), len(ds.bucket_counts()), len(rep.skipped))
        defaults = classimages.ClassSettings(c.class_negative_prompt, c.class_guidance_scale, c.class_infer_steps,
                                             c.sample_sampler)
        self.class_jobs = classimages.plan_class_images(ds, defaults, c.caption_extension)
        if self.class_jobs:
            log.info("class images: %d to generate in %s", sum(j.count for j in self.class_jobs),
                     ", ".join(sorted({j.folder for j in self.class_jobs})))
        return ds

    def _generate_class_images(self) -> None:
        """Make the missing class images with the model (before the network is attached), then scan again."""
        jobs = self.class_jobs
        if not jobs:
            return
        total = sum(j.count for j in jobs)
        self.planned_samples = self._planned_samples()  # so the progress bar's total is known from here on

        def progress(done: int, n: int) -> None:
            self._progress("generating", message=f"class images {done}/{n}", class_images_done=done,
                           class_images_total=n)
        with torch.no_grad():
            made = classimages.generate(jobs, self.bundle, progress, self._should_stop)
        if made < total:
            self.stopped = True
            log.warning("stopped while generating class images: %d of %d saved; the next run makes the rest",
                        made, total)
            return
        log.info("class images: %d generated", made)
        self.dataset = self._build_dataset()
        self.plan = self._plan_steps()

    def _plan_steps(self) -> StepPlan:
        c = self.cfg
        ds = classimages.with_planned(self.dataset, getattr(self, "class_jobs", []))
        return plan_steps(num_images=len(ds.train_items), num_train_images=ds.num_train_images,
                          num_reg_images=ds.num_reg_images, batches_per_epoch=ds.batches_per_epoch(c.train_batch_size),
                          batch_size=c.train_batch_size, gradient_accumulation_steps=c.gradient_accumulation_steps,
                          max_train_epochs=c.max_train_epochs, max_train_steps=c.max_train_steps,
                          num_buckets=len(ds.bucket_counts()))

    def _final_path(self) -> str:
        return os.path.join(self.cfg.output_dir, f"{self.cfg.output_name}.{self.cfg.save_model_as}")

    def _check_outputs(self) -> None:
        try:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"output_dir: cannot create {self.cfg.output_dir}: {e.strerror}") from None
        if not os.access(self.cfg.output_dir, os.W_OK):
            raise UserError(f"output_dir: {self.cfg.output_dir} is not writable; choose another folder")
        work = self.cfg.resolved_work_dir
        for folder in (self.cfg.output_dir, work, os.path.join(work, "sample"), self.cfg.resolved_log_dir):
            clean_stale_temporaries(folder)
        recover_states(work)
        if self.cfg.overwrite or self.cfg.resume or self.cfg.save_json_only:
            return
        existing = self._existing_outputs()
        if existing:
            names = ", ".join(os.path.basename(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise UserError(f"output_name {self.cfg.output_name!r}: {len(existing)} file(s) of an earlier run are in "
                            f"{self.cfg.output_dir} ({names}); choose another output_name, move them away, set "
                            f"resume to continue that run, or set overwrite to replace them")

    def _existing_outputs(self) -> list[str]:
        """Network files this run would write that already exist (final, epoch and step saves)."""
        c = self.cfg
        pattern = re.compile(rf"^{re.escape(c.output_name)}(-\d{{6}}|-step\d{{8}})?\.{re.escape(c.save_model_as)}$")
        return sorted(os.path.join(c.output_dir, n) for n in os.listdir(c.output_dir) if pattern.match(n))

    def _dry_run(self) -> TrainResult:
        base = os.path.join(self.cfg.resolved_work_dir, self.cfg.output_name)
        cfgmod.save_json(self.cfg, base + "_config.json")
        info = {"plan": self.plan.as_dict(), "explain": self.plan.explain(),
                "class_images_to_generate": sum(j.count for j in self.class_jobs),
                "buckets": {f"{w}x{h}": n for (w, h), n in self.dataset.bucket_counts().items()},
                "dataset": self.dataset.report.as_dict()}
        atomic_write_text(base + "_steps.json", json.dumps(info, indent=2) + "\n")
        log.info("dry run: wrote %s_config.json and %s_steps.json; nothing trained", base, base)
        return TrainResult(self.cfg.output_dir, None, [base + "_config.json", base + "_steps.json"], [], [], 0, 0,
                           self.plan, None, None, 0.0, time.time() - self.t0, False,
                           dataset_summary=self.dataset.report.as_dict())

    # -- model / network ---------------------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        c = self.cfg
        attention = "xformers" if c.xformers else "sdpa" if c.sdpa else "vanilla"
        if self.device.type == "cpu" and c.mixed_precision == "fp16":
            raise UserError("mixed_precision fp16 needs a GPU; use 'no' or 'bf16' on the CPU")
        setup = TrainingSetup(self.device, dtype_of(c.mixed_precision), c.train_unet, c.train_text_encoder,
                              c.gradient_checkpointing, attention, c.clip_skip, c.max_token_length,
                              c.channels_last, c.torch_compile)
        self.bundle.prepare(setup)
        if self.bundle.prediction_type == "v_prediction" and c.v_parameterization is False:
            log.warning("the model predicts v but v_parameterization is false: training as epsilon as asked")
        self.v_pred = (c.v_parameterization if c.v_parameterization is not None
                       else self.bundle.prediction_type == "v_prediction")
        self.alphas = self.bundle.alphas_cumprod().to(self.device)

    def _build_network(self) -> None:
        c = self.cfg
        settings = NetworkSettings(c.network_dim, c.network_alpha, c.effective_conv_dim, c.effective_conv_alpha,
                                   c.network_dropout, c.rank_dropout, c.module_dropout, c.dylora_unit, c.lokr_factor)
        trees = self.bundle.network_trees()
        parts = [t.part for t in trees if (t.is_unet and c.train_unet) or (not t.is_unet and c.train_text_encoder)]
        net = LoraNetwork(c.network_module, trees, settings, train_parts=parts)
        if c.network_weights:
            from .networks.files import read_network_file

            net.load_exported(read_network_file(c.network_weights), c.network_weights)
        net.to(self.device)
        net.apply_to()
        net.train()
        self.network = net
        n_params = sum(p.numel() for p in net.parameters())
        log.info("%s network: %d layers, %.2fM parameters (%s)", c.network_module, len(net.targets), n_params / 1e6,
                 ", ".join(sorted(net.trained_parts())))

    def _planned_samples(self) -> int:
        """Sample images the intervals will render (first, every N epochs/steps, final)."""
        c, plan = self.cfg, self.plan
        events = int(c.sample_at_first)
        if c.sample_every_n_epochs or c.sample_every_n_steps:
            events += (plan.epochs // c.sample_every_n_epochs if c.sample_every_n_epochs else 0) + \
                (plan.total_steps // c.sample_every_n_steps if c.sample_every_n_steps else 0) + 1
        return len(self._sample_prompts()) * events if events else 0

    def _check_disk_space(self) -> None:
        n_params = sum(p.numel() for p in self.network.parameters())
        latents = sum(4 * (it.placement.bucket[0] // 8) * (it.placement.bucket[1] // 8) for it in self.dataset.items)
        self.planned_samples = self._planned_samples()
        diskspace.check(diskspace.estimate(self.cfg, self.plan, n_params, latents, self.planned_samples))

    # -- latents -----------------------------------------------------------------------------------------------
    def _cache_latents(self) -> None:
        c = self.cfg
        aug = AugmentOptions(c.flip_aug, c.color_aug, c.random_crop, parse_color(c.alpha_background), c.alpha_mask)
        self.cache = LatentCache(self.bundle.vae_id, c.cache_latents_to_disk, aug) if c.cache_latents else None
        self.builder = BatchBuilder(self.dataset, self._caption_options(), aug, self.cache)
        if self.cache is None:
            return
        if c.cache_latents_to_disk:  # latents being written when an earlier run was killed
            for folder in sorted({os.path.join(os.path.dirname(it.path), CACHE_DIR) for it in self.dataset.items}):
                clean_stale_temporaries(folder)
        self._progress("caching", message="caching latents")
        t = time.time()
        encoded, reused = cache_latents(self.dataset, self.bundle.encode_images, self.cache, aug,
                                        batch_size=max(1, c.train_batch_size),
                                        on_progress=lambda d, n: self._progress("caching", message=f"{d}/{n}"),
                                        should_stop=self._should_stop)
        if self._should_stop():
            self.stopped = True
            log.warning("stopped while caching latents; nothing was trained")
            return
        log.info("latents: %d encoded, %d reused from the cache (%.1fs)", encoded, reused, time.time() - t)

    def _cache_text_outputs(self) -> None:
        self.text_cache = None
        if not self.cfg.cache_text_encoder_outputs:
            return
        self._progress("caching", message="caching text-encoder outputs")
        cache = TextCache()
        with self.bundle.autocast(self.cfg.mixed_precision):
            cache.fill(self.dataset, self.bundle.encode_prompts, self._caption_options())
        self.text_cache = cache
        log.info("text-encoder outputs cached for %d images", len(cache.per_item))

    def _offloaded(self) -> list[str]:
        c = self.cfg
        return ["vae"] * bool(c.offload_vae and c.cache_latents) + ["text_encoders"] * bool(self.text_cache)

    def _offload_cached_parts(self) -> None:
        for part in self._offloaded():
            self.bundle.offload(part)
            log.info("moved the %s off the GPU (their outputs are cached)", part.replace("_", " "))
        if self._offloaded():
            memory.free(self.device)

    def _caption_options(self) -> CaptionOptions:
        c = self.cfg
        return CaptionOptions(c.shuffle_caption, c.keep_tokens, c.keep_tokens_separator, c.caption_dropout_rate,
                              c.caption_dropout_every_n_epochs, c.caption_tag_dropout_rate)

    # -- optimizer / resume ------------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        c = self.cfg
        groups = self.network.param_groups(c.effective_unet_lr, c.effective_text_encoder_lr)
        self.group_names = [g["name"] for g in groups]
        self.optimizer = build_optimizer(c, groups)
        self.scheduler = build_scheduler(c, self.optimizer, self.plan.total_steps)
        self.scaler = self._make_scaler()
        self.trainable = [p for g in groups for p in g["params"]]

    def _make_scaler(self):
        if self.cfg.mixed_precision != "fp16" or self.device.type != "cuda":
            return None
        amp = getattr(torch, "amp", None)
        if amp is not None and hasattr(amp, "GradScaler"):
            return torch.amp.GradScaler("cuda")
        return torch.cuda.amp.GradScaler()

    def _restore_or_start(self) -> Position:
        self.py_rng = random.Random(self.seed)
        self.noise_gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.session_id = secrets.randbelow(2**31)
        self.started_at = time.time()
        if self.resumed is None:
            return Position()
        run, net_state, blobs, py_state = self.resumed
        if run.config_fingerprint != config_fingerprint(self.cfg):
            log.warning("resume: the config differs from the one the state was saved with; continuing anyway")
        self.network.load_training_state(net_state)
        self.optimizer.load_state_dict(blobs["optimizer"])
        self.scheduler.load_state_dict(blobs["scheduler"])
        if self.scaler is not None and blobs.get("scaler"):
            self.scaler.load_state_dict(blobs["scaler"])
        torch.set_rng_state(blobs["torch_rng"])
        self.noise_gen.set_state(blobs["noise_rng"])
        if blobs.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blobs["cuda_rng"])
        self.py_rng.setstate(py_state)
        self.session_id, self.started_at = run.session_id, run.started_at
        self.split = run.micro_split
        self.prior_metrics, self.epoch_losses = run.metrics, run.epoch_losses
        log.info("resumed from %s at step %d (epoch %d, batch %d)", self.cfg.resume, run.position.step,
                 run.position.epoch + 1, run.position.batches_done)
        return run.position

    # -- the loop ----------------------------------------------------------------------------------------------
    def _train_loop(self, pos: Position) -> Position:
        c, plan = self.cfg, self.plan
        self._pending: list[tuple[Position, torch.Tensor, torch.Tensor]] = []  # (position, loss, prior part)
        self._last_flush = (time.time(), pos.step)
        for epoch in range(pos.epoch, plan.epochs):
            batches = self.dataset.epoch_batches(epoch, c.train_batch_size, self.seed)
            start = pos.batches_done if epoch == pos.epoch else 0
            for first in range(start, len(batches), c.gradient_accumulation_steps):
                if pos.step >= plan.total_steps:
                    break
                group = batches[first:first + c.gradient_accumulation_steps]
                loss = self._optimizer_step(group, epoch)
                pos = Position(pos.step + 1, epoch, first + len(group))
                self._after_step(pos, loss)
                if self._should_stop():
                    self.stopped = True
                    self._flush()
                    return pos
            if pos.step >= plan.total_steps and pos.batches_done < len(batches):
                break
            pos = Position(pos.step, epoch + 1, 0)
            self._after_epoch(epoch + 1, pos)
        self._flush()
        return pos

    def _optimizer_step(self, group: list[list[int]], epoch: int) -> torch.Tensor:
        """One optimizer step over `group`'s batches; after an out-of-memory error the batches are split in two
        (gradient accumulation doubles, so each step still sees the same samples) and the step is retried."""
        while True:
            try:
                return self._try_step(group, epoch)
            except Exception as e:
                if not memory.is_oom(e):
                    raise
            self._back_off()  # outside the except block, so the failed step's tensors are already released

    def _try_step(self, group: list[list[int]], epoch: int) -> torch.Tensor:
        micro = [part for b in group for part in memory.split_batch(b, self.split)]
        total = torch.zeros((), device=self.device)
        prior = torch.zeros((), device=self.device)
        for indices in micro:
            batch = self.builder.build(indices, self.py_rng, epoch + 1)
            with self.bundle.autocast(self.cfg.mixed_precision):
                loss = self._loss(batch) / len(micro)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
            prior += self._batch_prior / len(micro)
        self._step_prior = prior
        self._apply_gradients(total)
        return total

    def _back_off(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        memory.free(self.device)
        batch = math.ceil(self.cfg.train_batch_size / self.split)
        if batch <= 1:
            raise UserError("out of GPU memory even at batch size 1: turn on gradient_checkpointing, cache_latents "
                            "and cache_text_encoder_outputs, use an 8-bit optimizer, or lower the resolution or "
                            "network_dim (the Performance Wizard picks settings that fit)")
        self.split *= 2
        accum = self.cfg.gradient_accumulation_steps * self.split
        log.warning("out of GPU memory: batch size %d -> %d, gradient accumulation %d -> %d (same samples per step);"
                    " continuing from step %d", batch, math.ceil(batch / 2), accum // 2, accum,
                    self.scheduler.last_epoch + 1)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """CPU tensors go to the GPU from pinned memory, without blocking the host."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _apply_gradients(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        else:
            norm = losses.grad_norm(self.trainable)
        # fp16's loss scaler skips steps with overflowing gradients by itself (that is how it finds its scale)
        finite = torch.isfinite(loss) if self.scaler is not None else torch.isfinite(loss) & torch.isfinite(norm)
        if not bool(finite):  # one flag read back per step: the price of never applying a NaN update
            self._skip_step(loss)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.nonfinite_streak = 0
        else:
            self.optimizer.step()
            self.nonfinite_streak = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _skip_step(self, loss: torch.Tensor) -> None:
        """A NaN/inf loss or gradient: no update this step; too many in a row end the run with advice."""
        if self.scaler is not None:
            self.scaler.update()
        step = self.scheduler.last_epoch + 1
        self.nonfinite_streak += 1
        self.skipped_steps += 1
        what = "loss" if not torch.isfinite(loss) else "gradients"
        log.warning("step %d: the %s were not finite; the step is skipped (%d in a row, %d in all)", step,
                    what, self.nonfinite_streak, self.skipped_steps)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            hint = ("with fp16 use bf16 or mixed_precision 'no' (or a VAE that works in fp16), " if
                    self.cfg.mixed_precision == "fp16" else "")
            raise UserError(f"the {what} were NaN/inf for {self.nonfinite_streak} steps in a row (up to step {step}):"
                            f" {hint}lower the learning rate, or set max_grad_norm; the files saved before step "
                            f"{step} are intact")

    def _loss(self, batch: Batch) -> torch.Tensor:
        """Noise the latents at random timesteps and regress the model's prediction onto the target."""
        latents = batch.latents if batch.latents is not None else self.bundle.encode_images(batch.pixels)
        latents = self._to_device(latents).float()
        noise = self._to_device(losses.sample_noise(latents.shape, self.noise_gen, self.cfg.noise_offset))
        t = self._to_device(losses.sample_timesteps(latents.shape[0], len(self.alphas), self.noise_gen))
        a = self.alphas[t]
        noisy = losses.noisy_latents(latents, noise, a)
        if self.text_cache is not None and batch.indices is not None:
            cond = self.text_cache.batch(batch.indices, self.device)
        else:
            cond = self.bundle.encode_prompts(batch.captions, batch.sizes)
        pred = self.bundle.predict(noisy.to(dtype_of(self.cfg.mixed_precision)), t, cond)
        is_reg = batch.is_reg.to(self.device)
        prior = torch.where(is_reg, self.cfg.prior_loss_weight, 1.0)
        weights = losses.snr_weights(a, self.cfg.min_snr_gamma, self.v_pred) * prior
        target = losses.target(latents, noise, a, self.v_pred)
        self._batch_prior = torch.zeros((), device=self.device)
        if batch.has_reg:  # the class images' share of this loss, for the log
            with torch.no_grad():
                self._batch_prior = losses.weighted_mse(pred.detach(), target, weights * is_reg, batch.masks)
        return losses.weighted_mse(pred, target, weights, batch.masks)

    # -- per step / per epoch ----------------------------------------------------------------------------------
    def _after_step(self, pos: Position, loss: torch.Tensor) -> None:
        c = self.cfg
        self._pending.append((pos, loss, self._step_prior))
        save = c.save_every_n_steps and pos.step % c.save_every_n_steps == 0 and pos.step < self.plan.total_steps
        sample = bool(c.sample_every_n_steps and pos.step % c.sample_every_n_steps == 0)
        sample = sample or (self.cb.sample_now is not None and self.cb.sample_now())
        if save or sample or self._flush_due(pos):
            self._flush()
        self._report(pos)
        self._wait_while_paused(pos)
        if save:
            self._save_intermediate(pos, f"{c.output_name}-step{pos.step:08d}", by_step=True)
        if sample:
            self._sample(pos, f"s{pos.step:06d}")
        if save or sample:
            self._last_flush = (time.time(), pos.step)  # it/s counts training time, not saving or sampling

    def _after_epoch(self, epoch: int, pos: Position) -> None:
        c = self.cfg
        last = epoch >= self.plan.epochs
        self._flush()
        if c.save_every_n_epochs and epoch % c.save_every_n_epochs == 0 and not last:
            self._save_intermediate(pos, f"{c.output_name}-{epoch:06d}", by_step=False)
        if c.sample_every_n_epochs and epoch % c.sample_every_n_epochs == 0:
            self._sample(pos, f"e{epoch:06d}")
        self._last_flush = (time.time(), pos.step)

    def _flush_due(self, pos: Position) -> bool:
        """Read losses back from the device every 10 steps or every second, not every step (each read is a sync)."""
        return len(self._pending) >= 10 or time.time() - self._last_flush[0] >= 1.0

    def _flush(self) -> None:
        if not self._pending:
            return
        pairs = torch.stack([torch.stack([loss, prior]) for _, loss, prior in self._pending]).tolist()  # one sync
        now, (then, step_then) = time.time(), self._last_flush
        rate = (self._pending[-1][0].step - step_then) / max(now - then, 1e-9)
        for (pos, _, _), (value, prior) in zip(self._pending, pairs):
            if math.isfinite(value):  # a non-finite step was skipped and counted when it happened
                self._record(pos, value, rate, prior)
        self._pending.clear()
        self._last_flush = (now, pos.step)
        if not self._warned_shared and (warning := memory.shared_memory_warning(self.device)):
            self._warned_shared = True
            log.warning("%s", warning)

    def _record(self, pos: Position, loss: float, it_s: float, prior: float = 0.0) -> None:
        self.epoch_losses.setdefault(str(pos.epoch), []).append(loss)
        recent = [r["loss"] for r in (self.prior_metrics + self.metrics.records)[-99:]] + [loss]
        lrs = {f"lr_{n}": lr for n, lr in zip(self.group_names, self._lrs_at(pos.step))}
        # with class images: the loss = the training images' part + the prior-preservation part (x prior_loss_weight)
        parts = {"loss/instance": loss - prior, "loss/prior": prior} if self.dataset.reg_items else {}
        record = {"step": pos.step, "epoch": pos.epoch + 1, "loss": loss, **parts,
                  "avg_loss": sum(recent) / len(recent), **lrs, "it_per_s": it_s,
                  "peak_memory_gb": peak_memory_gb(self.device), "time": round(time.time() - self.t0, 3)}
        self.metrics.write(record)
        if self.tb is not None:
            self.tb.write(record)
        self._last_record = record

    def _report(self, pos: Position) -> None:
        """Progress every step; loss and speed are those of the latest read-back."""
        r = getattr(self, "_last_record", None) or {}
        it_s = r.get("it_per_s")
        eta = (self.plan.total_steps - pos.step) / it_s if it_s else None
        lr = next((v for k, v in r.items() if k.startswith("lr_")), None)
        self._progress("training", step=pos.step, epoch=pos.epoch + 1, loss=r.get("loss"),
                       avg_loss=r.get("avg_loss"), lr=lr, it_per_s=it_s, eta_s=eta,
                       peak_memory_gb=r.get("peak_memory_gb"))

    def _lrs_at(self, step: int) -> list[float]:
        """The learning rates used for `step` (the scheduler may already be past it when losses are flushed)."""
        return [base * fn(step - 1) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]

    def _wait_while_paused(self, pos: Position) -> None:
        if self.cb.should_pause is None:
            return
        paused = False
        while self.cb.should_pause() and not self._should_stop():
            paused = True
            self._progress("paused", step=pos.step, epoch=pos.epoch + 1, message="paused")
            time.sleep(0.5)
        if paused:
            self._last_flush = (time.time(), pos.step)
            self._report(pos)  # say "training" again as soon as it resumes

    # -- saving ------------------------------------------------------------------------------------------------
    def _run_info(self) -> RunInfo:
        ds = self.dataset
        model_file = getattr(self.bundle, "model_file", None)
        return RunInfo(
            family=self.bundle.family, v_pred=self.v_pred, model_name=self.bundle.model_name,
            model_hash=getattr(self.bundle, "model_hash", None),
            legacy_model_hash=legacy_checkpoint_hash(model_file) if model_file else None,
            vae_name=self.bundle.vae_name, session_id=self.session_id, training_started_at=self.started_at,
            seed=self.seed, clip_skip=self.cfg.clip_skip, num_train_images=ds.num_train_images,
            num_reg_images=ds.num_reg_images, num_batches_per_epoch=self.plan.batches_per_epoch,
            num_epochs=self.plan.epochs, max_train_steps=self.plan.total_steps,
            warmup_steps=warmup_steps(self.cfg, self.plan.total_steps),
            dataset={"tag_frequency": ds.tag_frequency(), "dataset_dirs": ds.dataset_dirs(False),
                     "reg_dataset_dirs": ds.dataset_dirs(True), "bucket_info": ds.bucket_info()})

    def _save_network(self, path: str, pos: Position, title: str) -> str:
        self._progress("saving", step=pos.step, message=os.path.basename(path))
        meta = build_metadata(self.cfg, self._run_info(), steps=pos.step, epoch=pos.epochs_started, title=title)
        with diskspace.writing(path, self.files):
            save_network(path, self.network.export_state_dict(), meta, self.cfg.save_precision)
        self.files.append(path)
        log.info("saved %s", path)
        if self.cb.on_save is not None:
            self.cb.on_save(path)
        return path

    def _save_intermediate(self, pos: Position, stem: str, by_step: bool) -> None:
        path = os.path.join(self.cfg.output_dir, f"{stem}.{self.cfg.save_model_as}")
        self._save_network(path, pos, stem)
        if self.cfg.save_state:
            self._save_state(path_stem=os.path.join(self.cfg.resolved_work_dir, stem), pos=pos)
        if by_step:
            self.step_files.append((pos.step, path))
            self._prune_step_saves(pos.step)
        else:
            self.epoch_files.append(path)
            self._prune_epoch_saves()
        self._charts()

    def _prune_epoch_saves(self) -> None:
        keep = self.cfg.save_last_n_epochs
        while keep and len(self.epoch_files) > keep:
            self._remove_save(self.epoch_files.pop(0))

    def _prune_step_saves(self, step: int) -> None:
        keep = self.cfg.save_last_n_steps
        while keep and self.step_files and self.step_files[0][0] <= step - keep:
            self._remove_save(self.step_files.pop(0)[1])

    def _remove_save(self, path: str) -> None:
        stem = os.path.splitext(os.path.basename(path))[0]
        for p in (path, os.path.join(self.cfg.resolved_work_dir, f"{stem}-state")):
            if os.path.isdir(p):  # renamed first: a kill half-way leaves a temporary the next run removes
                doomed = os.path.join(os.path.dirname(p), f"{TMP_PREFIX}removing-{os.path.basename(p)}")
                os.replace(p, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
            if p in self.files:
                self.files.remove(p)
        log.info("removed old save %s (keeping the last ones)", path)

    def _save_state(self, path_stem: str, pos: Position) -> str:
        folder = f"{path_stem}-state"
        run = RunState(pos, self.seed, self.session_id, self.started_at, config_fingerprint(self.cfg),
                       self.prior_metrics + self.metrics.records, self.epoch_losses, self.split)
        with diskspace.writing(folder, self.files):
            save_state(folder, run=run, network_state=self.network.training_state(), optimizer=self.optimizer,
                       scheduler=self.scheduler, scaler=self.scaler, py_rng=self.py_rng, noise_gen=self.noise_gen)
        self.state_dir = folder
        log.info("saved training state %s", folder)
        return folder

    def _save_final(self, pos: Position) -> str | None:
        c = self.cfg
        if pos.step == 0:
            log.warning("no step was trained; no network file written")
            return None
        if self.stopped:
            stem = f"{c.output_name}-step{pos.step:08d}"
            path = self._save_network(os.path.join(c.output_dir, f"{stem}.{c.save_model_as}"), pos, stem)
            if c.save_state:
                self._save_state(os.path.join(c.resolved_work_dir, stem), pos)
            log.info("stopped at step %d; saved %s", pos.step, path)
        else:
            path = self._save_network(self._final_path(), pos, c.output_name)
            if c.save_state:
                self._save_state(os.path.join(c.resolved_work_dir, c.output_name), pos)
            if (c.sample_every_n_epochs or c.sample_every_n_steps) and self._last_sample_step != pos.step:
                self._sample(pos, "final")
        self._charts()
        return path

    # -- samples -----------------------------------------------------------------------------------------------
    def _sample_prompts(self) -> list[SamplePrompt]:
        if not hasattr(self, "_prompts"):
            w, h = self.cfg.resolution_wh
            defaults = SamplePrompt("", width=w, height=h, sampler=self.cfg.sample_sampler)
            self._prompts = load_prompts(self.cfg.sample_prompts, defaults, self.seed) + self._concept_prompts()
        return self._prompts

    def _concept_prompts(self) -> list[SamplePrompt]:
        """Each concept's previews (save_sample_prompt/template, n_save_sample, seed, CFG, steps, negative)."""
        out: list[SamplePrompt] = []
        rng = random.Random(f"concept-samples-{self.seed}")
        for c in getattr(self, "concepts", []):
            instances = [(self._file_text(i.path), i.placement.bucket) for i in self.dataset.train_items
                         if i.subset.concept is c]
            for r in sample_requests(c, instances, self.cfg.resolution_wh, rng):
                seed = r.seed if r.seed is not None else self.seed + 1000 * c.index + len(out)
                out.append(SamplePrompt(r.prompt, r.negative_prompt, r.size[0], r.size[1], seed, r.steps,
                                        r.cfg_scale, self.cfg.sample_sampler, r.name))
        return out

    def _file_text(self, path: str) -> str:
        caption, caption_file = find_caption(path, self.cfg.caption_extension)
        return file_text(path, caption if caption_file else None)

    def _maybe_sample_first(self, pos: Position) -> None:
        if self.cfg.sample_at_first and pos.step == 0:
            self._sample(pos, "s000000")

    def _sample(self, pos: Position, tag: str) -> None:
        prompts = self._sample_prompts()
        if not prompts:
            return
        self._last_sample_step = pos.step
        self._progress("sampling", step=pos.step, message=f"rendering {len(prompts)} sample(s)")
        folder = os.path.join(self.cfg.resolved_work_dir, "sample")
        rng_state = torch.get_rng_state()
        try:  # the bundle brings offloaded parts back for the render itself (one at a time where it can)
            with torch.no_grad(), eval_mode(self.network):
                images = self.bundle.sample(prompts)
        finally:
            torch.set_rng_state(rng_state)
            memory.free(self.device)
        paths = []
        for p, img in zip(prompts, images):
            path = os.path.join(folder, f"{self.cfg.output_name}_{tag}_{p.name}_{p.seed}.png")
            with diskspace.writing(path, self.files):
                atomic_write_with(path, lambda tmp, img=img, p=p: img.save(tmp, format="PNG",
                                                                           pnginfo=_pnginfo(img, p)))
            paths.append(path)
        self.sample_files.extend(paths)
        if self.cb.on_samples is not None:
            self.cb.on_samples(paths)

    # -- logs / progress / result ------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        log_dir = self.cfg.resolved_log_dir
        self.metrics = MetricsLog(os.path.join(log_dir, f"{self.cfg.output_name}_metrics.jsonl"), self.prior_metrics)
        self.tb = TensorBoardLog(os.path.join(log_dir, "tensorboard")) if self.cfg.log_with == "tensorboard" else None
        cfgmod.save_json(self.cfg, os.path.join(self.cfg.resolved_work_dir, f"{self.cfg.output_name}_config.json"))

    def _close_logs(self) -> None:
        for name in ("metrics", "tb"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

    def _charts(self) -> None:
        self.charts = write_charts(self.prior_metrics + self.metrics.records, self.cfg.resolved_log_dir,
                                   self.cfg.output_name)

    def _write_tag_file(self) -> None:
        if not self.cfg.tag_occurrence_txt_file:
            return
        path = os.path.join(self.cfg.resolved_work_dir, f"{self.cfg.output_name}_tag_frequency.txt")
        text = format_tag_file(self.dataset.tag_frequency(), self.cfg.sort_tag_occurrence_alphabetically)
        atomic_write_text(path, text)

    def _should_stop(self) -> bool:
        return bool(self.cb.should_stop is not None and self.cb.should_stop())

    def _progress(self, phase: str, **kw: Any) -> None:
        if self.cb.on_progress is None:
            return
        plan = getattr(self, "plan", None)
        self.cb.on_progress(Progress(phase, total_steps=plan.total_steps if plan else 0,
                                     total_epochs=plan.epochs if plan else 0,
                                     total_samples=getattr(self, "planned_samples", 0), **kw))

    def _result(self, final: str | None, pos: Position) -> TrainResult:
        losses = [v for _, v in sorted(self.epoch_losses.items(), key=lambda kv: int(kv[0]))]
        mean = [sum(v) / len(v) for v in losses if v]
        self._progress("done", step=pos.step, message="stopped" if self.stopped else "finished")
        return TrainResult(self.cfg.output_dir, final, list(self.files), list(self.sample_files),
                           getattr(self, "charts", []), pos.step, pos.epochs_started,
                           self.plan, mean[0] if mean else None, mean[-1] if mean else None,
                           peak_memory_gb(self.device), time.time() - self.t0, self.stopped,
                           getattr(self, "state_dir", None), self.skipped_steps, self.dataset.report.as_dict())


def _pnginfo(img, p: SamplePrompt):
    """The generation parameters in the PNG, as the WebUI writes them (the WebUI's own infotext when it has one)."""
    from PIL.PngImagePlugin import PngInfo

    text = img.info.get("parameters") or (
        f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Sampler: {p.sampler}, "
        f"CFG scale: {p.cfg_scale}, Seed: {p.seed}, Size: {p.width}x{p.height}")
    info = PngInfo()
    info.add_text("parameters", text)
    return info
