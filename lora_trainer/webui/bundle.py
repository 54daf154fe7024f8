"""ModelBundle over the checkpoint AUTOMATIC1111 has loaded (`shared.sd_model`): SD1.x/SD2.x (ldm) and SDXL (sgm).

The network wraps the host's own modules in place (UNet from `model.diffusion_model`, text encoders as A1111 wraps
them, OpenCLIP's fused attentions through their MultiheadAttention module). Conditioning goes through the host's
own text-encoder wrappers, so captions are encoded exactly as txt2img encodes prompts (75-token chunks, clip skip);
captions are escaped so that tags like `hat (blue)` stay literal. Every change made in `prepare` is undone in
`restore`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..model import SamplePrompt, SizeInfo, TrainingSetup
from ..networks.naming import UNetNames, kohya_key, te_path, te_prefixes
from ..networks.targets import PartTree
from . import host

log = logging.getLogger(__name__)

SAMPLER_NAMES = {"euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "dpmsolver++": "DPM++ 2M"}
_CHECKPOINTED_CLASSES = ("BasicTransformerBlock", "ResBlock")


def escape_caption(text: str) -> str:
    """Make a caption literal for A1111's prompt parser (emphasis brackets would otherwise be interpreted)."""
    for ch in "\\()[]":
        text = text.replace(ch, "\\" + ch)
    return text


