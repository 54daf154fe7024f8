"""Dreambooth-extension concepts lists: parsing, validation and the `[filewords]` caption rules.

The format is the d8ahazard/sd_dreambooth_extension one (`dreambooth/dataclasses/db_concept.py`): a JSON array of
objects with 18 fields, read from a file or pasted inline. Relative `instance_data_dir`/`class_data_dir`/
`save_sample_template` are taken from the JSON file's folder (inline JSON: the working folder). The legacy keys
`max_steps` and `num_class_images` of 2022 files are understood. Our one addition is `num_repeats` (kohya's repeats;
by default the `N_` prefix of the instance folder's name, else 1).

Unlike that extension, which drops an invalid concept silently, every problem is an error naming the concept (its
number and instance prompt) and the field. Unknown keys are errors too, with the nearest known name: every key the
extension ever wrote is known here, so an unknown one is a typo (`num_class_image_per` would otherwise silently turn
prior preservation off).

Captions follow `FilenameTextGetter` (`dreambooth/utils/image_utils.py`): `[filewords]` becomes the image's caption
file, or its file name without leading digits; then `instance_token`/`class_token` are inserted or swapped by the
rules in `_BOTH_TOKENS` below.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UserError
from .images import is_image_file

FILEWORDS = "[filewords]"

# name -> (type, default); the extension's 18 fields (is_valid is computed on load there and ignored here)
FIELDS: dict[str, tuple[type, Any]] = {
    "instance_data_dir": (str, ""), "class_data_dir": (str, ""), "instance_prompt": (str, ""),
    "class_prompt": (str, ""), "instance_token": (str, ""), "class_token": (str, ""),
    "class_negative_prompt": (str, ""), "class_guidance_scale": (float, 7.5), "class_infer_steps": (int, 60),
    "num_class_images_per": (int, 0), "save_sample_prompt": (str, ""), "save_sample_negative_prompt": (str, ""),
    "save_sample_template": (str, ""), "n_save_sample": (int, 1), "sample_seed": (int, -1),
    "save_guidance_scale": (float, 7.5), "save_infer_steps": (int, 20), "is_valid": (bool, False),
}
LEGACY: dict[str, tuple[type, Any]] = {"max_steps": (int, -1), "num_class_images": (int, 0)}
EXTRA: dict[str, tuple[type, Any]] = {"num_repeats": (int, 0)}
ALL_KEYS = {**FIELDS, **LEGACY, **EXTRA}
_MINIMUM = {"class_guidance_scale": 0, "class_infer_steps": 1, "num_class_images_per": 0, "n_save_sample": 0,
            "sample_seed": -1, "save_guidance_scale": 0, "save_infer_steps": 1, "max_steps": -1,
            "num_class_images": 0, "num_repeats": 0}
_PATH_KEYS = ("instance_data_dir", "class_data_dir", "save_sample_template")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # FilenameTextGetter.re_numbers_at_start
_REPEATS_PREFIX = re.compile(r"^(\d+)_")

log = logging.getLogger(__name__)


@dataclass
class Concept:
    index: int  # 1-based, as the extension's UI numbers concepts
    instance_data_dir: str
    class_data_dir: str = ""
    instance_prompt: str = ""
    class_prompt: str = ""
    instance_token: str = ""
    class_token: str = ""
    class_negative_prompt: str = ""
    class_guidance_scale: float = 7.5
    class_infer_steps: int = 60
    num_class_images_per: int = 0
    save_sample_prompt: str = ""
    save_sample_negative_prompt: str = ""
    save_sample_template: str = ""
    n_save_sample: int = 1
    sample_seed: int = -1
    save_guidance_scale: float = 7.5
    save_infer_steps: int = 20
    num_repeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return concept_label(self.index, self.instance_prompt)

    def caption(self, file_text: str, is_class: bool) -> str:
        """The training caption of an instance (or class) image whose own text is `file_text`."""
        prompt = (self.class_prompt if is_class else self.instance_prompt) or FILEWORDS
        return create_text(prompt, file_text, self.instance_token, self.class_token, is_class)


def concept_label(index: int, prompt: Any) -> str:
    return f"concept {index} ({prompt!r})" if isinstance(prompt, str) and prompt else f"concept {index}"


# ----------------------------------------------------------------------------------------------------------------
# [filewords] and the token rules


def file_text(image_path: str, caption: str | None) -> str:
    """What `[filewords]` stands for: the caption file's text, else the file name without leading digits."""
    if caption is not None:
        return caption
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return _LEADING_NUMBERS.sub("", stem)


def _word(token: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(token)}\b", flags=re.IGNORECASE)


def _keep(text: str, inst: str, cls: str) -> str:
    return text


def _drop_instance(text: str, inst: str, cls: str) -> str:
    return _word(inst).sub("", text)


def _instance_to_class(text: str, inst: str, cls: str) -> str:
    return _word(inst).sub(lambda _: cls, text)


