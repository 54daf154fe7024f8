"""modules/processing.py: txt2img through the loaded model, with the behaviour Train LoRA relies on.

Like the real one: override_settings are applied with opts.set(run_callbacks=False) and restored; a checkpoint
override reloads weights; the global RNG is reseeded with the seed; extra networks (`<lora:name:w>`) are activated
unless disable_extra_networks; an interrupt gives no images; the conditioning cache is class-level unless set on p.
The sampler is a plain deterministic DDIM with classifier-free guidance.
"""

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from modules import sd_models, shared

re_extra = re.compile(r"<(\w+):([^>]+)>")


@dataclass
class StableDiffusionProcessingTxt2Img:
    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: dict = field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False

    cached_c = [None, None]
    cached_uc = [None, None]

    def close(self):
        pass


@dataclass
class Processed:
    images: list
    infotexts: list
    seed: int = -1


def process_images(p):
    opts = shared.opts
    stored = {k: opts.data.get(k) for k in p.override_settings}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == "sd_model_checkpoint":
                sd_models.reload_model_weights()
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(opts, k, v)


def parse_prompt(prompt):
    found = []

    def keep(m):
        found.append((m.group(1), m.group(2).split(":")))
        return ""
    return re_extra.sub(keep, prompt), found


def process_images_inner(p):
    import networks

    state = shared.state
    if state.job_count == -1:
        state.job_count = p.n_iter
    if state.interrupted or state.stopping_generation:
        return Processed([], [], p.seed)
    prompt, extra = parse_prompt(p.prompt)
    if not p.disable_extra_networks:
        networks.activate([(args[0], float(args[1]) if len(args) > 1 else 1.0) for kind, args in extra
                           if kind in ("lora", "lyco")])
    model = shared.sd_model
    torch.manual_seed(p.seed)  # the real rng.py reseeds the global generator too
    with torch.no_grad():
        image = _sample(model, prompt, p)
    state.nextjob()
    info = (f"{prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Seed: {p.seed}, "
            f"Size: {p.width}x{p.height}")
    if networks.loaded_networks:
        info += ", Lora hashes: " + ", ".join(f"{n.name}: {n.shorthash}" for n in networks.loaded_networks)
    return Processed([image], [info], p.seed)


def _conds(model, prompt, negative, width, height):
    if getattr(model, "is_sdxl", False):
        return model.get_learned_conditioning([prompt]), model.get_learned_conditioning([negative])
    return model.get_learned_conditioning([prompt]), model.get_learned_conditioning([negative])


def _sample(model, prompt, p):
    c, uc = _conds(model, prompt, p.negative_prompt, p.width, p.height)
    alphas = model.alphas_cumprod.float()
    x = torch.randn((1, 4, p.height // 8, p.width // 8))
    ts = torch.linspace(len(alphas) - 1, 0, p.steps).long()
    for i, t in enumerate(ts):
        tt = t.view(1)
        eps_c = model.apply_model(x, tt, _copy(c)).float()
        eps_u = model.apply_model(x, tt, _copy(uc)).float()
        eps = eps_u + p.cfg_scale * (eps_c - eps_u)
        if getattr(model, "parameterization", "eps") == "v":
            a = alphas[t]
            eps = a.sqrt() * eps + (1 - a).sqrt() * x  # v -> eps
        a_t = alphas[t]
        a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    decoded = model.decode_first_stage(x.to(next(model.first_stage_model.parameters()).dtype)).float()
    arr = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def _copy(c):
    return dict(c) if isinstance(c, dict) else c