class WebUIBundle:
    def __init__(self, sd_model: Any):
        self.m = sd_model
        self.family = host.model_family(sd_model)
        self.prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = host.checkpoint_name(sd_model)
        self.model_hash = getattr(info, "sha256", None)
        self.model_file = getattr(info, "filename", None)
        self.checkpoint_title = host.checkpoint_title(sd_model)
        self.vae_name = host.loaded_vae_name()
        self.vae_id = f"{self.model_hash or self.model_name}|vae:{self.vae_name or 'checkpoint'}"
        self.fixed_device = host.devices().device
        self.unet_device = next(self.unet().parameters()).device
        self.train_text_encoder = False
        self._undo: list[Callable[[], None]] = []
        self._offloaded: dict[str, Any] = {}

    # -- network trees -----------------------------------------------------------------------------------------
    def unet(self) -> nn.Module:
        return self.m.model.diffusion_model

    def text_encoder_roots(self) -> list[tuple[nn.Module, str]]:
        """(module tree, kind) of each text encoder, in kohya's order (te, or te1/te2)."""
        if self.family == "sdxl":
            emb = self.m.conditioner.embedders
            return [(emb[0].wrapped.transformer, "hf_clip"), (emb[1].wrapped.model, "open_clip")]
        wrapped = self.m.cond_stage_model.wrapped
        return [(wrapped.model, "open_clip")] if self.family == "sd2" else [(wrapped.transformer, "hf_clip")]

    def network_trees(self) -> list[PartTree]:
        names = UNetNames.for_family(self.family)
        if self.family == "sdxl":
            def unet_key(p: str) -> str:
                return kohya_key("lora_unet", p)
        else:
            def unet_key(p: str) -> str:
                return kohya_key("lora_unet", names.to_diffusers(p))
        trees = [PartTree("unet", self.unet(), "ldm_unet", unet_key)]
        for prefix, (root, kind) in zip(te_prefixes(self.family), self.text_encoder_roots()):
            layers = 23 if self.family == "sd2" else None  # A1111's SD2 conditioning never runs resblock 23
            trees.append(PartTree(prefix[len("lora_"):], root, kind, _te_key(prefix), kind == "open_clip", layers))
        return trees

    # -- setup / restore ---------------------------------------------------------------------------------------
    def prepare(self, setup: TrainingSetup) -> None:
        self.train_text_encoder = setup.train_text_encoder
        self._freeze()
        self._clip_skip(setup.clip_skip)
        if self.family == "sdxl" and setup.train_text_encoder:
            for emb in self.m.conditioner.embedders[:2]:
                self._set_attr(emb, "is_trainable", True)
        if setup.gradient_checkpointing:
            self._checkpoint_blocks()
        if setup.attention != "sdpa" or setup.channels_last or setup.torch_compile:
            log.info("inside the WebUI the attention backend and memory format are the WebUI's own "
                     "(Settings > Optimizations); sdpa/xformers/channels_last/torch_compile are ignored")

    def _freeze(self) -> None:
        flags = [(p, p.requires_grad) for p in self.m.parameters()]
        self._undo.append(lambda: [p.requires_grad_(f) for p, f in flags])
        self.m.requires_grad_(False)

    def _set_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else obj.__dict__.pop(name, None))

    def _clip_skip(self, clip_skip: int | None) -> None:
        if clip_skip is None:
            return
        opts = host.opts()
        old = opts.data.get("CLIP_stop_at_last_layers")
        opts.data["CLIP_stop_at_last_layers"] = int(clip_skip)
        self._undo.append(lambda: opts.data.__setitem__("CLIP_stop_at_last_layers", old) if old is not None
                          else opts.data.pop("CLIP_stop_at_last_layers", None))
        if self.family == "sd2":
            log.info("clip_skip does not apply to SD2 in the WebUI (it always uses the penultimate layer)")

    def _checkpoint_blocks(self) -> None:
        """Non-reentrant gradient checkpointing of every transformer and residual block (ldm and sgm alike);
        A1111's own patch is ldm-only and reentrant, which gives a frozen UNet's network no gradients."""
        from torch.utils.checkpoint import checkpoint

        for module in self.unet().modules():
            if type(module).__name__ in _CHECKPOINTED_CLASSES:
                inner = module.forward

                def forward(*args, _inner=inner, **kwargs):
                    if not torch.is_grad_enabled():
                        return _inner(*args, **kwargs)
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                self._set_attr(module, "forward", forward)

    def restore(self) -> None:
        for part in list(self._offloaded):
            self.reload(part)
        while self._undo:
            self._undo.pop()()

    # -- maths -------------------------------------------------------------------------------------------------
    def alphas_cumprod(self) -> Tensor:
        a = getattr(self.m, "alphas_cumprod_original", None)
        if a is None:
            a = self.m.alphas_cumprod
        return a.detach().to(self.fixed_device, torch.float32)

    def autocast(self, mixed_precision: str):
        return host.devices().autocast()

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        devices = host.devices()
        x = pixels.to(devices.device, devices.dtype_vae)
        latents = self._encode(x)
        if not torch.isfinite(latents).all():
            log.warning("the VAE produced NaN/inf in %s; encoding this batch again in fp32", devices.dtype_vae)
            vae = self.m.first_stage_model
            old = next(vae.parameters()).dtype
            vae.to(torch.float32)
            try:
                latents = self._encode(x.float())
            finally:
                vae.to(old)
        return latents.float()

    def _encode(self, x: Tensor) -> Tensor:
        with host.devices().autocast():
            out = self.m.encode_first_stage(x)
        if isinstance(out, Tensor):
            return out  # sgm: already sampled and scaled
        return out.mode() * self.m.scale_factor  # ldm: a distribution; its mean (cached latents are deterministic)

    def encode_prompts(self, captions: list[str], sizes: list[SizeInfo]) -> Any:
        texts = [escape_caption(c) for c in captions]
        if self.family != "sdxl":
            return self.m.cond_stage_model(texts)
        dev, dtype = host.devices().device, host.devices().dtype

        def pairs(get) -> Tensor:
            return torch.tensor([list(get(s)) for s in sizes], device=dev, dtype=dtype)
        batch = {"txt": texts, "original_size_as_tuple": pairs(lambda s: s.original_hw),
                 "crop_coords_top_left": pairs(lambda s: s.crop_top_left),
                 "target_size_as_tuple": pairs(lambda s: s.target_hw),
                 "aesthetic_score": torch.full((len(texts), 1), 6.0, device=dev, dtype=dtype)}
        return self.m.conditioner(batch)

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, cond: Any) -> Tensor:
        cond = dict(cond) if isinstance(cond, dict) else cond  # A1111's apply_model casts a dict in place
        return self.m.apply_model(noisy_latents, timesteps, cond)

    # -- offloading --------------------------------------------------------------------------------------------
    def _part(self, part: str) -> nn.Module:
        return self.m.first_stage_model if part == "vae" else self.m.cond_stage_model

    def offload(self, part: str) -> None:
        """Move the VAE or the text encoders to the CPU while their outputs are cached (not under --medvram,
        whose hooks already move them)."""
        if part in self._offloaded or getattr(self.m, "lowvram", False):
            return
        module = self._part(part)
        if not self._offloaded:
            self._parallel_allowed = host.shared().parallel_processing_allowed
            host.shared().parallel_processing_allowed = False  # no live-preview decoding while parts are away
        self._offloaded[part] = next(module.parameters()).device
        module.to(host.devices().cpu)

    def reload(self, part: str) -> None:
        device = self._offloaded.pop(part, None)
        if device is None:
            return
        self._part(part).to(device)
        if not self._offloaded:
            host.shared().parallel_processing_allowed = self._parallel_allowed

    # -- samples through the WebUI -----------------------------------------------------------------------------
    def sample(self, prompts: list[SamplePrompt]) -> list[Image.Image]:
        return [img for img, _ in self.sample_with_info(prompts)]

    def sample_with_info(self, prompts: list[SamplePrompt], extra_networks: bool = True
                         ) -> list[tuple[Image.Image, str]]:
        """Rendered images with their infotext; stops early (fewer images) when the user interrupts."""
        out = []
        with self._parts_back():
            for p in prompts:
                rendered = self._render(p, extra_networks)
                if rendered is None:
                    break
                out.append(rendered)
        return out

    @contextlib.contextmanager
    def _parts_back(self):
        """The WebUI's pipeline renders with every part where it keeps it: offloaded parts come back for the
        render and go away again after it."""
        away = list(self._offloaded)
        for part in away:
            self.reload(part)
        try:
            yield
        finally:
            for part in away:
                self.offload(part)

    def _render(self, sp: SamplePrompt, extra_networks: bool) -> tuple[Image.Image, str] | None:
        processing = host.mod("processing")
        shared = host.shared()
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=sp.prompt, negative_prompt=sp.negative_prompt, seed=int(sp.seed or 0),
            steps=sp.steps, cfg_scale=sp.cfg_scale, width=sp.width, height=sp.height,
            sampler_name=SAMPLER_NAMES.get(sp.sampler, sp.sampler), batch_size=1, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": self.checkpoint_title},
            override_settings_restore_afterwards=True)
        p.disable_extra_networks = not extra_networks
        if self.train_text_encoder:  # the conditioning cache does not know the text encoder changed
            p.cached_c, p.cached_uc = [None, None], [None, None]
            p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]
        state = host.state()
        count, no = state.job_count, state.job_no
        with _rng_kept(), contextlib.closing(p):
            processed = processing.process_images(p)
        state.job_count, state.job_no = count, no + 1  # one unit of the training's progress bar per preview
        if not processed.images:
            return None  # interrupted: the training loop sees the same flag and stops
        image = processed.images[0]
        info = processed.infotexts[0] if processed.infotexts else ""
        image.info["parameters"] = info  # saved with the sample, as the WebUI saves its images
        state.assign_current_image(image)
        return image, info


@contextlib.contextmanager
def _rng_kept():
    """Previews reseed the global RNG (A1111's rng.py); training keeps its own sequence."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _te_key(prefix: str):
    def key(path: str) -> str:
        return kohya_key(prefix, te_path(path))
    return key