def _normalise_instance(text: str, inst: str, cls: str) -> str:
    return _word(inst).sub(lambda _: inst, text)


def _class_to_instance(text: str, inst: str, cls: str) -> str:
    for article in ("a ", "the ", "an "):  # "a photo of a man" -> "a photo of man" -> "a photo of ohwx"
        text = re.sub(re.escape(article + cls), lambda _: cls, text)
    return _word(cls).sub(lambda _: inst, text)


def _prepend_instance(text: str, inst: str, cls: str) -> str:
    return f"{inst}, {text}"


def _prepend_class(text: str, inst: str, cls: str) -> str:
    return f"{cls}, {text}"


# With both tokens set: (is a class prompt, instance token in the text, class token in the text) -> rule
_BOTH_TOKENS: dict[tuple[bool, bool, bool], Callable[[str, str, str], str]] = {
    (True, True, True): _drop_instance,
    (True, True, False): _instance_to_class,
    (True, False, True): _keep,
    (True, False, False): _prepend_class,
    (False, True, True): _keep,
    (False, True, False): _normalise_instance,
    (False, False, True): _class_to_instance,
    (False, False, False): _prepend_instance,
}


def create_text(prompt: str, text: str, instance_token: str, class_token: str, is_class: bool) -> str:
    """`FilenameTextGetter.create_text`: fill `[filewords]`, then insert or swap the tokens (table above).

    With only one token: an instance prompt always gets `instance_token, ` in front, a class prompt
    `class_token, `. Afterwards whitespace runs become one space and backslashes are removed, as there.
    """
    out = prompt.replace(FILEWORDS, text)
    if instance_token and class_token:
        key = (is_class, bool(_word(instance_token).search(out)), bool(_word(class_token).search(out)))
        out = _BOTH_TOKENS[key](out, instance_token, class_token)
    elif instance_token and not is_class:
        out = _prepend_instance(out, instance_token, class_token)
    elif class_token and is_class:
        out = _prepend_class(out, instance_token, class_token)
    return re.sub(r"\s+", " ", out).replace("\\", "").strip()


# ----------------------------------------------------------------------------------------------------------------
# Loading


def read_concepts_source(value: str) -> tuple[Any, str]:
    """(decoded JSON, folder relative paths start from) of a concepts_list value: inline JSON or a file."""
    text = value.strip()
    if text.startswith(("[", "{")):
        return _decode(text, "the pasted JSON"), os.getcwd()
    if not os.path.isfile(text):
        raise UserError(f"concepts_list: {text!r} is neither a file nor JSON; give the path of a concepts .json "
                        f"file or paste the JSON array itself ([{{\"instance_data_dir\": ..., ...}}])")
    try:
        with open(text, encoding="utf-8-sig") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"concepts_list: cannot read {text}: {e.strerror}") from None
    return _decode(raw, text), os.path.dirname(os.path.abspath(text))


