"""Command line: `python -m lora_trainer train | demo | wizard | bench | convert | presets | options`.

Every TrainConfig field is a flag of `train` (`--network_dim 32`, `--shuffle_caption`, `--unet_lr ""` for empty),
applied over `--preset` and `--config` in that order; `--config` also takes a kohya_ss GUI JSON or an sd-scripts
TOML, and `convert` writes our JSON from one. User errors exit with status 2 and a one-paragraph message,
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import config as cfgmod
from . import presets
from .errors import UserError

log = logging.getLogger("lora_trainer")
LOG_FILE: str | None = None  # the current run's log file, named when an internal error ends the run


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in cfgmod.fields():
        group = groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        kind = spec.base_type
        extra = f" [{'/'.join(map(str, spec.choices))}]" if spec.choices else ""
        help_text = f"{spec.help}{extra} (default: {spec.default!r})".replace("%", "%%")
        if kind is bool:
            group.add_argument(f"--{spec.name}", nargs="?", const="true", default=None, metavar="BOOL",
                               help=help_text)
        elif kind is list or getattr(kind, "__origin__", None) is list:
            group.add_argument(f"--{spec.name}", nargs="*", default=None, metavar="VALUE", help=help_text)
        else:
            group.add_argument(f"--{spec.name}", default=None, metavar=spec.name.upper().split("_")[-1],
                               help=help_text)


def overrides_from(ns: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(ns, name) for name in cfgmod.field_names() if getattr(ns, name, None) is not None}


def build_config(config_path: str | None, preset: str | None, overrides: dict[str, Any]) -> cfgmod.TrainConfig:
    cfg = presets.apply(preset) if preset else cfgmod.TrainConfig()
    if config_path:
        cfg = cfgmod.load_config(config_path, base=cfg) if preset else cfgmod.load_config(config_path)
    if "optimizer_type" in overrides and not {"learning_rate", "unet_lr", "text_encoder_lr"} & set(overrides):
        from .optim import optimizer_defaults

        overrides = {**optimizer_defaults(str(overrides["optimizer_type"])), **overrides}
    return cfgmod.with_overrides(cfg, overrides)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)

    @classmethod
    def installed(cls) -> _StopFlag:
        flag = cls()
        flag.install()
        return flag

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after the current step (Ctrl-C again to abort without saving)")


class ProgressPrinter:
    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def __call__(self, p) -> None:
        if p.phase != "training":
            if p.message and p.phase in ("caching", "sampling", "saving"):
                self._emit(f"{p.phase}: {p.message}", force=p.phase != "caching")
            return
        eta = f"{int(p.eta_s // 60)}:{int(p.eta_s % 60):02d}" if p.eta_s is not None else "?"
        rate = f"{p.it_per_s:.2f} it/s" if p.it_per_s else "? it/s"
        loss = f"loss {p.loss:.4f} (avg {p.avg_loss:.4f})" if p.loss is not None else "loss ?"
        bar = _bar(p.step, p.total_steps)
        self._emit(f"{bar} {p.step}/{p.total_steps} epoch {p.epoch}/{p.total_epochs} {loss} {rate} ETA {eta}",
                   force=p.step == p.total_steps)

    def _emit(self, text: str, force: bool = False) -> None:
        now = time.time()
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(160) + ("\n" if force else ""))
            self.stream.flush()
        elif force or now - self.last > 10:
            self.stream.write(text + "\n")
            self.last = now


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def cmd_train(args: argparse.Namespace) -> int:
    from .train import preflight

    configs = [build_config(path, args.preset, overrides_from(args)) for path in (args.config or [None])]
    if len(configs) == 1:
        preflight(configs[0])  # a wrong folder is reported before a checkpoint takes a minute to load
        summary = _run(configs[0], _Bundles().get(configs[0]), _StopFlag.installed(), args.json)
        if args.json:
            sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    return _run_queue(configs, args.json)


def _run_queue(configs: list[cfgmod.TrainConfig], as_json: bool) -> int:
    from .runqueue import RunQueue, plan
    from .train import preflight

    runs = plan(configs, refusal="the queue cannot start (nothing was trained)")
    for i, cfg in enumerate(runs, 1):  # every dataset and output folder checked before the first run
        try:
            preflight(cfg)
        except UserError as e:
            raise UserError(f"queue run {i} ({cfg.output_name}): {e}; nothing was trained") from None
    queue, bundles, stop, summaries = RunQueue(runs), _Bundles(), _StopFlag.installed(), []

    def one(cfg: cfgmod.TrainConfig) -> str:
        summaries.append(_run(cfg, bundles.get(cfg), stop, as_json))
        return "cancelled" if summaries[-1]["stopped"] else "finished"

    ok = queue.run(one, should_stop=lambda: stop.requested)
    for e in queue.entries:
        log.info("queue run %d %s: %s%s", e.position, e.output_name, e.state, f" ({e.message})" if e.message else "")
    if as_json:
        sys.stdout.write(json.dumps({"queue": queue.as_list(), "runs": summaries}) + "\n")
    return 0 if ok or stop.requested else 2


class _Bundles:
    """The model of the last run, reused by the next one when it names the same checkpoint, VAE and device."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.bundle = None

    def get(self, cfg: cfgmod.TrainConfig):
        from .backends.diffusers_backend import load_bundle
        from .train import resolve_device

        key = (cfg.pretrained_model_name_or_path, cfg.model_family, cfg.v_parameterization, cfg.vae, cfg.device)
        if key != self.key:
            self.bundle = None  # free the last model before loading the next
            self.bundle = load_bundle(cfg.pretrained_model_name_or_path, family=cfg.model_family,
                                      v_parameterization=cfg.v_parameterization, vae=cfg.vae,
                                      device=resolve_device(cfg.device))
            self.key = key
        return self.bundle


