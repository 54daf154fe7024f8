"""Sample prompts in kohya's syntax: one prompt per line, options after ` --`:

    masterpiece, 1girl, smiling --n lowres, bad hands --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a

--n negative prompt, --w/--h size, --d seed, --l CFG scale, --s steps, --ss sampler. Lines starting with # are
comments. A prompt without --d gets `seed + index`, so each preview interval renders the same noise and the
images can be compared over the run.
"""

from __future__ import annotations

import logging
import os
import re

from .data.captions import read_caption_file
from .errors import UserError
from .model import SamplePrompt

log = logging.getLogger(__name__)

_OPTS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("cfg_scale", float),
    "s": ("steps", int),
    "ss": ("sampler", str),
}
_OPT_RE = re.compile(r"^(ss|n|w|h|d|l|s)\s+(.+)$", re.IGNORECASE | re.DOTALL)


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt:
    parts = line.split(" --")
    values = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        m = _OPT_RE.match(part.strip())
        if not m:
            log.warning("sample prompt option '--%s' is not understood; known: --n --w --h --d --l --s --ss", part)
            continue
        name, conv = _OPTS[m.group(1).lower()]
        try:
            values[name] = conv(m.group(2).strip())
        except ValueError:
            raise UserError(f"sample prompt {line!r}: --{m.group(1)} {m.group(2)!r} is not a valid "
                            f"{conv.__name__}") from None
    p = SamplePrompt(**{**defaults.__dict__, **values})
    p.width, p.height = max(64, p.width // 8 * 8), max(64, p.height // 8 * 8)
    p.steps = max(1, min(1000, p.steps))
    return p


def parse_prompts(text: str, defaults: SamplePrompt, base_seed: int) -> list[SamplePrompt]:
    lines = [ln.strip() for ln in text.splitlines()]
    prompts = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        p = parse_prompt_line(ln, defaults)
        if p.seed is None:
            p.seed = base_seed + len(prompts)
        p.name = f"{len(prompts):02d}"
        prompts.append(p)
    return prompts


def load_prompts(path: str, defaults: SamplePrompt, base_seed: int) -> list[SamplePrompt]:
    if not path:
        return []
    if not os.path.isfile(path):
        raise UserError(f"sample_prompts: file not found: {path} (one prompt per line, kohya's --n --w --h --d --l "
                        f"--s options)")
    prompts = parse_prompts(read_caption_file(path), defaults, base_seed)
    if not prompts:
        log.warning("sample_prompts: %s holds no prompt; no samples will be rendered", path)
    return prompts