def _decode(raw: str, where: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"concepts_list: {where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        f"it must be a JSON array of concept objects") from None


def load_concepts(value: str) -> list[Concept]:
    """Every concept of a concepts_list value, validated; ConfigError listing each problem otherwise."""
    data, base = read_concepts_source(value)
    if isinstance(data, dict):
        data = [data]  # one concept pasted without the brackets
    if not isinstance(data, list):
        raise UserError(f"concepts_list: expected a JSON array of concepts, got {type(data).__name__} "
                        f"({json.dumps(data)[:40]})")
    if not data:
        raise UserError("concepts_list: the array is empty; add at least one concept with an instance_data_dir")
    problems: list[str] = []
    concepts = []
    for i, entry in enumerate(data, start=1):
        found = _concept_problems(i, entry, base)
        problems.extend(found)
        if not found:
            concepts.append(_build(i, entry, base))
    if problems:
        raise ConfigError([f"concepts_list: {p}" for p in problems])
    return concepts


def _concept_problems(index: int, entry: Any, base: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"concept {index}: expected an object {{...}}, got {type(entry).__name__} {json.dumps(entry)[:40]}"]
    label = concept_label(index, entry.get("instance_prompt"))
    problems = [f"{label}: {p}" for p in _key_problems(entry)]
    if problems:
        return problems
    folder = entry.get("instance_data_dir")
    if not folder:
        return [f"{label}: instance_data_dir: missing; every concept needs the folder of its training images"]
    resolved = _resolve(folder, base)
    if not os.path.isdir(resolved):
        return [f"{label}: instance_data_dir: folder not found: {resolved}; fix the path (relative paths start at "
                f"the JSON file's folder)"]
    template = entry.get("save_sample_template")
    if template and not os.path.isfile(_resolve(template, base)):
        problems.append(f"{label}: save_sample_template: file not found: {_resolve(template, base)}")
    return problems


def _key_problems(entry: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in entry.items():
        if key not in ALL_KEYS:
            close = difflib.get_close_matches(key, list(ALL_KEYS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(FIELDS)}"
            problems.append(f"{key}: unknown key{hint}")
            continue
        problem = _value_problem(key, ALL_KEYS[key][0], value)
        if problem:
            problems.append(f"{key}: {value!r} {problem}")
    return problems


def _value_problem(key: str, kind: type, value: Any) -> str | None:
    if kind is str:
        return None if isinstance(value, str) else "is not text; put it in quotes"
    if kind is bool:
        return None if isinstance(value, bool) else "is not true/false"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "is not a number"
    if kind is int and not float(value).is_integer():
        return "is not a whole number"
    low = _MINIMUM.get(key)
    if low is not None and value < low:
        return f"is below the minimum {low}" + (" (-1 = random)" if key == "sample_seed" else "")
    return None


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _build(index: int, entry: dict[str, Any], base: str) -> Concept:
    values = {k: ALL_KEYS[k][0](v) for k, v in entry.items() if k in FIELDS and k != "is_valid"}
    for key in _PATH_KEYS:
        if values.get(key):
            values[key] = _resolve(values[key], base)
    c = Concept(index=index, **values)
    c.num_repeats = int(entry.get("num_repeats") or 0) or _folder_repeats(c.instance_data_dir)
    _apply_legacy(c, entry)
    return c


def _folder_repeats(folder: str) -> int:
    m = _REPEATS_PREFIX.match(os.path.basename(os.path.normpath(folder)))
    return max(1, int(m.group(1))) if m else 1


def _apply_legacy(c: Concept, entry: dict[str, Any]) -> None:
    """2022 files: `num_class_images` (a total) becomes per-image; `max_steps` is per-concept, which does not exist
    here (all concepts train in one schedule), so it is reported and the run's max_train_steps applies."""
    total = int(entry.get("num_class_images") or 0)
    if total > 0 and "num_class_images_per" not in entry:
        n = sum(1 for name in os.listdir(c.instance_data_dir) if is_image_file(name))
        c.num_class_images_per = math.ceil(total / max(1, n))
        log.info("%s: legacy num_class_images %d for %d image(s) = num_class_images_per %d", c.label, total, n,
                 c.num_class_images_per)
    steps = int(entry.get("max_steps", -1))
    if steps > 0:
        log.warning("%s: legacy max_steps %d is a per-concept limit, which this trainer does not have: all "
                    "concepts train together for max_train_steps/max_train_epochs; use num_repeats to weight a "
                    "concept instead", c.label, steps)


def referenced_paths(value: str) -> list[tuple[str, str]]:
    """(label, resolved path) of every folder/file a concepts_list value refers to (the file itself included), for
    the HTTP API's folder confinement; values that do not parse give only the file (validation reports them)."""
    text = value.strip()
    out: list[tuple[str, str]] = []
    if not text.startswith(("[", "{")):
        out.append(("concepts_list", os.path.abspath(text)))
    try:
        data, base = read_concepts_source(value)
    except UserError:
        return out
    entries = data if isinstance(data, list) else [data]
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            continue
        for key in _PATH_KEYS:
            if isinstance(entry.get(key), str) and entry[key]:
                out.append((f"concepts_list concept {i} {key}", _resolve(entry[key], base)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sample prompts


@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str
    size: tuple[int, int]  # (width, height)
    seed: int | None
    cfg_scale: float
    steps: int
    name: str


def sample_requests(c: Concept, instances: list[tuple[str, tuple[int, int]]], default_size: tuple[int, int],
                    rng: random.Random) -> list[SampleRequest]:
    """The concept's preview images (SampleDataset): template lines at the training size, else `[filewords]` from
    random instance images at their bucket size, else the prompt itself. `instances`: (file text, bucket)."""
    if c.n_save_sample <= 0:
        return []
    prompts = _sample_texts(c, instances, default_size, rng)
    if not prompts:
        return []
    out = []
    for i in range(c.n_save_sample):
        text, size = prompts[i % len(prompts)]
        seed = c.sample_seed if c.sample_seed >= 0 else None
        out.append(SampleRequest(text, c.save_sample_negative_prompt, size, seed, c.save_guidance_scale,
                                 c.save_infer_steps, f"c{c.index}-{i:02d}"))
    return out


def _sample_texts(c: Concept, instances: list[tuple[str, tuple[int, int]]], default_size: tuple[int, int],
                  rng: random.Random) -> list[tuple[str, tuple[int, int]]]:
    if c.save_sample_template:
        from .captions import read_caption_file

        lines = read_caption_file(c.save_sample_template).splitlines()
        return [(ln.strip(), default_size) for ln in lines if ln.strip()]
    prompt = c.save_sample_prompt or c.instance_prompt or FILEWORDS
    if FILEWORDS not in prompt:
        return [(prompt, default_size)]  # used verbatim, as there
    picked = rng.sample(instances, min(len(instances), c.n_save_sample))
    return [(create_text(prompt, text, c.instance_token, c.class_token, False), size) for text, size in picked]