def _run(cfg, bundle, stop: _StopFlag, as_json: bool) -> dict:
    from .logs import run_log, run_log_path
    from .train import TrainCallbacks, train

    cb = TrainCallbacks(on_progress=None if as_json else ProgressPrinter(), should_stop=lambda: stop.requested)
    global LOG_FILE
    LOG_FILE = run_log_path(cfg.resolved_log_dir, cfg.output_name)
    with run_log(LOG_FILE):
        result = train(cfg, bundle, cb)
    if not as_json:
        log.info("done: %s", result.final_file or "nothing saved")
    return {"output_dir": result.output_dir, "final_file": result.final_file, "files": result.files,
            "samples": result.samples, "charts": result.charts, "steps": result.steps, "epochs": result.epochs,
            "first_epoch_loss": result.first_epoch_loss, "last_epoch_loss": result.last_epoch_loss,
            "peak_memory_gb": round(result.peak_memory_gb, 3), "seconds": round(result.seconds, 1),
            "stopped": result.stopped, "skipped_steps": result.skipped_steps,
            "steps_explained": result.plan.explain(), "dataset": result.dataset_summary}


def cmd_convert(args: argparse.Namespace) -> int:
    from . import kohya_config

    out = args.output or kohya_config.default_output(args.file)
    loaded = kohya_config.convert(args.file, out, force=args.force)
    lines = [f"wrote {out} from the {loaded.format} {args.file}"]
    if loaded.prompts_file:
        lines.append(f"wrote {loaded.prompts_file} (the sample prompts)")
    if loaded.unsupported:
        lines.append(f"not carried over ({len(loaded.unsupported)}):")
        lines.extend(f"  - {u}" for u in loaded.unsupported)
    elif loaded.format != kohya_config.OURS:
        lines.append("every option was carried over")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.output, steps=args.steps, as_json=args.json)


def cmd_presets(args: argparse.Namespace) -> int:
    for p in presets.PRESETS.values():
        sys.stdout.write(f"{p.name:16} {p.title}\n{'':16} {p.description}\n")
    return 0


def cmd_options(args: argparse.Namespace) -> int:
    for spec in cfgmod.fields():
        sys.stdout.write(f"{spec.group:12} {spec.name:36} {spec.default!r:12} {spec.help}\n")
    return 0


def _family_of(cfg: cfgmod.TrainConfig, explicit: str | None) -> str:
    if explicit:
        return explicit
    if cfg.model_family != "auto":
        return cfg.model_family
    name = cfg.pretrained_model_name_or_path
    return name.split("-", 1)[1] if name.startswith("tiny-") else "sd1"


