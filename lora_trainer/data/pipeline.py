"""From dataset items to training batches: image transforms, the latent cache, and batch assembly."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write_with
from ..model import SizeInfo
from .captions import CaptionOptions, process_caption
from .dataset import Dataset, ImageItem

log = logging.getLogger(__name__)
CACHE_FORMAT = "2"
CACHE_DIR = ".latent_cache"
LATENT_FACTOR = 8  # the VAE's downsampling in every SD family


@dataclass(frozen=True)
class AugmentOptions:
    """How images become training pixels: augmentation, the colour under transparent pixels, the alpha mask."""

    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    background: tuple[int, int, int] = (255, 255, 255)
    alpha_mask: bool = False


@dataclass
class Prepared:
    pixels: torch.Tensor  # [-1, 1] CHW
    size: SizeInfo
    mask: torch.Tensor | None  # h x w at latent size, in [0, 1], with alpha_mask (ones without alpha), else None


def prepare_image(item: ImageItem, rng: random.Random | None, flip: bool, color_rng: random.Random | None,
                  opts: AugmentOptions = AugmentOptions()) -> Prepared:
    """Decode, resize to cover the bucket, crop, optionally mirror and colour-jitter."""
    from .images import load_image

    img, alpha = load_image(item.path, opts.background, keep_alpha=opts.alpha_mask)
    box = item.placement.crop_box(rng)
    img = _fit(img, item, box, flip)
    if color_rng is not None:
        img = _color_jitter(img, color_rng)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    bw, bh = item.placement.bucket
    mask = None
    if opts.alpha_mask:
        full = (torch.from_numpy(np.asarray(_fit(alpha, item, box, flip), dtype=np.float32) / 255.0)
                if alpha is not None else torch.ones(bh, bw))
        # area-averaged to the latent grid, as kohya's masked loss does (and 64x smaller to cache)
        mask = F.interpolate(full[None, None], size=(bh // LATENT_FACTOR, bw // LATENT_FACTOR), mode="area")[0, 0]
    size = SizeInfo(original_hw=(item.size[1], item.size[0]), crop_top_left=(box[1], box[0]), target_hw=(bh, bw))
    return Prepared(tensor, size, mask)


def _fit(img: Image.Image, item: ImageItem, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    img = img.resize(item.placement.resized, Image.Resampling.LANCZOS).crop(box)
    return ImageOps.mirror(img) if flip else img


def _color_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """kohya-like colour augmentation: a small hue rotation plus brightness/saturation jitter."""
    shift = rng.uniform(-0.05, 0.05)
    hsv = np.asarray(img.convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(shift * 255)) % 256
    img = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.9, 1.1))


def size_info(item: ImageItem) -> SizeInfo:
    """Size conditioning of a centre-cropped item (what cached latents were made from)."""
    left, top, _, _ = item.placement.crop_box(None)
    bw, bh = item.placement.bucket
    return SizeInfo((item.size[1], item.size[0]), (top, left), (bh, bw))


# ------------------------------------------------------------------------------------------------------------
# Latent cache


class LatentCache:
    """Latents per (image content, bucket, resize, crop, flip, VAE); in memory and optionally on disk.

    The key hashes the image file's bytes, so an edited image, a new resolution or bucket setting, a different
    flip, or another VAE can never pick up a stale entry.
    """

    def __init__(self, vae_id: str, to_disk: bool, opts: AugmentOptions = AugmentOptions()):
        self.vae_id = vae_id
        self.to_disk = to_disk
        self.background = opts.background
        self.with_masks = opts.alpha_mask
        self._mem: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._file_hash: dict[tuple[str, int, int], str] = {}
        self._disk_ok = True

    def key(self, item: ImageItem, flip: bool) -> str:
        p = item.placement
        parts = [CACHE_FORMAT, self._content_hash(item.path), str(p.bucket), str(p.resized),
                 str(p.crop_box(None)), str(flip), str(self.background), self.vae_id]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _content_hash(self, path: str) -> str:
        st = os.stat(path)
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo not in self._file_hash:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._file_hash[memo] = h.hexdigest()
        return self._file_hash[memo]

    def _disk_path(self, item: ImageItem, key: str) -> str:
        stem = os.path.splitext(os.path.basename(item.path))[0]
        return os.path.join(os.path.dirname(item.path), CACHE_DIR, f"{stem}.{key[:20]}.safetensors")

    def get(self, item: ImageItem, flip: bool) -> torch.Tensor | None:
        key = self.key(item, flip)
        if key in self._mem and (key in self._masks or not self.with_masks):
            return self._mem[key]
        if self.to_disk:
            path = self._disk_path(item, key)
            if os.path.isfile(path):
                try:
                    tensors = load_file(path)
                except Exception as e:  # a torn or foreign file: re-encode it
                    log.warning("latent cache %s is unreadable (%s); encoding again", path, e)
                    return None
                if self.with_masks and "mask" not in tensors:
                    return None  # cached before alpha_mask was turned on
                self._mem[key] = tensors["latents"]
                if "mask" in tensors:
                    self._masks[key] = tensors["mask"]
                return self._mem[key]
        return None

    def mask(self, item: ImageItem, flip: bool) -> torch.Tensor | None:
        return self._masks.get(self.key(item, flip))

    def put(self, item: ImageItem, flip: bool, latents: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        key = self.key(item, flip)
        latents = latents.detach().to("cpu", torch.float32).contiguous()
        self._mem[key] = latents
        tensors = {"latents": latents}
        if mask is not None:
            self._masks[key] = tensors["mask"] = mask.contiguous()
        if self.to_disk and self._disk_ok:
            path = self._disk_path(item, key)
            try:
                atomic_write_with(path, lambda tmp: save_file(tensors, tmp, {"key": key}))
            except OSError as e:
                self._disk_ok = False
                log.warning("cannot write the latent cache next to the images (%s); keeping it in memory only", e)

    def __len__(self) -> int:
        return len(self._mem)


def cache_latents(dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor], cache: LatentCache,
                  opts: AugmentOptions, batch_size: int = 4,
                  on_progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
    """Encode every (item, flip) the cache lacks, a bucket at a time. Returns (encoded, reused)."""
    flips = (False, True) if opts.flip_aug else (False,)
    todo = [(it, f) for it in dataset.items for f in flips if cache.get(it, f) is None]
    reused = len(dataset.items) * len(flips) - len(todo)
    by_bucket: dict[tuple[int, int], list[tuple[ImageItem, bool]]] = {}
    for it, f in todo:
        by_bucket.setdefault(it.placement.bucket, []).append((it, f))
    done = 0
    for group in by_bucket.values():
        for i in range(0, len(group), batch_size):
            if should_stop is not None and should_stop():
                return done, reused
            chunk = group[i:i + batch_size]
            prepared = [prepare_image(it, None, f, None, opts) for it, f in chunk]
            latents = encode(torch.stack([p.pixels for p in prepared]))
            for (it, f), lat, p in zip(chunk, latents, prepared):
                cache.put(it, f, lat, p.mask)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, len(todo))
    return done, reused


# ------------------------------------------------------------------------------------------------------------
# Batches


_PLAIN = "conditioning"  # TextCache's key for a conditioning that is a plain tensor


class TextCache:
    """Text-encoder outputs per item, for runs whose captions never change (the text encoders can then leave the
    GPU). Items whose captions need fewer 75-token chunks than others in a batch are padded with the encoding of an
    empty chunk, which is exactly what encoding the batch together does (chunks are encoded independently)."""

    def __init__(self) -> None:
        self.per_item: dict[int, dict[str, torch.Tensor]] = {}
        self.empty: dict[str, torch.Tensor] = {}
        self.plain = False  # the bundle's conditioning is one tensor (the WebUI's SD1/SD2), not a dict

    @torch.no_grad()
    def fill(self, dataset: Dataset, encode: Callable[[list[str], list[SizeInfo]], Any],
             caption_opts: CaptionOptions) -> None:
        rng = random.Random(0)  # captions are fixed here (validated); process_caption still wants a generator
        empty = encode([""], [size_info(dataset.items[0])])
        self.plain = isinstance(empty, torch.Tensor)
        self.empty = self._first(empty)
        for i, item in enumerate(dataset.items):  # one at a time keeps each caption's own chunk count
            caption = process_caption(item.caption, caption_opts, rng, 1)
            self.per_item[i] = self._first(encode([caption], [size_info(item)]))

    def _first(self, cond: Any) -> dict[str, torch.Tensor]:
        """The first (only) row of a batch's conditioning, on the CPU, as a dict."""
        return {k: v[0].cpu() for k, v in ({_PLAIN: cond} if self.plain else cond).items()}

    def batch(self, indices: list[int], device: torch.device) -> Any:
        """The conditioning of these items, in the shape the bundle's `encode_prompts` gives it."""
        conds = [self.per_item[i] for i in indices]
        out = {}
        for key in conds[0]:
            longest = max(c[key].shape[0] for c in conds) if conds[0][key].dim() > 1 else None
            parts = [c[key] if longest is None else self._pad(key, c[key], longest) for c in conds]
            out[key] = torch.stack(parts).to(device)
        return out[_PLAIN] if self.plain else out

    def _pad(self, key: str, value: torch.Tensor, length: int) -> torch.Tensor:
        while value.shape[0] < length:
            value = torch.cat([value, self.empty[key]])
        return value


