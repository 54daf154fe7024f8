"""sd-scripts dataset configs (`dataset_config`, kohya-ss/sd-scripts `library/config_util.py`) as our folders.

A dataset config lists subsets, one image folder each with its repeats, class tokens, caption options and whether
it holds regularisation images, under `[general]` and `[[datasets]]` defaults. Train LoRA reads kohya's folder
layout instead: `train_data_dir` (and `reg_data_dir`) holds `N_name` folders, N being the repeats. Subsets map when
their folders are `N_name` folders of one parent folder, the layout of the kohya_ss GUI and of sd-scripts' own
DreamBooth mode; any other subset is listed with what to rename or move. Each option takes its value as sd-scripts
does (the subset's, else its dataset's, else `[general]`'s, else the main config's); Train LoRA has one value per
option for every folder, so a folder whose value differs is listed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import config as cfgmod
from .data.dataset import _FOLDER_RE
from .errors import UserError
from .kohya_config import REASONS, OptionMap, blank, neutral, number, read_toml, resolution_text

# Per-folder options in sd-scripts, one value for all folders here (same names).
SUBSET_OPTIONS = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "flip_aug",
                  "color_aug", "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                  "caption_tag_dropout_rate", "alpha_mask")
# Per-dataset options in sd-scripts -> ours.
DATASET_OPTIONS = {"resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
                   "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
                   "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale"}
# sd-scripts' defaults (DreamBoothSubsetParams, DreamBoothDatasetParams).
DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "caption_extension": ".caption", "shuffle_caption": False, "keep_tokens": 0,
    "keep_tokens_separator": "", "flip_aug": False, "color_aug": False, "random_crop": False,
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    "alpha_mask": False, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False,
}
KNOWN = frozenset({*SUBSET_OPTIONS, *DATASET_OPTIONS, "image_dir", "num_repeats", "is_reg", "class_tokens",
                   "subsets", "cache_info", "debug_dataset", "metadata_file", "conditioning_data_dir"})


@dataclass(frozen=True)
class _Subset:
    label: str  # datasets[0].subsets[1]
    options: Mapping[str, Any]
    layers: tuple[Mapping[str, Any], ...]  # where a value is looked up: subset, dataset, [general], main config

    def value(self, key: str) -> Any:
        return _lookup(key, self.layers)

    @property
    def is_reg(self) -> bool:
        return bool(self.options.get("is_reg"))


def import_datasets(m: OptionMap, config_path: str, ref: str, options: Mapping[str, Any]) -> None:
    """Map the dataset config `ref` (named in `config_path`) onto `m`; `options` are the main config's, the last
    fallback for every dataset and subset option."""
    path = _locate(config_path, ref)
    import_dataset_data(m, path, _read(path), options)


def import_dataset_data(m: OptionMap, path: str, data: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    general = data.get("general") or {}
    datasets = [d for d in data.get("datasets") or [] if isinstance(d, dict)]
    for key in data:
        if key not in ("general", "datasets"):
            m.skip(key, data[key], f"not a section of a dataset config ({os.path.basename(path)})")
    _unsupported_keys(m, general, datasets)
    if not datasets:
        m.skip("dataset_config", path, "holds no [[datasets]]: there are no images to train on")
    main = {**options, "batch_size": options.get("train_batch_size"), "num_repeats": options.get("dataset_repeats"),
            "caption_extension": options.get("caption_extension") or options.get("caption_extention")}
    _dataset_options(m, datasets, general, main)
    subsets = [_Subset(f"datasets[{i}].subsets[{j}]", sub, (sub, ds, general, main))
               for i, ds in enumerate(datasets) for j, sub in enumerate(ds.get("subsets") or [])]
    usable = [s for s in subsets if _usable(m, s)]
    _subset_options(m, usable)
    _folders(m, usable)


def _lookup(key: str, layers: tuple[Mapping[str, Any], ...]) -> Any:
    for layer in layers:
        if layer.get(key) is not None:
            return layer[key]
    return DEFAULTS.get(key)


def _normal(name: str, value: Any) -> Any:
    """A value as our option holds it, to compare folders' values (kohya GUI values are often strings)."""
    if name == "resolution":
        return resolution_text(value)
    if name == "keep_tokens_separator" and value is None:
        return ""
    try:
        return cfgmod.coerce(name, value)
    except (ValueError, UserError):
        return value


