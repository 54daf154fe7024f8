"""Run logs: per-step metrics as JSON lines, loss/memory charts as PNG, and optional TensorBoard.

Charts are drawn with Pillow (no plotting dependency, so they work inside the WebUI's environment too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image, ImageDraw

from .errors import UserError
from .fileio import atomic_write_with

log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_log(path: str) -> Iterator[str]:
    """Copy everything the trainer logs (with tracebacks) into `path` for the duration of a run."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger("lora_trainer")
    root.addHandler(handler)
    try:
        yield path
    except Exception as e:  # into the file only: the caller decides what the console shows
        user = isinstance(e, UserError)
        handler.handle(root.makeRecord(root.name, logging.ERROR, __file__, 0, "the run stopped: %s", (e,),
                                       None if user else sys.exc_info()))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def run_log_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, f"{name}.log")


class MetricsLog:
    """One JSON object per line; `records` keeps them for the charts. The file starts with `earlier` (the records
    of a resumed run up to its saved state), so it always describes exactly this run's history."""

    def __init__(self, path: str, earlier: list[dict[str, Any]] | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run, closed in close()
        for record in earlier or []:
            self._f.write(json.dumps(record) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLog:
    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("log_with is 'tensorboard' but the tensorboard package is missing; install it with "
                            "'pip install tensorboard' or clear log_with") from None
        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key in ("loss", "loss/instance", "loss/prior", "avg_loss", "lr_unet", "lr_text_encoder",
                    "peak_memory_gb", "it_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(key, record[key], step)

    def close(self) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------------------------------------
# Charts


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


def line_chart(path: str, xs: Sequence[float], series: dict[str, Sequence[float]], title: str,
               size: tuple[int, int] = (900, 420)) -> None:
    """A plain line chart: one polyline per series, axis ranges labelled. Written atomically."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black")
    finite = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not xs or not finite:
        d.text((left, h // 2), "no data yet", fill="gray")
        atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))
        return
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(finite), max(finite)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def pt(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (w - left - right)
        return px, h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        d.text((5, pt(x0, yv)[1] - 6), f"{yv:.4g}", fill="black")
        xv = x0 + frac * (x1 - x0)
        d.text((pt(xv, y0)[0] - 10, h - bottom + 8), f"{xv:.0f}", fill="black")
    colors = ["#9ecae1", "#08519c", "#e6550d", "#31a354"]
    for (name, ys), color in zip(series.items(), colors):
        pts = [pt(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        d.text((w - right - 160, top + 5 + 14 * list(series).index(name)), name, fill=color)
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def write_charts(records: list[dict[str, Any]], folder: str, name: str) -> list[str]:
    """`<name>_loss.png` (loss and its moving average) and `<name>_memory.png` (peak memory)."""
    if not records:
        return []
    steps = [r["step"] for r in records]
    loss = [r.get("loss") for r in records]
    loss_path = os.path.join(folder, f"{name}_loss.png")
    line_chart(loss_path, steps, {"loss": loss, "moving average": ema([v for v in loss if v is not None])},
               "training loss")
    mem_path = os.path.join(folder, f"{name}_memory.png")
    line_chart(mem_path, steps, {"peak memory (GB)": [r.get("peak_memory_gb") for r in records]},
               "peak memory")
    return [loss_path, mem_path]
