"""Command line: `python -m lora_trainer train | demo | presets | options`.

Every TrainConfig field is a flag of `train` (`--network_dim 32`, `--shuffle_caption`, `--unet_lr ""` for empty),
applied over `--preset` and `--config` in that order. User errors exit with status 2 and a one-paragraph message,
no traceback.
"""

from __future__ import annotations

import argparse
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
        cfg = cfgmod.load_json(config_path, base=cfg) if preset else cfgmod.load_json(config_path)
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
        bar = _bar(p.step, p.total_steps)
        self._emit(f"{bar} {p.step}/{p.total_steps} epoch {p.epoch}/{p.total_epochs} loss {p.loss:.4f} "
                   f"(avg {p.avg_loss:.4f}) {rate} ETA {eta}", force=p.step == p.total_steps)

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
    from .backends.diffusers_backend import load_bundle
    from .train import TrainCallbacks, preflight, resolve_device

    cfg = build_config(args.config, args.preset, overrides_from(args))
    preflight(cfg)  # a wrong folder is reported before a checkpoint takes a minute to load
    device = resolve_device(cfg.device)
    bundle = load_bundle(cfg.pretrained_model_name_or_path, family=cfg.model_family,
                         v_parameterization=cfg.v_parameterization, vae=cfg.vae, device=device)
    return _run(cfg, bundle, args.json, TrainCallbacks)


def _run(cfg, bundle, as_json: bool, callbacks_cls) -> int:
    from .train import train

    stop = _StopFlag()
    stop.install()
    cb = callbacks_cls(on_progress=None if as_json else ProgressPrinter(), should_stop=lambda: stop.requested)
    result = train(cfg, bundle, cb)
    summary = {"output_dir": result.output_dir, "final_file": result.final_file, "files": result.files,
               "samples": result.samples, "charts": result.charts, "steps": result.steps, "epochs": result.epochs,
               "first_epoch_loss": result.first_epoch_loss, "last_epoch_loss": result.last_epoch_loss,
               "peak_memory_gb": round(result.peak_memory_gb, 3), "seconds": round(result.seconds, 1),
               "stopped": result.stopped, "steps_explained": result.plan.explain()}
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        log.info("done: %s", result.final_file or "nothing saved")
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="Train LoRA / LyCORIS networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a network")
    p_train.add_argument("--config", help="JSON config file (our format; see 'options')")
    p_train.add_argument("--preset", choices=list(presets.PRESETS), help="start from a preset")
    p_train.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    _add_config_flags(p_train)
    p_train.set_defaults(func=cmd_train)
    p_demo = sub.add_parser("demo", help="train a small LoRA on a synthetic dataset with the tiny SD1 model")
    p_demo.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    p_demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p_demo.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    p_demo.set_defaults(func=cmd_demo)
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


if __name__ == "__main__":
    raise SystemExit(main())