def _dataset_options(m: OptionMap, datasets: list[dict[str, Any]], general: Mapping[str, Any],
                     main: Mapping[str, Any]) -> None:
    for key, ours in DATASET_OPTIONS.items():
        values = [_lookup(key, (ds, general, main)) for ds in datasets]
        if not values or values[0] is None:
            continue
        first = _normal(ours, values[0])
        m.set(ours, first, f"datasets[0].{key}")
        for i, value in enumerate(values[1:], 1):
            if _normal(ours, value) != first:
                m.skip(f"datasets[{i}].{key}", value, f"Train LoRA trains every image with one {ours}: {first!r} "
                                                      f"(datasets[0]) is used")


def _usable(m: OptionMap, s: _Subset) -> bool:
    """DreamBooth-style subsets (an image folder with captions) are; fine-tuning and ControlNet ones are not."""
    for key in ("metadata_file", "conditioning_data_dir"):
        if key in s.options:
            m.skip(f"{s.label}.{key}", s.options[key], REASONS["in_json" if key == "metadata_file" else key])
            return False
    if blank(s.options.get("image_dir")):
        m.skip(s.label, dict(s.options), "has no image_dir")
        return False
    return True


def _subset_options(m: OptionMap, subsets: list[_Subset]) -> None:
    if not subsets:
        return
    lead = next((s for s in subsets if not s.is_reg), subsets[0])
    for key in SUBSET_OPTIONS:
        chosen = _normal(key, lead.value(key))
        m.set(key, chosen, f"{lead.label}.{key}")
        for s in subsets:
            value = _normal(key, s.value(key))
            if value != chosen:
                m.skip(f"{s.label}.{key}", value, f"Train LoRA uses one {key} for every folder: {chosen!r} "
                                                  f"({lead.label}) is used")


def _unsupported_keys(m: OptionMap, general: Mapping[str, Any], datasets: list[dict[str, Any]]) -> None:
    places: list[tuple[str, Mapping[str, Any]]] = [("general", general)]
    for i, ds in enumerate(datasets):
        places.append((f"datasets[{i}]", ds))
        places.extend((f"datasets[{i}].subsets[{j}]", sub) for j, sub in enumerate(ds.get("subsets") or []))
    for where, table in places:
        for key, value in table.items():
            if key not in KNOWN and not neutral(key, value):
                m.skip(f"{where}.{key}", value, REASONS.get(key, "not a dataset option Train LoRA has"))


# ----------------------------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class _Folder:
    label: str
    image_dir: str
    parent: str
    name: str


def _folders(m: OptionMap, subsets: list[_Subset]) -> None:
    train = [f for s in subsets if not s.is_reg if (f := _folder(m, s, "training")) is not None]
    reg = [f for s in subsets if s.is_reg if (f := _folder(m, s, "regularisation")) is not None]
    train_dir = _place(m, train, "train_data_dir")
    reg_dir = _place(m, reg, "reg_data_dir", avoid=train_dir)
    if train_dir is None and subsets:
        m.skip("train_data_dir", "", "no training subset is in an 'N_name' folder: there is nothing to train on "
                                     "until the folders above are renamed")
    m.set("train_data_dir", train_dir or "", "dataset_config")
    m.set("reg_data_dir", reg_dir or "", "dataset_config")


