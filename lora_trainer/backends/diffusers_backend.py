"""The standalone backend: a ModelBundle over diffusers/transformers components.

Text conditioning follows the WebUI: captions longer than 75 tokens are split into 75-token chunks, each encoded
as its own 77-token sequence (BOS + 75 + EOS/padding) and concatenated, so that the network is trained the way
txt2img will prompt it. SD1/SD2 use the last hidden state (or the N-th last through the final layer norm with
clip_skip); SDXL uses the penultimate layer of both encoders plus the pooled projection of the second.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from ..model import SamplePrompt, SizeInfo, TrainingSetup, autocast_context
from ..networks.naming import UNetNames, kohya_key, te_path, te_prefixes
from ..networks.targets import PartTree
from .components import SDComponents, build_tiny
from .sd_configs import TINY

log = logging.getLogger(__name__)

CHUNK = 75
PREVIEW_TILE = 512  # px: a VAE that was moved off the GPU decodes previews in tiles of this size


def load_components(name_or_path: str, family: str = "auto", prediction_type: str | None = None,
                    vae: str = "") -> SDComponents:
    """A tiny model by name, a diffusers folder, or a single-file checkpoint; optionally with another VAE."""
    if not name_or_path:
        raise UserError("pretrained_model_name_or_path is empty: give a .safetensors/.ckpt checkpoint, a diffusers "
                        f"folder, or one of {', '.join(TINY)}")
    if name_or_path in TINY:
        comps = build_tiny(name_or_path)
    elif os.path.isdir(name_or_path):
        from .checkpoint import load_diffusers_folder

        comps = load_diffusers_folder(name_or_path, prediction_type)
    elif os.path.isfile(name_or_path):
        from .checkpoint import load_single_file

        comps = load_single_file(name_or_path, family, prediction_type)
    else:
        raise UserError(f"pretrained_model_name_or_path: {name_or_path} is neither a file, a folder nor a built-in "
                        f"model ({', '.join(TINY)})")
    if family != "auto" and comps.family != family:
        raise UserError(f"model_family is {family!r} but {name_or_path} is a {comps.family} model; set model_family "
                        f"to 'auto' or to {comps.family!r}")
    if prediction_type is not None:
        comps.prediction_type = prediction_type
    if vae:
        _replace_vae(comps, vae)
    return comps


def _replace_vae(comps: SDComponents, vae_path: str) -> None:
    from .checkpoint import load_vae_file, vae_identity

    comps.vae = load_vae_file(vae_path, comps.family, TINY.get(comps.source))
    comps.vae_source = vae_path
    comps.vae_id = vae_identity(comps.vae)


def _final_layer_norm(te: nn.Module) -> nn.Module:
    inner = getattr(te, "text_model", te)
    return inner.final_layer_norm


class DiffusersBundle:
    """ModelBundle over SDComponents."""

    def __init__(self, comps: SDComponents, device: torch.device | str = "cpu"):
        self.c = comps
        self.family = comps.family
        self.prediction_type = comps.prediction_type
        self.device = torch.device(device)
        self.model_name = os.path.basename(comps.source) if os.path.exists(comps.source) else comps.source
        self.model_hash = comps.model_hash
        self.vae_name = os.path.basename(comps.vae_source) if comps.vae_source else None
        self.vae_id = comps.vae_id
        self.clip_skip: int | None = None
        self.max_token_length = 75
        self.weight_dtype = torch.float32
        self._saved: list[tuple[nn.Module, dict[str, Any]]] = []
        self._checkpointed: list[nn.Module] = []
        self._compiled: Any = None  # torch.compile'd UNet while training with torch_compile
        self._channels_last = False
        self._away: set[str] = set()  # parts moved off the training device (their outputs are cached)

    # -- network trees -----------------------------------------------------------------------------------------
    def network_trees(self) -> list[PartTree]:
        names = UNetNames.for_family(self.family)
        if self.family == "sdxl":
            def unet_key(p: str) -> str:
                return kohya_key("lora_unet", names.to_ldm(p))
        else:
            def unet_key(p: str) -> str:
                return kohya_key("lora_unet", p)
        trees = [PartTree("unet", self.c.unet, "diffusers_unet", unet_key)]
        for i, (prefix, te) in enumerate(zip(te_prefixes(self.family), self.c.text_encoders)):
            fused = self.family == "sd2" or (self.family == "sdxl" and i == 1)
            trees.append(PartTree(prefix[len("lora_"):], te, "hf_clip", _te_key_fn(prefix), fused))
        return trees

    # -- setup / restore ---------------------------------------------------------------------------------------
    def prepare(self, setup: TrainingSetup) -> None:
        self.device = setup.device
        self.weight_dtype = setup.weight_dtype
        self.clip_skip = setup.clip_skip
        self.max_token_length = setup.max_token_length
        if self.family == "sdxl" and setup.clip_skip not in (None, 1, 2):
            log.warning("clip_skip %s is ignored for SDXL, which always uses the penultimate layer", setup.clip_skip)
        for module, dtype in [(self.c.unet, setup.weight_dtype), (self.c.vae, self._vae_dtype(setup)),
                              *[(te, setup.weight_dtype) for te in self.c.text_encoders]]:
            self._remember(module)
            module.requires_grad_(False)
            _move(module, setup.device, dtype)
        self._set_attention(setup.attention)
        if setup.gradient_checkpointing:
            self._enable_checkpointing(setup)
        self._channels_last = setup.channels_last
        if setup.channels_last:
            self.c.unet.to(memory_format=torch.channels_last)
        # compiled lazily at the first call, i.e. after the network is attached
        self._compiled = torch.compile(self.c.unet) if setup.torch_compile else None

    def _parts(self, part: str) -> list[nn.Module]:
        return {"vae": [self.c.vae], "text_encoders": list(self.c.text_encoders)}[part]

    def offload(self, part: str) -> None:
        for m in self._parts(part):
            m.to("cpu")
        self._away.add(part)

    def reload(self, part: str) -> None:
        for m in self._parts(part):
            m.to(self.device)
        self._away.discard(part)

    @contextlib.contextmanager
    def _lent(self, part: str) -> Iterator[None]:
        """An offloaded part on the training device for one stage of a preview, then off it again."""
        if part not in self._away:
            yield
            return
        self.reload(part)
        try:
            yield
        finally:
            self.offload(part)

    def _vae_dtype(self, setup: TrainingSetup) -> torch.dtype:
        # The SDXL VAE overflows in fp16 (NaN latents); every VAE is fine in fp32 or bf16.
        if setup.weight_dtype == torch.float16 and self.family == "sdxl":
            return torch.float32
        return setup.weight_dtype

    def _remember(self, module: nn.Module) -> None:
        p = next(module.parameters())
        flags = {n: q.requires_grad for n, q in module.named_parameters()}
        self._saved.append((module, {"device": p.device, "dtype": p.dtype, "flags": flags,
                                     "training": module.training}))

    def _set_attention(self, attention: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if attention == "xformers":
            try:
                self.c.unet.enable_xformers_memory_efficient_attention()
            except Exception as e:  # xformers missing or unsupported on this GPU
                raise UserError(f"xformers: cannot use xformers here ({e}); set xformers to false (sdpa is as "
                                f"fast on PyTorch 2)") from None
        else:
            self.c.unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())

    def _enable_checkpointing(self, setup: TrainingSetup) -> None:
        self.c.unet.enable_gradient_checkpointing()
        self._checkpointed.append(self.c.unet)
        if not setup.train_text_encoder:
            return
        for te in self.c.text_encoders:
            try:  # non-reentrant, so frozen inputs still pass gradients to the network inside
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                self._checkpointed.append(te)
            except TypeError:
                log.info("this transformers version has no non-reentrant checkpointing: text encoder not checkpointed")

    def restore(self) -> None:
        for module, saved in reversed(self._saved):
            _move(module, saved["device"], saved["dtype"])
            for n, q in module.named_parameters():
                q.requires_grad_(saved["flags"].get(n, q.requires_grad))
            module.train(saved["training"])
        self._saved.clear()
        self._away.clear()
        self._compiled = None
        if self._channels_last:
            self.c.unet.to(memory_format=torch.contiguous_format)
            self._channels_last = False
        for module in self._checkpointed:
            if module is self.c.unet:
                module.disable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_disable()
        self._checkpointed.clear()

    # -- maths the loop needs ----------------------------------------------------------------------------------
    def alphas_cumprod(self) -> Tensor:
        s = self.c.schedule
        n = int(s.get("num_train_timesteps", 1000))
        if s.get("beta_schedule", "scaled_linear") == "scaled_linear":
            betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(s["beta_start"], s["beta_end"], n, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0).to(device=self.device, dtype=torch.float32)

    def autocast(self, mixed_precision: str):
        return autocast_context(self.device, mixed_precision)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        vae = self.c.vae
        vdtype = next(vae.parameters()).dtype
        dist = vae.encode(pixels.to(self.device, vdtype)).latent_dist
        latents = dist.mode().float() * self.c.scaling_factor
        if not torch.isfinite(latents).all() and vdtype != torch.float32:
            log.warning("VAE produced NaN/inf in %s; encoding this batch again in fp32", vdtype)
            vae.to(torch.float32)
            latents = vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode() * self.c.scaling_factor
            vae.to(vdtype)
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.c.vae
        vdtype = next(vae.parameters()).dtype
        return vae.decode(latents.to(vdtype) / self.c.scaling_factor).sample.float()

    def encode_prompts(self, captions: list[str], sizes: list[SizeInfo]) -> dict[str, Tensor]:
        if self.family != "sdxl":
            return {"context": self._encode_sd(captions)}
        ids1 = self._chunk_ids(0, captions)
        ids2 = self._chunk_ids(1, captions)
        h1, _ = self._run_te(0, ids1, layer=-2, final_norm=False)
        h2, pooled = self._run_te(1, ids2, layer=-2, final_norm=False, pooled=True)
        return {"context": torch.cat([h1, h2], dim=-1), "text_embeds": pooled, "time_ids": self._time_ids(sizes)}

    def _encode_sd(self, captions: list[str]) -> Tensor:
        skip = self.clip_skip or 1
        h, _ = self._run_te(0, self._chunk_ids(0, captions), layer=-skip, final_norm=skip > 1)
        return h

    def _chunk_ids(self, idx: int, captions: list[str]) -> Tensor:
        """(B, chunks, 77) token ids: BOS + 75 tokens + EOS, padded, per chunk (A1111's scheme)."""
        tok = self.c.tokenizers[idx]
        raw = tok(captions, add_special_tokens=False, truncation=False).input_ids
        raw = [r[:self.max_token_length] for r in raw]
        chunks = max(1, math.ceil(max(len(r) for r in raw) / CHUNK))
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        out = torch.full((len(captions), chunks, CHUNK + 2), pad, dtype=torch.long)
        for b, ids in enumerate(raw):
            for c in range(chunks):
                part = ids[c * CHUNK:(c + 1) * CHUNK]
                seq = [bos, *part, eos]
                out[b, c, :len(seq)] = torch.tensor(seq)
        return out

    def _run_te(self, idx: int, ids: Tensor, layer: int, final_norm: bool,
                pooled: bool = False) -> tuple[Tensor, Tensor | None]:
        te = self.c.text_encoders[idx]
        b, chunks, n = ids.shape
        out = te(ids.reshape(b * chunks, n).to(self.device), output_hidden_states=True)
        if layer == -1:
            hidden = out.last_hidden_state  # CLIP's last layer already passed through the final layer norm
        else:
            hidden = out.hidden_states[layer]
            if final_norm:
                hidden = _final_layer_norm(te)(hidden)
        hidden = hidden.reshape(b, chunks * n, -1)
        pool = out.text_embeds.reshape(b, chunks, -1)[:, 0] if pooled else None  # pooled from the first chunk
        return hidden, pool

    def _time_ids(self, sizes: list[SizeInfo]) -> Tensor:
        rows = [[*s.original_hw, *s.crop_top_left, *s.target_hw] for s in sizes]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        kwargs = {}
        if self.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        unet = self._compiled if self._compiled is not None else self.c.unet
        return unet(noisy_latents, timesteps, encoder_hidden_states=cond["context"], **kwargs).sample

    # -- samples -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[SamplePrompt]) -> list[Image.Image]:
        """Previews in three stages, so that the parts moved off the GPU for training (low-VRAM settings) come back
        one at a time beside the UNet: every prompt's conditioning with the text encoders, then denoising, then
        decoding with the VAE (in tiles when it was away)."""
        with self._lent("text_encoders"):
            conds = [self._conditioning(p) for p in prompts]
        latents = [self._denoise(p, cond) for p, cond in zip(prompts, conds)]
        vae_away = "vae" in self._away  # before _lent brings it back
        with self._lent("vae"), _tiled(self.c.vae, vae_away):
            return [_to_image(self.decode_latents(x)) for x in latents]

    def _conditioning(self, p: SamplePrompt) -> dict[str, Tensor]:
        size = _size_of(p)
        both = self.encode_prompts([p.negative_prompt, p.prompt], [size, size])  # one batch: equal chunk counts
        if self.family == "sdxl" and not p.negative_prompt:  # SDXL and the WebUI zero an empty negative prompt
            both["context"][0].zero_()
            both["text_embeds"][0].zero_()
        return both

    def _denoise(self, p: SamplePrompt, both: dict[str, Tensor]) -> Tensor:
        from .sampling import make_scheduler

        gen = torch.Generator(device="cpu").manual_seed(p.seed if p.seed is not None else 0)
        sched = make_scheduler(p.sampler, self.c.schedule, self.prediction_type)
        sched.set_timesteps(p.steps, device=self.device)
        (h, w), channels = _size_of(p).target_hw, self.c.unet.config.in_channels
        latents = torch.randn((1, channels, h // 8, w // 8), generator=gen).to(self.device) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            with self.autocast(self._amp):
                pred = self.predict(inp.to(self.weight_dtype), t.expand(2).to(self.device), both).float()
            pu, pc = pred.chunk(2)
            latents = sched.step(pu + p.cfg_scale * (pc - pu), t, latents, generator=gen).prev_sample
        return latents

    @property
    def _amp(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.weight_dtype, "no")


def _size_of(p: SamplePrompt) -> SizeInfo:
    w, h = p.width // 8 * 8, p.height // 8 * 8
    return SizeInfo((h, w), (0, 0), (h, w))


def _to_image(pixels: Tensor) -> Image.Image:
    arr = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


@contextlib.contextmanager
def _tiled(vae: nn.Module, on: bool) -> Iterator[None]:
    """diffusers' tiled VAE decoding with PREVIEW_TILE tiles (its own default tile is the VAE's training size,
    1024 px for SDXL, which would never tile a 1024 px preview); the VAE's settings are put back afterwards."""
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size")
    saved = {n: getattr(vae, n, None) for n in names}
    if not on or not all(isinstance(v, int) for v in saved.values()):
        yield
        return
    tile = min(saved["tile_sample_min_size"], PREVIEW_TILE)
    vae.use_tiling = True
    vae.tile_latent_min_size = tile * saved["tile_latent_min_size"] // saved["tile_sample_min_size"]
    vae.tile_sample_min_size = tile
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast only what differs (diffusers warns on every dtype cast, even a no-op one)."""
    p = next(module.parameters())
    if p.dtype != dtype:
        module.to(dtype=dtype)
    if p.device != torch.device(device):
        module.to(device=device)


def _te_key_fn(prefix: str):
    def key(path: str) -> str:
        return kohya_key(prefix, te_path(path))
    return key


def load_bundle(name_or_path: str, *, family: str = "auto", v_parameterization: bool | None = None, vae: str = "",
                device: torch.device | str = "cpu") -> DiffusersBundle:
    prediction = None if v_parameterization is None else ("v_prediction" if v_parameterization else "epsilon")
    return DiffusersBundle(load_components(name_or_path, family, prediction, vae), device)