def _dataset_images(cfg: cfgmod.TrainConfig, explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    if not cfg.train_data_dir:
        return 20
    from .train import preflight

    return preflight(cfg.replace(save_json_only=True)).num_train_images


def cmd_wizard(args: argparse.Namespace) -> int:
    from . import wizard
    from .train import resolve_device

    cfg = build_config(args.config, args.preset, overrides_from(args))
    family = _family_of(cfg, args.family)
    if args.vram_gb is not None:
        hw = wizard.simulated_hardware(args.vram_gb, bf16=args.bf16 is not False)
        hw = dataclasses.replace(hw, free_vram_gb=args.free_vram_gb if args.free_vram_gb is not None else args.vram_gb)
    else:
        hw = wizard.detect_hardware(resolve_device(cfg.device))
        if args.bf16 is not None:
            hw = dataclasses.replace(hw, bf16=args.bf16)
    data = wizard.DatasetStats(_dataset_images(cfg, args.images))
    rec = wizard.recommend(hw, data, cfg, family)
    if args.probe:
        rec = _probe(cfg, rec, hw, family, data)
    if args.json:
        sys.stdout.write(json.dumps({"hardware": dataclasses.asdict(hw), "family": family, **rec.as_dict(),
                                     "config": cfgmod.to_dict(rec.apply(cfg))}) + "\n")
        return 0
    out = sys.stdout
    out.write(f"{hw.name or hw.device}: {hw.total_vram_gb:.1f} GB, {hw.free_vram_gb:.1f} GB free, bf16 "
              f"{'yes' if hw.bf16 else 'no'}; {family}, {data.num_images} images/epoch\n")
    for p in rec.picks:
        out.write(f"  {p.field:28} {str(p.value):10} {p.reason}\n")
    out.write(f"estimated peak {rec.estimated_peak_gb:.1f} GB of {hw.free_vram_gb:.1f} GB free\n")
    for w in rec.warnings:
        out.write(f"warning: {w}\n")
    return 0


def _probe(cfg, rec, hw, family, data):
    from . import wizard
    from .backends.diffusers_backend import load_bundle
    from .bench import probe
    from .train import resolve_device

    device = resolve_device(cfg.device)
    if device.type != "cuda":
        rec.warnings.append("the probe measures CUDA memory; skipped on this machine")
        return rec
    tuned = rec.apply(cfg)
    bundle = load_bundle(cfg.pretrained_model_name_or_path or f"tiny-{family}", device=device)
    target = tuned.train_batch_size * tuned.gradient_accumulation_steps
    peaks = probe(tuned, bundle, [b for b in wizard.BATCHES if b <= target], hw.budget_gb + wizard.OVERHEAD_GB)
    return wizard.refine_with_probe(rec, peaks, hw, target)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    overrides = dict(_pairs(args.set))
    kw = dict(family=args.family, resolution=args.resolution, batch=args.batch, algo=args.algo, steps=args.steps,
              warmup=args.warmup, overrides=overrides, model=args.model, device_name=args.device,
              full_size=args.full_size)
    report = bench.compare(dict(_pairs([args.compare])), **kw) if args.compare else bench.run_bench(**kw)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    _print_bench(report)
    return 0


def _pairs(items: Sequence[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{item!r} is not option=value")
        cfgmod.field_spec(key)
        out.append((key, value))
    return out


def _print_bench(report: dict) -> None:
    out = sys.stdout
    runs = [("baseline", report["baseline"]), ("changed", report["changed"])] if "baseline" in report else \
        [("run", report)]
    for name, r in runs:
        split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["time_split_s"].items())
        mfu = f", {r['tflops']:.1f} TFLOP/s" if r.get("tflops") else ""
        mfu += f" = {r['mfu'] * 100:.0f}% MFU" if r.get("mfu") else ""
        out.write(f"{name}: {r['device']} {r['family']} {r['resolution']}px batch {r['batch']} {r['algo']}: "
                  f"{r['images_per_s']:.2f} images/s, {r['it_per_s']:.2f} it/s, peak {r['peak_memory_gb']:.2f} GB"
                  f"{mfu}\n  {split}\n  {r['ops_per_step']} operators per step (kernel launches on a GPU), "
                  f"{r['host_syncs_per_step']} host sync(s)\n")
    if "baseline" in report:
        out.write(f"{report['change']}: speed x{report['speed_ratio']:.2f}, memory x{report['memory_ratio']:.2f}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="Train LoRA / LyCORIS networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a network")
    p_train.add_argument("--config", action="append", help="config file: our JSON (see 'options'), a kohya_ss GUI "
                                                            "JSON or an sd-scripts TOML; give it several times to "
                                                            "queue runs (see --multi_run_folder)")
    p_train.add_argument("--preset", choices=list(presets.PRESETS), help="start from a preset")
    p_train.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    _add_config_flags(p_train)
    p_train.set_defaults(func=cmd_train)
    p_demo = sub.add_parser("demo", help="train a small LoRA on a synthetic dataset with the tiny SD1 model")
    p_demo.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    p_demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p_demo.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    p_demo.set_defaults(func=cmd_demo)
    p_wiz = sub.add_parser("wizard", help="recommend settings that fit this (or a simulated) GPU")
    p_wiz.add_argument("--config", help="config to start from (our JSON, a kohya_ss GUI JSON or an sd-scripts TOML)")
    p_wiz.add_argument("--preset", choices=list(presets.PRESETS))
    p_wiz.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="model family (default: from the config)")
    p_wiz.add_argument("--vram-gb", type=float, help="simulate a GPU with this much VRAM")
    p_wiz.add_argument("--free-vram-gb", type=float, help="simulated free VRAM (default: all of it)")
    p_wiz.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="the GPU supports bf16")
    p_wiz.add_argument("--no-bf16", dest="bf16", action="store_false", help="the GPU has no bf16")
    p_wiz.add_argument("--images", type=int, help="training images per epoch (default: scan train_data_dir)")
    p_wiz.add_argument("--probe", action="store_true", help="measure real steps on this GPU to confirm the batch")
    p_wiz.add_argument("--json", action="store_true")
    _add_config_flags(p_wiz)
    p_wiz.set_defaults(func=cmd_wizard)
    p_bench = sub.add_parser("bench", help="measure training speed and memory")
    p_bench.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    p_bench.add_argument("--resolution", type=int, help="default: 512/768/1024 on a GPU, 64 on a CPU")
    p_bench.add_argument("--batch", type=int, default=1)
    p_bench.add_argument("--algo", choices=list(cfgmod.ALGORITHMS), default="lora")
    p_bench.add_argument("--steps", type=int, default=10)
    p_bench.add_argument("--warmup", type=int, default=3)
    p_bench.add_argument("--model", default="", help="a checkpoint instead of random weights")
    p_bench.add_argument("--device", default="auto")
    p_bench.add_argument("--full-size", dest="full_size", action="store_true", default=None,
                         help="the full-size model even on a CPU (slow; the default on a GPU)")
    p_bench.add_argument("--set", nargs="*", metavar="OPTION=VALUE", help="config options for both runs")
    p_bench.add_argument("--compare", metavar="OPTION=VALUE", help="run twice, the second time with this change")
    p_bench.add_argument("--json", action="store_true")
    p_bench.set_defaults(func=cmd_bench)
    p_conv = sub.add_parser("convert", help="write our JSON config from a kohya_ss GUI JSON or an sd-scripts TOML")
    p_conv.add_argument("file", help="the kohya_ss GUI JSON, or the sd-scripts TOML (its dataset_config is read too)")
    p_conv.add_argument("-o", "--output", help="our JSON to write (default: FILE's name + _train_lora.json)")
    p_conv.add_argument("--force", action="store_true", help="replace the output if it exists")
    p_conv.set_defaults(func=cmd_convert)
    sub.add_parser("presets", help="list presets").set_defaults(func=cmd_presets)
    sub.add_parser("options", help="list every option").set_defaults(func=cmd_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("PIL", "urllib3", "diffusers", "transformers", "lycoris", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        return 130
    except Exception:  # an internal error: the traceback, and where the full log is
        where = f"; the full log is in {LOG_FILE}" if LOG_FILE else ""
        log.exception("internal error (a bug in Train LoRA, not in your input)%s", where)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
