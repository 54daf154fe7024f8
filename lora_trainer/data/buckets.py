"""Aspect-ratio buckets (kohya's scheme, re-implemented).

With bucketing on, an image is resized to cover the bucket whose aspect ratio is closest to its own and then cropped
to the bucket; buckets have sides that are multiples of `bucket_reso_steps`, lie within [min, max] and have an area
of at most the training resolution's area. With `bucket_no_upscale`, images are only ever shrunk: the bucket is the
largest step multiple that fits inside the image (scaled down to the area first if needed). With bucketing off,
every image is resized to cover the training resolution and cropped to it.

An image whose aspect ratio is so far from every bucket that more than half of it would be cropped away is refused
(`ExtremeAspect`): training on a third of a picture with a caption that describes all of it teaches the wrong thing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """All bucket sizes: for each width step, the largest step-multiple height within the area; plus the square."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: resize to `resized`, then crop a `bucket`-sized window out of it."""

    bucket: Size
    resized: Size
    scale: float = 1.0  # resized / original; above 1 the image is enlarged

    @property
    def kept_fraction(self) -> float:
        """Share of the resized image that survives the crop."""
        return self.bucket[0] * self.bucket[1] / (self.resized[0] * self.resized[1])

    @property
    def aspect_error(self) -> float:
        return self.bucket[0] / self.bucket[1] - self.resized[0] / self.resized[1]

    def crop_box(self, rng: random.Random | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image: centred, or random when `rng` is given."""
        dx = self.resized[0] - self.bucket[0]
        dy = self.resized[1] - self.bucket[1]
        left = rng.randint(0, dx) if rng is not None else dx // 2
        top = rng.randint(0, dy) if rng is not None else dy // 2
        return left, top, left + self.bucket[0], top + self.bucket[1]


class UnplaceableImage(ValueError):
    """The image cannot go into any bucket; `str(e)` says why and what to do."""


class ImageTooSmall(UnplaceableImage):
    pass


class ExtremeAspect(UnplaceableImage):
    pass


MIN_KEPT_FRACTION = 0.5


class BucketPlanner:
    def __init__(self, resolution: Size, enable_bucket: bool = True, min_reso: int = 256, max_reso: int = 1024,
                 steps: int = 64, no_upscale: bool = False):
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        self.steps = steps
        self.no_upscale = no_upscale
        self.max_area = resolution[0] * resolution[1]
        if enable_bucket and not no_upscale:
            self.buckets = make_bucket_resolutions(resolution, min_reso, max_reso, steps)
            if not self.buckets:
                raise ValueError(f"no bucket fits between min_bucket_reso {min_reso} and max_bucket_reso {max_reso} "
                                 f"at resolution {resolution[0]}x{resolution[1]}")
            self._ratios = [w / h for w, h in self.buckets]

    def place(self, width: int, height: int) -> Placement:
        if not self.enable_bucket:
            return _check_aspect(width, height, _cover(width, height, self.resolution), "enable_bucket")
        if self.no_upscale:
            return self._place_no_upscale(width, height)
        ratio = width / height
        best = min(range(len(self.buckets)), key=lambda i: (abs(self._ratios[i] - ratio), i))
        return _check_aspect(width, height, _cover(width, height, self.buckets[best]), "max_bucket_reso")

    def _place_no_upscale(self, width: int, height: int) -> Placement:
        ratio = width / height
        w, h = float(width), float(height)
        if width * height > self.max_area:  # shrink to the area, keeping the aspect ratio
            w = math.sqrt(self.max_area * ratio)
            h = self.max_area / w
        resized = (max(1, int(w + 0.5)), max(1, int(h + 0.5)))
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if bucket[0] < self.steps or bucket[1] < self.steps:
            raise ImageTooSmall(f"{width}x{height} is smaller than one bucket step ({self.steps} px) "
                                f"and bucket_no_upscale forbids enlarging it")
        return Placement(bucket, resized, resized[0] / width)


def _cover(width: int, height: int, bucket: Size) -> Placement:
    """Scale so that the image covers `bucket` with one side matching exactly."""
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return Placement(bucket, resized, scale)


def _check_aspect(width: int, height: int, placement: Placement, remedy: str) -> Placement:
    if placement.kept_fraction < MIN_KEPT_FRACTION:
        bw, bh = placement.bucket
        raise ExtremeAspect(f"{width}x{height} (aspect {width / height:.2f}) would lose "
                            f"{(1 - placement.kept_fraction) * 100:.0f}% to the crop into {bw}x{bh}; crop the "
                            f"image closer to its subject, or allow wider buckets ({remedy})")
    return placement