@dataclass
class Batch:
    latents: torch.Tensor | None  # cached latents, or None when `pixels` must be encoded
    pixels: torch.Tensor | None
    captions: list[str]
    sizes: list[SizeInfo]
    is_reg: torch.Tensor  # bool per sample
    indices: list[int] | None = None  # dataset items, for the text-encoder cache
    masks: torch.Tensor | None = None  # B x H x W loss masks in [0, 1] with alpha_mask

    @property
    def has_reg(self) -> bool:
        """Whether any sample is a class image: read from the CPU flags' memory, no operator dispatched."""
        return bool(self.is_reg.numpy().any())


class BatchBuilder:
    def __init__(self, dataset: Dataset, caption_opts: CaptionOptions, aug: AugmentOptions,
                 cache: LatentCache | None):
        self.dataset = dataset
        self.caption_opts = caption_opts
        self.aug = aug
        self.cache = cache

    def build(self, indices: list[int], rng: random.Random, epoch: int) -> Batch:
        items = [self.dataset.items[i] for i in indices]
        flips = [self.aug.flip_aug and rng.random() < 0.5 for _ in items]
        captions = [process_caption(it.caption, self.caption_opts, rng, epoch) for it in items]
        is_reg = torch.tensor([it.is_reg for it in items])
        if self.cache is not None:
            lat = [self.cache.get(it, f) for it, f in zip(items, flips)]
            if all(x is not None for x in lat):
                masks = torch.stack([self.cache.mask(it, f) for it, f in zip(items, flips)]) \
                    if self.aug.alpha_mask else None
                return Batch(torch.stack(lat), None, captions, [size_info(it) for it in items], is_reg, indices,
                             masks)
        crop_rng = rng if self.aug.random_crop else None
        color_rng = rng if self.aug.color_aug else None
        prepared = [prepare_image(it, crop_rng, f, color_rng, self.aug) for it, f in zip(items, flips)]
        pixels = torch.stack([p.pixels for p in prepared])
        masks = torch.stack([p.mask for p in prepared]) if self.aug.alpha_mask else None
        return Batch(None, pixels, captions, [p.size for p in prepared], is_reg, indices, masks)
