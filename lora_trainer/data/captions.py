"""Captions: finding and decoding caption files, kohya-style caption processing, and tag frequencies."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FALLBACK_EXTENSIONS = (".caption", ".txt")
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")


def caption_candidates(image_path: str, caption_extension: str) -> list[str]:
    """Caption files tried for an image, in order: the configured extension, then .caption and .txt."""
    stem = os.path.splitext(image_path)[0]
    exts = [caption_extension] + [e for e in FALLBACK_EXTENSIONS if e != caption_extension]
    return [stem + e for e in exts if e]


def read_caption_file(path: str) -> str:
    """Text of a caption file: UTF-8 (with or without BOM), else a legacy encoding with a warning."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        for enc in _FALLBACK_ENCODINGS:
            try:
                text = raw.decode(enc)
                log.warning("%s is not UTF-8; read it as %s (save captions as UTF-8 to be sure)", path, enc)
                break
            except UnicodeDecodeError:
                continue
    return text.replace("\r\n", "\n").strip()


def find_caption(image_path: str, caption_extension: str) -> tuple[str | None, str | None]:
    """(caption text, caption file) for an image; (None, None) when no caption file exists."""
    for cand in caption_candidates(image_path, caption_extension):
        if os.path.isfile(cand):
            return read_caption_file(cand), cand
    return None, None


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    separator: str = ","

    @property
    def touches_tags(self) -> bool:
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int) -> str:
    """The caption as trained on this step (kohya semantics).

    Whole-caption dropout (random, or every N-th epoch, epochs counted from 1) gives "". Otherwise only the first
    line is used; with shuffling or tag dropout the tags are split on the separator, the first `keep_tokens`
    (or everything before `keep_tokens_separator`, and after its second occurrence) stay in place, and the rest
    are shuffled and/or dropped.
    """
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        return ""
    caption = caption.split("\n")[0]
    if not opts.touches_tags:
        return caption
    fixed, flex, suffix = _split_fixed(caption, opts)
    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def _split_fixed(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    sep = opts.keep_tokens_separator
    if sep and sep in caption:
        head, rest = caption.split(sep, 1)
        tail = ""
        if sep in rest:
            rest, tail = rest.split(sep, 1)
        return split_tags(head, opts.separator), split_tags(rest, opts.separator), split_tags(tail, opts.separator)
    tags = split_tags(caption, opts.separator)
    k = opts.keep_tokens
    return tags[:k], tags[k:], []


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """kohya's `ss_tag_frequency` counting: comma-split, stripped, lower-cased, once per caption occurrence."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(t.lower() for t in (x.strip() for x in caption.split(",")) if t)
    return dict(counts)


def format_tag_file(freq_by_dir: dict[str, dict[str, int]], alphabetical: bool) -> str:
    """The tag-frequency text file: one section per folder, `count tag` per line."""
    total: Counter[str] = Counter()
    for freq in freq_by_dir.values():
        total.update(freq)
    lines = [f"# tags in {len(freq_by_dir)} folder(s), {len(total)} distinct"]
    key = (lambda kv: kv[0]) if alphabetical else (lambda kv: (-kv[1], kv[0]))
    for tag, n in sorted(total.items(), key=key):
        lines.append(f"{n}\t{tag}")
    return "\n".join(lines) + "\n"