def _folder(m: OptionMap, s: _Subset, role: str) -> _Folder | None:
    image_dir = str(s.options["image_dir"])
    parent, name = split_dir(image_dir)
    repeats, tokens = int(number(s.value("num_repeats")) or 1), s.value("class_tokens")
    match = _FOLDER_RE.match(name)
    if not match or int(match.group(1)) < 1:
        m.skip(f"{s.label}.image_dir", image_dir, f"Train LoRA reads kohya's 'N_name' folders: rename it to "
                                                  f"'{repeats}_{tokens or name}' and keep it in one folder with the "
                                                  f"other {role} folders")
        return None
    if int(match.group(1)) != repeats:
        m.skip(f"{s.label}.num_repeats", repeats, f"Train LoRA takes the repeats from the folder name "
                                                  f"({match.group(1)}): rename the folder to "
                                                  f"'{repeats}_{match.group(2)}' to keep {repeats}")
    if not blank(tokens) and str(tokens).strip() != match.group(2).strip():
        m.skip(f"{s.label}.class_tokens", tokens, f"images without a caption file are trained with the folder's "
                                                  f"name, {match.group(2).strip()!r}")
    return _Folder(s.label, image_dir, parent, name)


def _place(m: OptionMap, folders: list[_Folder], role: str, avoid: str | None = None) -> str | None:
    """The parent folder most subsets share; subsets elsewhere and unlisted `N_name` folders in it are listed."""
    if avoid is not None:
        for f in [f for f in folders if _same(f.parent, avoid)]:
            m.skip(f"{f.label}.image_dir", f.image_dir, "regularisation folders need their own folder "
                                                        "(reg_data_dir), apart from the training folders")
        folders = [f for f in folders if not _same(f.parent, avoid)]
    if not folders:
        return None
    counts = Counter(_key(f.parent) for f in folders)
    best = max(counts, key=lambda k: counts[k])
    parent = next(f.parent for f in folders if _key(f.parent) == best)
    for f in folders:
        if _key(f.parent) != best:
            m.skip(f"{f.label}.image_dir", f.image_dir, f"not in {parent}: Train LoRA reads one {role} folder; "
                                                        f"move it there")
    extras = _unlisted_folders(parent, {f.name for f in folders if _key(f.parent) == best})
    if extras:
        m.skip(role, parent, f"also holds {', '.join(extras)}, which the dataset config does not train; Train "
                             f"LoRA trains every 'N_name' folder in it: move those out")
    return parent


def split_dir(path: str) -> tuple[str, str]:
    """(parent, folder name) of a folder path written with / or \\ (a config may come from another system)."""
    trimmed = path.rstrip("/\\") or path
    cut = max(trimmed.rfind("/"), trimmed.rfind("\\"))
    if cut < 0:
        return ".", trimmed
    return trimmed[:cut] or trimmed[0], trimmed[cut + 1:]


def _key(path: str) -> str:
    return os.path.normcase(path.replace("\\", "/").rstrip("/"))


def _same(a: str, b: str) -> bool:
    return _key(a) == _key(b)


def _unlisted_folders(parent: str, listed: set[str]) -> list[str]:
    try:
        names = sorted(os.listdir(parent))
    except OSError:  # not on this machine (yet): nothing to compare
        return []
    return [n for n in names if n not in listed and os.path.isdir(os.path.join(parent, n))
            and (match := _FOLDER_RE.match(n)) is not None and int(match.group(1)) >= 1]


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _locate(config_path: str, ref: str) -> str:
    """sd-scripts opens dataset_config from the working folder; beside the config file is tried next."""
    candidates = [ref] if os.path.isabs(ref) else [ref, os.path.join(os.path.dirname(os.path.abspath(config_path)),
                                                                     ref)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"{config_path}: dataset_config {ref!r} not found (looked for {' and '.join(candidates)}); "
                    f"put the dataset config there or correct the path")


def _read(path: str) -> dict[str, Any]:
    if not path.lower().endswith(".json"):
        return read_toml(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}; fix it there") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text file ({e}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object with 'general' and 'datasets'")
    return data
