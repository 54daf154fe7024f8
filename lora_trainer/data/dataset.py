"""kohya-style datasets: `N_name` folders, repeats, regularisation images, buckets, and the per-epoch batch plan.

Scanning reads only image headers (sizes) and caption files; pixels are decoded when latents are cached or a batch
is built. Unreadable images are skipped with one warning each and counted in the summary; training refuses to start
only when no usable image is left.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..errors import UserError
from .buckets import BucketPlanner, Placement, Size, UnplaceableImage
from .captions import find_caption, tag_frequency
from .concepts import Concept, file_text
from .images import UnreadableImage, check_decodable, image_size, is_image_file

log = logging.getLogger(__name__)

_FOLDER_RE = re.compile(r"^(\d+)_(.*)$")
UPSCALE_WARN = 1.5  # enlarging more than this makes an image visibly soft
_MAX_LISTED = 10  # per-file warnings of one kind before they are summed up


@dataclass
class Subset:
    image_dir: str
    num_repeats: int
    class_tokens: str
    is_reg: bool = False
    img_count: int = 0
    concept: Concept | None = None  # captions follow the concept's prompts and [filewords] rules
    class_per: int = 0  # (reg) class images wanted per training image; the missing ones are generated
    source: Subset | None = None  # (reg) the training subset those are counted from; None = all training images

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.image_dir))


@dataclass
class ImageItem:
    path: str
    subset: Subset
    caption: str
    size: Size  # (width, height) after EXIF rotation
    placement: Placement
    repeats: int = 1

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg


@dataclass
class ScanReport:
    """What scanning found; shown to the user before training and stored in the run summary."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    ignored_folders: list[str] = field(default_factory=list)
    captions_from_folder: int = 0
    orphan_captions: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    upscaled: list[tuple[str, float]] = field(default_factory=list)  # (path, factor) enlarged by UPSCALE_WARN+

    def as_dict(self) -> dict:
        return {"skipped_images": len(self.skipped), "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "ignored_folders": self.ignored_folders, "captions_from_folder_name": self.captions_from_folder,
                "caption_files_without_image": len(self.orphan_captions),
                "empty_caption_files": len(self.empty_captions),
                "upscaled_images": len(self.upscaled),
                "upscaled": [{"path": p, "factor": round(f, 2)} for p, f in self.upscaled]}

    def log_summary(self) -> None:
        """One line for what was skipped or changed, after the per-file warnings."""
        if self.skipped or self.upscaled or self.empty_captions or self.orphan_captions:
            log.warning("dataset: %d image(s) skipped, %d enlarged by %.1fx or more, %d empty caption file(s), %d "
                        "caption file(s) without an image", len(self.skipped), len(self.upscaled), UPSCALE_WARN,
                        len(self.empty_captions), len(self.orphan_captions))


def scan_subsets(root: str, is_reg: bool, report: ScanReport) -> list[Subset]:
    """The `N_name` subfolders of `root` (N = repeats); other folders are ignored with a warning."""
    role = "reg_data_dir" if is_reg else "train_data_dir"
    if not root:
        return []
    if not os.path.isdir(root):
        raise UserError(f"{role}: folder not found: {root}")
    subsets = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if not os.path.isdir(full) or name.startswith("."):
            continue
        m = _FOLDER_RE.match(name)
        if not m or int(m.group(1)) < 1:
            report.ignored_folders.append(full)
            log.warning("ignoring folder %s: name it 'N_name' (N = repeats, e.g. 10_mychar) to train on it", full)
            continue
        subsets.append(Subset(full, int(m.group(1)), m.group(2).strip(), is_reg))
    if not subsets:
        raise UserError(f"{role}: {root} has no 'N_name' subfolders (e.g. '10_mychar' = images repeated 10 times "
                        f"per epoch); put the images in such a folder")
    return subsets


def scan_images(subset: Subset, planner: BucketPlanner, caption_extension: str,
                report: ScanReport) -> list[ImageItem]:
    items: list[ImageItem] = []
    if subset.is_reg and subset.class_per and not os.path.isdir(subset.image_dir):
        return items  # a class folder whose images are still to be generated
    names = sorted(os.listdir(subset.image_dir))
    for name in names:
        path = os.path.join(subset.image_dir, name)
        if not os.path.isfile(path) or not is_image_file(name):
            continue
        try:
            w, h = image_size(path)
            placement = planner.place(w, h)
            check_decodable(path)
        except UnreadableImage as e:
            _skip(report, path, str(e))
            continue
        except UnplaceableImage as e:
            _skip(report, path, f"{path}: {e}")
            continue
        if placement.scale >= UPSCALE_WARN:
            _note_upscale(report, path, w, h, placement)
        items.append(ImageItem(path, subset, _caption_for(path, subset, caption_extension, report), (w, h),
                               placement, subset.num_repeats))
    _note_orphan_captions(subset.image_dir, names, caption_extension, report)
    subset.img_count = len(items)
    return items


def _skip(report: ScanReport, path: str, reason: str) -> None:
    report.skipped.append((path, reason))
    log.warning("skipping %s", reason)


def _note_upscale(report: ScanReport, path: str, w: int, h: int, placement: Placement) -> None:
    report.upscaled.append((path, placement.scale))
    if len(report.upscaled) <= _MAX_LISTED:
        bw, bh = placement.bucket
        log.warning("%s: %dx%d is enlarged %.1fx to fill its %dx%d bucket and will look soft; use a larger image "
                    "or bucket_no_upscale", path, w, h, placement.scale, bw, bh)
    elif len(report.upscaled) == _MAX_LISTED + 1:
        log.warning("more images are enlarged; the run summary lists them all")


