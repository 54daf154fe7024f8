"""Class (prior-preservation) images: what each class folder lacks per bucket, generated and saved one by one.

A class folder asks for images through a concept's `num_class_images_per`, or through the config's
`num_class_images_per` for the `N_class` folders of reg_data_dir. As in the Dreambooth extension
(`dataset/class_dataset.py`), the target of a bucket is (training images in that bucket) x that number; the
prompts are the class prompt filled with each training image's `[filewords]` (a kohya folder: its class tokens).

The missing images are rendered with the model's own txt2img (`bundle.sample`: the WebUI's `process_images` inside
the WebUI, the diffusers sampler headless) at exactly the bucket's resolution, and each is saved as soon as it is
made (caption `.txt`, then the PNG, both written atomically). An interrupted generation keeps what it made; the
next run counts those and makes only the rest. Seeds derive from the prompt, size and image number, so the same
images come out again.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from .data.buckets import Size
from .data.captions import find_caption
from .data.concepts import file_text
from .data.dataset import Dataset, ImageItem, Subset, balance_reg
from .fileio import atomic_write_text, atomic_write_with, clean_stale_temporaries
from .model import ModelBundle, SamplePrompt

log = logging.getLogger(__name__)

PREFIX = "class"


@dataclass(frozen=True)
class ClassSettings:
    """Generation settings of kohya reg folders (a concept brings its own)."""

    negative_prompt: str = ""
    cfg_scale: float = 7.5
    steps: int = 40
    sampler: str = "euler_a"


@dataclass
class ClassJob:
    """Images to make for one bucket of one class folder."""

    subset: Subset
    bucket: Size
    prompts: list[str]  # one per training image in the bucket; image number n uses prompts[n % len]
    first: int  # class images the bucket already has
    count: int  # images to make
    settings: ClassSettings

    @property
    def folder(self) -> str:
        return self.subset.image_dir

    def prompt(self, number: int) -> SamplePrompt:
        text = self.prompts[number % len(self.prompts)]
        w, h = self.bucket
        seed = zlib.crc32(f"{text}|{w}x{h}|{number}".encode()) & 0x7FFFFFFF
        s = self.settings
        return SamplePrompt(text, s.negative_prompt, w, h, seed, s.steps, s.cfg_scale, s.sampler,
                            name=f"{PREFIX}-{w}x{h}-{number:05d}")


def plan_class_images(ds: Dataset, defaults: ClassSettings, caption_extension: str) -> list[ClassJob]:
    """The images every class folder still lacks, per bucket (empty when all are there)."""
    jobs: list[ClassJob] = []
    for reg in ds.subsets:
        if reg.is_reg and reg.class_per > 0:
            jobs.extend(_jobs_for(reg, ds, _settings(reg, defaults), caption_extension))
    return jobs


def _settings(reg: Subset, defaults: ClassSettings) -> ClassSettings:
    c = reg.concept
    if c is None:
        return defaults
    return ClassSettings(c.class_negative_prompt, c.class_guidance_scale, c.class_infer_steps, defaults.sampler)


def _jobs_for(reg: Subset, ds: Dataset, settings: ClassSettings, caption_extension: str) -> list[ClassJob]:
    prompts: dict[Size, list[str]] = defaultdict(list)
    for item in ds.train_items:
        if reg.source is None or item.subset is reg.source:
            prompts[item.placement.bucket].append(_class_prompt(reg, item, caption_extension))
    have = Counter(i.placement.bucket for i in ds.reg_items if i.subset is reg)
    jobs = []
    for bucket, texts in sorted(prompts.items()):
        missing = len(texts) * reg.class_per - have[bucket]
        if missing > 0:
            jobs.append(ClassJob(reg, bucket, texts, have[bucket], missing, settings))
    return jobs


def _class_prompt(reg: Subset, item: ImageItem, caption_extension: str) -> str:
    if reg.concept is None:
        return reg.class_tokens
    caption, caption_file = find_caption(item.path, caption_extension)
    return reg.concept.caption(file_text(item.path, caption if caption_file else None), is_class=True)


def with_planned(ds: Dataset, jobs: list[ClassJob]) -> Dataset:
    """The dataset as it will be once the planned images exist (for the step plan before they are made)."""
    if not jobs:
        return ds
    items = [replace(i) for i in ds.items]
    for job in jobs:
        placement = ds.planner.place(*job.bucket)
        for k in range(job.count):
            p = job.prompt(job.first + k)
            items.append(ImageItem(os.path.join(job.folder, p.name + ".png"), job.subset, p.prompt, job.bucket,
                                   placement, 1))
    balance_reg([i for i in items if not i.is_reg], [i for i in items if i.is_reg])
    return Dataset(items, ds.subsets, ds.report, ds.planner)


def generate(jobs: list[ClassJob], bundle: ModelBundle, on_progress: Callable[[int, int], None],
             should_stop: Callable[[], bool]) -> int:
    """Render and save every planned image; returns how many were saved (fewer when stopped or interrupted)."""
    total, done = sum(j.count for j in jobs), 0
    for job in jobs:
        os.makedirs(job.folder, exist_ok=True)
        clean_stale_temporaries(job.folder)
        number = job.first
        for _ in range(job.count):
            on_progress(done, total)
            if should_stop():
                return done
            number = _free_number(job, number)
            prompt = job.prompt(number)
            number += 1
            images = bundle.sample([prompt])
            if not images:  # the WebUI was interrupted mid-image
                return done
            save_class_image(job.folder, prompt, images[0])
            done += 1
    on_progress(done, total)
    return done


def _free_number(job: ClassJob, number: int) -> int:
    """The first image number from `number` on whose PNG does not exist (images the user removed or renamed
    leave gaps; an existing image is never overwritten)."""
    while os.path.exists(os.path.join(job.folder, job.prompt(number).name + ".png")):
        number += 1
    return number


def save_class_image(folder: str, p: SamplePrompt, image) -> str:
    """Caption first, then the PNG: a crash between them leaves a caption without an image, which the next run
    overwrites (the image number is free again), never an image without its caption."""
    from PIL.PngImagePlugin import PngInfo

    stem = os.path.join(folder, p.name)
    atomic_write_text(stem + ".txt", p.prompt + "\n")
    info = PngInfo()
    info.add_text("parameters", image.info.get("parameters") or (
        f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Sampler: {p.sampler}, "
        f"CFG scale: {p.cfg_scale}, Seed: {p.seed}, Size: {p.width}x{p.height}"))
    if image.size != (p.width, p.height):  # a host that rounds sizes differently: match the bucket exactly
        image = image.resize((p.width, p.height))
    atomic_write_with(stem + ".png", lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return stem + ".png"