def _caption_for(path: str, subset: Subset, caption_extension: str, report: ScanReport) -> str:
    caption, caption_file = find_caption(path, caption_extension)
    if subset.concept is not None:
        if caption_file is not None and not caption:
            report.empty_captions.append(caption_file)
        return subset.concept.caption(file_text(path, caption_file and caption), subset.is_reg)
    if caption_file is not None and not caption:
        report.empty_captions.append(caption_file)
        log.warning("caption file %s is empty; the image is trained with the folder's class tokens %r",
                    caption_file, subset.class_tokens)
    if not caption:
        report.captions_from_folder += 1
        return subset.class_tokens
    return caption


def _note_orphan_captions(folder: str, names: list[str], caption_extension: str, report: ScanReport) -> None:
    stems = {os.path.splitext(n)[0] for n in names if is_image_file(n)}
    exts = {caption_extension, ".txt", ".caption"}
    for n in names:
        stem, ext = os.path.splitext(n)
        if ext in exts and stem not in stems:
            report.orphan_captions.append(os.path.join(folder, n))
            log.warning("caption file %s has no image beside it; it is ignored", os.path.join(folder, n))


def balance_reg(train: list[ImageItem], reg: list[ImageItem]) -> None:
    """kohya's rule: regularisation images (with repeats) are cycled until they match the training images."""
    if not reg:
        return
    target = sum(i.repeats for i in train)
    for r in reg:
        r.repeats = 0
    n, first = 0, True
    while n < target:
        for r in reg:
            if first:
                r.repeats = r.subset.num_repeats
                n += r.repeats
            else:
                r.repeats += 1
                n += 1
            if n >= target:
                break
        first = False


@dataclass
class Dataset:
    items: list[ImageItem]
    subsets: list[Subset]
    report: ScanReport
    planner: BucketPlanner

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [i for i in self.items if i.is_reg]

    @property
    def num_train_images(self) -> int:
        """Training images counted with repeats (kohya's ss_num_train_images)."""
        return sum(i.repeats for i in self.train_items)

    @property
    def num_reg_images(self) -> int:
        return sum(i.repeats for i in self.reg_items)

    def bucket_counts(self) -> dict[Size, int]:
        counts: Counter[Size] = Counter()
        for it in self.items:
            counts[it.placement.bucket] += it.repeats
        return dict(sorted(counts.items()))

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(n / batch_size) for n in self.bucket_counts().values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """Item indices of every batch of `epoch`, each batch from a single bucket; the same for the same seed."""
        rng = random.Random(f"batches-{seed}-{epoch}")
        by_bucket: dict[Size, list[int]] = defaultdict(list)
        for idx, it in enumerate(self.items):
            by_bucket[it.placement.bucket].extend([idx] * it.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
        rng.shuffle(batches)
        return batches

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out = {}
        for s in self.subsets:
            if not s.is_reg:
                out[s.name] = tag_frequency(i.caption for i in self.items if i.subset is s)
        return out

    def bucket_info(self) -> dict:
        counts = self.bucket_counts()
        errors = [abs(i.placement.aspect_error) for i in self.items]
        return {"buckets": {str(k): {"resolution": list(r), "count": n} for k, (r, n) in enumerate(counts.items())},
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    def dataset_dirs(self, reg: bool = False) -> dict:
        return {s.name: {"n_repeats": s.num_repeats, "img_count": s.img_count} for s in self.subsets
                if s.is_reg == reg}


def concept_subsets(concepts: list[Concept], class_root: str) -> list[Subset]:
    """A training subset per concept, plus its class subset when it wants prior preservation
    (`num_class_images_per` > 0; an empty class_data_dir becomes `<class_root>/classifiers_<n>`)."""
    out = []
    for c in concepts:
        tokens = c.class_token or c.instance_token
        train = Subset(c.instance_data_dir, c.num_repeats, tokens, concept=c)
        out.append(train)
        if c.num_class_images_per > 0:
            folder = c.class_data_dir or os.path.join(class_root, f"classifiers_{c.index}")
            out.append(Subset(folder, 1, c.class_token, True, concept=c, class_per=c.num_class_images_per,
                              source=train))
    return out


def build_dataset(train_data_dir: str, reg_data_dir: str, planner: BucketPlanner, caption_extension: str,
                  concepts: list[Concept] | None = None, class_root: str = "", class_per: int = 0) -> Dataset:
    """kohya folders and/or concepts; `class_per` > 0 asks that many class images per training image of each
    reg_data_dir folder (generated later where missing)."""
    report = ScanReport()
    if not train_data_dir and not concepts:
        raise UserError("train_data_dir or concepts_list: neither is set; point train_data_dir at the folder that "
                        "holds your '10_name' image folders, or give a Dreambooth concepts list (a .json file or "
                        "the JSON array)")
    subsets = scan_subsets(train_data_dir, False, report)
    subsets += concept_subsets(concepts or [], class_root)
    for s in scan_subsets(reg_data_dir, True, report):
        s.class_per = class_per
        subsets.append(s)
    items: list[ImageItem] = []
    for s in subsets:
        found = scan_images(s, planner, caption_extension, report)
        if not found and not s.class_per:
            log.warning("%s holds no usable image", s.image_dir)
        items.extend(found)
    train = [i for i in items if not i.is_reg]
    if not train:
        where = train_data_dir or ", ".join(s.image_dir for s in subsets if not s.is_reg)
        raise UserError(f"{'train_data_dir' if train_data_dir else 'concepts_list'}: no usable image in {where} "
                        f"({len(report.skipped)} skipped as unreadable or too small); "
                        f"add .png/.jpg/.webp images to its folders")
    balance_reg(train, [i for i in items if i.is_reg])
    report.log_summary()
    return Dataset(items, subsets, report, planner)
