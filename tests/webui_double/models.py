"""Tiny stand-ins for the model object AUTOMATIC1111 v1.10.1 holds as `shared.sd_model`.

`build_sd1()`, `build_sd2()` and `build_sdxl()` return randomly initialised (seeded) models whose module names, class
names and attribute layout are those of the real objects after A1111 has loaded them (with `--no-half`): ldm
`LatentDiffusion` for SD1.5 / SD2.x-v and sgm `DiffusionEngine` for SDXL base, with A1111's text-encoder wrappers
(`sd_hijack_clip`, `sd_hijack_open_clip`), `EmbeddingsWithFixes`, the SDXL extensions of `sd_models_xl` and the
fields `sd_models` sets. Only the widths are tiny, so code written against the real objects runs unchanged on the
CPU in tests. `assign_network_names()` is the built-in Lora extension's `assign_network_names_to_compvis_modules`.

Written from reading the sources (ldm cf1d67a6, sgm 45c443b3, A1111 v1.10.1); no code is copied. Deviations:
- weights are random everywhere; the real `zero_module` initialisation (ResBlock and UNet output convs,
  `proj_out`) is not applied, so every parameter receives a gradient, and norm affines are perturbed from 1/0;
- sgm's SDXL first stage (`AutoencoderKLInferenceWrapper`) has no `regularization`; the `denoiser` only carries
  `sigmas` and `scaling`; both LatentDiffusion and DiffusionEngine are `nn.Module`s, not Lightning modules;
- attention uses `torch.nn.functional.scaled_dot_product_attention` (what A1111's SDP optimisation installs);
- `use_checkpoint` / `checkpoint` flags, when set, use `torch.utils.checkpoint` with `use_reentrant=False` instead
  of ldm/sgm's `CheckpointFunction`;
- the OpenCLIP text tower is a local re-implementation of open_clip 2.20's `CLIP` (text only, `batch_first=False`);
  the OpenCLIP tokenizer is the repo's offline CLIP tokenizer with `!` padding;
- no textual-inversion embeddings are ever found in a prompt; the old emphasis implementation is absent;
- transformers >= 5.6 has no `text_model.` level in `CLIPTextModel`: there, `CLIPTextModel` / `CLIPTextTransformer`
  below restore the 4.x layout (A1111 pins 4.30.2) around the library's own modules.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import re
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from lora_trainer.backends.tokenizer import PAD_BANG, PAD_EOS, clip_tokenizer

log = logging.getLogger(__name__)

# Tiny widths. Real values in comments. GroupNorm32 uses 32 groups, so UNet/VAE channels stay multiples of 32.
MODEL_CHANNELS = 32      # UNet model_channels 320
SD1_HEADS = 2            # SD1 num_heads 8
HEAD_CHANNELS = 16       # SD2 / SDXL num_head_channels 64
TEXT_WIDTH = 32          # CLIP-L 768, OpenCLIP ViT-H 1024, ViT-bigG 1280
TEXT_HEADS = 2           # 12 / 16 / 20
SIZE_EMBED_DIM = 16      # SDXL ConcatTimestepEmbedderND outdim 256
VAE_CH = 32              # VAE ch 128
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408


# ----------------------------------------------------------------------------------------------------- host state
@dataclass
class Options:
    """The `shared.opts` fields the double reads, with A1111 v1.10.1's defaults. Mutate `opts` (or rebind it)."""

    CLIP_stop_at_last_layers: int = 1
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20
    sdxl_clip_l_skip: bool = False
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_refiner_low_aesthetic_score: float = 2.5
    sdxl_refiner_high_aesthetic_score: float = 6.0


opts = Options()
_DEFAULT_OPTS = Options()


def _opt(name: str):
    """`opts.<name>`, read at call time; a rebound `opts` (e.g. the double's `shared.opts`) may lack fields."""
    return getattr(opts, name, getattr(_DEFAULT_OPTS, name))


class ModelHijack:
    """The parts of `sd_hijack.model_hijack` the text-encoder wrappers touch."""

    def __init__(self):
        self.fixes = None
        self.comments = []
        self.extra_generation_params = {}
        self.clip = None


model_hijack = ModelHijack()


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


@dataclass
class CheckpointInfo:
    """`sd_models.CheckpointInfo` for a checkpoint that was never on disk."""

    filename: str
    name: str
    name_for_extra: str
    model_name: str
    hash: str
    sha256: str
    shorthash: str
    title: str
    short_title: str
    is_safetensors: bool = True
    metadata: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [self.hash, self.model_name, self.title, self.name, self.name_for_extra, f"{self.name} [{self.hash}]",
                self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                f"{self.name_for_extra} [{self.shorthash}]"]


def checkpoint_info(family: str, seed: int = 0) -> CheckpointInfo:
    stem = f"tiny-{family}"
    name = f"{stem}.safetensors"
    sha256 = hashlib.sha256(f"{stem}:{seed}".encode()).hexdigest()
    return CheckpointInfo(filename=f"/webui/models/Stable-diffusion/{name}", name=name, name_for_extra=stem,
                          model_name=stem, hash=sha256[:8], sha256=sha256, shorthash=sha256[:10],
                          title=f"{name} [{sha256[:10]}]", short_title=f"{stem} [{sha256[:10]}]")


# ---------------------------------------------------------------------------------------------------- small helpers
def _maybe_checkpoint(fn, enabled: bool, *args):
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _disabled_train(mode=True):
    """ldm/sgm install `disabled_train` as a plain instance attribute: `module.train(x)` then changes nothing."""
    return mode


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.train = _disabled_train
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _named(name: str):
    """Give a class the name of its real counterpart when this module already uses that name for another class."""
    def rename(cls):
        cls.__name__ = cls.__qualname__ = name
        return cls
    return rename


def _randomize_norms(model: nn.Module) -> None:
    """Default norm affines (weight 1, bias 0) would make a final LayerNorm's output mean exactly 0 and A1111's
    "Original" emphasis divide 0 by 0; trained checkpoints have non-trivial affines, so give them some."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def scaled_linear_betas(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """ldm/sgm's "linear" schedule (linear in sqrt(beta)), in float64 like their numpy code."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2


def scaled_linear_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    return torch.cumprod(1.0 - scaled_linear_betas(steps, start, end), dim=0)


# --------------------------------------------------------------------------------------------------- prompt parsing
_PROMPT_TOKEN = re.compile(r"""
    \\(?P<literal>[()\[\]\\]?)          # escaped bracket or backslash; a lone backslash is dropped
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def _add_text(out: list, text: str) -> None:
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            out.append(["BREAK", -1])
        out.append([part, 1.0])


def _scale_from(out: list, start: int, factor: float) -> None:
    for item in out[start:]:
        item[1] *= factor


def _merge_equal_weights(out: list) -> list:
    merged = []
    for text, weight in out:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


def parse_prompt_attention(text: str) -> list[list]:
    """`prompt_parser.parse_prompt_attention`: `(x)` x1.1, `[x]` /1.1, `(x:w)`, `\\(` etc. literal, BREAK."""
    out: list = []
    opened = {"(": [], "[": []}
    for m in _PROMPT_TOKEN.finditer(text):
        kind, token = m.lastgroup, m.group(0)
        if kind == "literal":
            out.append([m.group("literal"), 1.0])
        elif kind == "open":
            opened[token].append(len(out))
        elif kind == "weight" and opened["("]:
            _scale_from(out, opened["("].pop(), float(m.group("weight")))
        elif kind == "close" and opened["(" if token == ")" else "["]:
            _scale_from(out, opened["(" if token == ")" else "["].pop(), _ROUND if token == ")" else _SQUARE)
        else:
            _add_text(out, token)
    for bracket, factor in (("(", _ROUND), ("[", _SQUARE)):
        for start in opened[bracket]:
            _scale_from(out, start, factor)
    return _merge_equal_weights(out) or [["", 1.0]]


def _apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """`sd_emphasis`: "Original" (the default, also for unknown names), "No norm", "Ignore", "None"."""
    if _opt("emphasis") in ("None", "Ignore"):
        return z
    weighted = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if _opt("emphasis") == "No norm":
        return weighted
    return weighted * (z.mean() / weighted.mean())


# ------------------------------------------------------------------------------------------- UNet (ldm and sgm)
class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """Marker: `forward(x, emb)`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv=True, dims=2, out_channels=None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv, self.dims = use_conv, dims
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels, use_conv=True, dims=2, out_channels=None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv, self.dims = use_conv, dims
        self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None):
        super().__init__()
        out = out_channels or channels
        self.channels, self.emb_channels, self.dropout, self.out_channels = channels, emb_channels, dropout, out
        self.use_conv = self.use_checkpoint = self.use_scale_shift_norm = self.updown = False
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(normalization(out), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x, emb):
        return _maybe_checkpoint(self._forward, self.use_checkpoint, x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or query_dim
        self.scale, self.heads = dim_head ** -0.5, heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        keep = None if mask is None else mask.reshape(mask.shape[0], 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpoint = False

    def forward(self, x, context=None):
        return _maybe_checkpoint(self._forward, self.checkpoint, x, context)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels, self.use_linear = in_channels, use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        contexts = context if isinstance(context, list) else [context]
        b, _, h, w = x.shape
        x_in, x = x, self.norm(x)
        x = x if self.use_linear else self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()
        x = self.proj_in(x) if self.use_linear else x
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=contexts[i if len(contexts) > 1 else 0])
        x = self.proj_out(x) if self.use_linear else x
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        return (x if self.use_linear else self.proj_out(x)) + x_in


class UNetModel(nn.Module):
    """ldm / sgm `openaimodel.UNetModel` (spatial transformer, no resblock up/down, `legacy=False`)."""

    def __init__(self, *, model_channels, channel_mult, attention_resolutions, context_dim, num_res_blocks=2,
                 num_heads=-1, num_head_channels=-1, transformer_depth=1, transformer_depth_middle=None,
                 use_linear_in_transformer=False, adm_in_channels=None, in_channels=4, out_channels=4,
                 cast_input=True):
        super().__init__()
        levels = len(channel_mult)
        per_level = isinstance(transformer_depth, (list, tuple))
        depth = list(transformer_depth) if per_level else [transformer_depth] * levels
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.channel_mult = [num_res_blocks] * levels, channel_mult
        self.attention_resolutions, self.dropout = attention_resolutions, 0
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_classes = "sequential" if adm_in_channels else None
        self.use_checkpoint, self.predict_codebook_ids = False, False
        self.dtype, self.cast_input = torch.float32, cast_input
        self._transformer_args = dict(context_dim=context_dim, use_linear=use_linear_in_transformer)
        emb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if adm_in_channels:
            adm = nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
            self.label_emb = nn.Sequential(adm)
        chans, ds = self._build_input_blocks(emb, depth)
        ch = chans[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb), self._transformer(ch, transformer_depth_middle or depth[-1]), ResBlock(ch, emb))
        self._build_output_blocks(emb, depth, chans, ds)
        self.out = nn.Sequential(normalization(model_channels), nn.SiLU(),
                                 nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def _transformer(self, ch: int, depth: int) -> SpatialTransformer:
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        return SpatialTransformer(ch, heads, dim_head, depth=depth, **self._transformer_args)

    def _build_input_blocks(self, emb: int, depth: list[int]) -> tuple[list[int], int]:
        mc = self.model_channels
        blocks = [TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, 3, padding=1))]
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers = [ResBlock(ch, emb, out_channels=mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch, depth[level]))
                blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch, True, out_channels=ch)))
                chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        return chans, ds

    def _build_output_blocks(self, emb: int, depth: list[int], chans: list[int], ds: int) -> None:
        mc, chans, blocks = self.model_channels, list(chans), []
        ch = chans[-1]
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), emb, out_channels=mc * mult)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch, depth[level]))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, True, out_channels=ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h, hs = (x.type(self.dtype) if self.cast_input else x), []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))


class DiffusionWrapper(nn.Module):
    """ldm `ddpm.DiffusionWrapper` (conditioning keys `crossattn` and `hybrid`)."""

    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.sequential_cross_attn = False
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None, c_adm=None):
        if self.conditioning_key not in ("crossattn", "hybrid"):
            raise NotImplementedError(f"the double has no conditioning_key {self.conditioning_key!r}")
        if self.conditioning_key == "hybrid":
            x = torch.cat([x, *c_concat], dim=1)
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class OpenAIWrapper(nn.Module):
    """sgm `wrappers.OpenAIWrapper`."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c: dict, **kwargs):
        if "concat" in c:
            x = torch.cat((x, c["concat"]), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


# ------------------------------------------------------------------------------------------------------------ VAE
def _vae_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out = out_channels or in_channels
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out, False
        self.norm1 = _vae_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out, 3, padding=1)
        self.norm2 = _vae_norm(out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)
        if in_channels != out:
            self.nin_shortcut = nn.Conv2d(in_channels, out, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels
        self.norm = _vae_norm(in_channels)
        self.q, self.k, self.v = (nn.Conv2d(in_channels, in_channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (conv(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


@_named("Downsample")
class VaeDownsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


@_named("Upsample")
class VaeUpsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _vae_level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList()
    if resample is not None:
        setattr(level, name, resample)
    return level


def _vae_mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch), AttnBlock(ch), ResnetBlock(ch)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, in_channels=3, z_channels=4):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            blocks = [ResnetBlock(block_in if j == 0 else ch * mult, ch * mult) for j in range(num_res_blocks)]
            block_in = ch * mult
            last = i == len(ch_mult) - 1
            levels.append(_vae_level(blocks, None if last else VaeDownsample(block_in), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _vae_mid(block_in)
        self.norm_out = _vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h) if hasattr(level, "downsample") else h
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, out_ch=3, z_channels=4):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _vae_mid(block_in)
        levels = []
        for i in reversed(range(len(ch_mult))):
            out = ch * ch_mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else out, out) for j in range(num_res_blocks + 1)]
            block_in = out
            levels.insert(0, _vae_level(blocks, VaeUpsample(out) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h) if hasattr(level, "upsample") else h
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """ldm `autoencoder.AutoencoderKL` (embed_dim 4, z_channels 4, ch_mult 1,2,4,4, 2 res blocks, no attn levels)."""

    def __init__(self, ch=VAE_CH, ch_mult=(1, 2, 4, 4), num_res_blocks=2, embed_dim=4, z_channels=4):
        super().__init__()
        self.image_key = "image"
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels=z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels=z_channels)
        self.loss = nn.Identity()
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample_posterior else posterior.mode()), posterior


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """sgm's SDXL first stage: `encode` already samples."""

    def encode(self, x):
        return super().encode(x).sample()


# ------------------------------------------------------------------------------------------------- text encoders
if hasattr(transformers.models.clip.modeling_clip, "CLIPTextTransformer"):
    CLIPTextModel = transformers.CLIPTextModel
else:
    class CLIPTextTransformer(transformers.CLIPTextModel):
        """transformers >= 5.6: the flat CLIPTextModel, under the class name of 4.x's `text_model` level."""

    class CLIPTextModel(transformers.CLIPPreTrainedModel):
        """transformers >= 5.6: puts back the `text_model.` level that 4.x (A1111 pins 4.30.2) has."""

        config_class = transformers.CLIPTextConfig

        def __init__(self, config):
            super().__init__(config)
            self.text_model = CLIPTextTransformer(config)
            self.post_init()

        def get_input_embeddings(self):
            return self.text_model.embeddings.token_embedding

        def forward(self, input_ids=None, **kwargs):
            return self.text_model(input_ids=input_ids, **kwargs)


def tiny_clip_text_model(width: int = TEXT_WIDTH, layers: int = 12) -> nn.Module:
    """A tiny HF CLIPTextModel shaped like CLIP ViT-L/14's text tower (quick_gelu, 77 positions)."""
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=TEXT_HEADS, max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPTextModel(config).eval()


class ResidualAttentionBlock(nn.Module):
    """open_clip 2.20 `ResidualAttentionBlock` (sequence-first, fused `in_proj_weight`)."""

    def __init__(self, d_model, n_head, mlp_ratio=4.0):
        super().__init__()
        width = int(d_model * mlp_ratio)
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(d_model, width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(width, d_model))]))
        self.ls_2 = nn.Identity()

    def attention(self, q_x, attn_mask=None):
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=mask)[0]

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0):
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for r in self.resblocks:
            x = _maybe_checkpoint(r, self.grad_checkpointing, x, None, None, attn_mask)
        return x


class CLIP(nn.Module):
    """open_clip 2.20 `CLIP` after ldm/sgm's `del model.visual`: the text tower only."""

    def __init__(self, width, layers, heads, embed_dim, vocab_size=VOCAB_SIZE, context_length=CONTEXT_LENGTH):
        super().__init__()
        self.transformer = Transformer(width, layers, heads)
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_text(self, text, normalize=False):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2), attn_mask=self.attn_mask).permute(1, 0, 2))
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def _pad_to_context(tokenizer, text) -> torch.Tensor:
    return tokenizer(text, truncation=True, max_length=CONTEXT_LENGTH, padding="max_length",
                     return_tensors="pt")["input_ids"]


class FrozenCLIPEmbedder(nn.Module):
    """ldm (SD1) / sgm (SDXL CLIP-L) `FrozenCLIPEmbedder` around an HF CLIPTextModel."""

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, transformer, tokenizer, layer="last", layer_idx=None, always_return_pooled=False):
        super().__init__()
        self.tokenizer, self.transformer = tokenizer, transformer
        self.device, self.max_length = "cpu", CONTEXT_LENGTH
        self.layer, self.layer_idx, self.return_pooled = layer, layer_idx, always_return_pooled

    def forward(self, text):
        tokens = _pad_to_context(self.tokenizer, text).to(_first_param(self).device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        return (z, outputs.pooler_output) if self.return_pooled else z

    def encode(self, text):
        return self(text)


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm `FrozenOpenCLIPEmbedder` (SD2): stops `layer_idx` blocks early, then `ln_final`."""

    LAYERS = ("last", "penultimate")

    def __init__(self, model: CLIP, layer="last"):
        super().__init__()
        self.model, self.device, self.max_length = model, "cpu", CONTEXT_LENGTH
        self.layer, self.layer_idx = layer, {"last": 0, "penultimate": 1}[layer]
        self._tokenizer = clip_tokenizer(PAD_BANG)

    def forward(self, text):
        return self.encode_with_transformer(_pad_to_context(self._tokenizer, text).to(_first_param(self).device))

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = self.text_transformer_forward(x.permute(1, 0, 2), attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.permute(1, 0, 2))

    def text_transformer_forward(self, x, attn_mask=None):
        blocks, ckpt = self.model.transformer.resblocks, self.model.transformer.grad_checkpointing
        for r in list(blocks)[: len(blocks) - self.layer_idx]:
            x = _maybe_checkpoint(r, ckpt, x, None, None, attn_mask)
        return x

    def encode(self, text):
        return self(text)


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm `FrozenOpenCLIPEmbedder2` (SDXL ViT-bigG): `{"penultimate", "last", "pooled"}` with `legacy=False`."""

    LAYERS = ("pooled", "last", "penultimate")

    def __init__(self, model: CLIP, layer="penultimate", always_return_pooled=True, legacy=False):
        super().__init__()
        self.model, self.device, self.max_length = model, "cpu", CONTEXT_LENGTH
        self.return_pooled, self.layer, self.legacy = always_return_pooled, layer, legacy
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self._tokenizer = clip_tokenizer(PAD_BANG)

    def forward(self, text):
        z = self.encode_with_transformer(_pad_to_context(self._tokenizer, text).to(_first_param(self).device))
        if self.legacy:
            return z
        return (z[self.layer], z["pooled"]) if self.return_pooled else z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = self.text_transformer_forward(x.permute(1, 0, 2), attn_mask=self.model.attn_mask)
        if self.legacy:
            return self.model.ln_final(x[self.layer])
        x["pooled"] = self.pool(self.model.ln_final(x["last"]), text)
        return x

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs, blocks = {}, self.model.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = _maybe_checkpoint(r, self.model.transformer.grad_checkpointing, x, None, None, attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs

    def encode(self, text):
        return self(text)


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class ConcatTimestepEmbedderND(nn.Module):
    """sgm: embeds each column of a (B, D) tensor with a sinusoidal embedding of `outdim`, concatenated."""

    def __init__(self, outdim):
        super().__init__()
        self.timestep, self.outdim = Timestep(outdim), outdim

    def forward(self, x):
        x = x[:, None] if x.ndim == 1 else x
        b, dims = x.shape
        return self.timestep(x.reshape(-1)).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm `GeneralConditioner` plus the methods `sd_models_xl` adds to it."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders: list[tuple[nn.Module, str]]):
        super().__init__()
        for embedder, input_key in embedders:
            embedder.is_trainable, embedder.ucg_rate, embedder.input_key = False, 0.0, input_key
            embedder.legacy_ucg_val = None
            _frozen(embedder)
        self.embedders = nn.ModuleList([embedder for embedder, _ in embedders])

    def forward(self, batch: dict, force_zero_embeddings: list | None = None) -> dict:
        output: dict = {}
        for embedder in self.embedders:
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                self._collect(output, embedder, emb, force_zero_embeddings or [])
        return output

    def _collect(self, output: dict, embedder: nn.Module, emb: torch.Tensor, force_zero: list) -> None:
        key = self.OUTPUT_DIM2KEYS[emb.dim()]
        if embedder.ucg_rate > 0.0 and embedder.legacy_ucg_val is None:
            keep = torch.bernoulli((1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device))
            emb = keep.reshape(-1, *[1] * (emb.dim() - 1)) * emb
        if embedder.input_key in force_zero:
            emb = torch.zeros_like(emb)
        output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb

    def _text_embedders(self, method: str) -> list:
        return [e for e in self.embedders if hasattr(e, method)]

    def encode_embedding_init_text(self, init_text, nvpt):
        found = self._text_embedders("encode_embedding_init_text")
        return torch.cat([e.encode_embedding_init_text(init_text, nvpt) for e in found], dim=1)

    def tokenize(self, texts):
        for embedder in self._text_embedders("tokenize"):
            return embedder.tokenize(texts)
        raise AssertionError("no tokenizer available")

    def process_texts(self, texts):
        for embedder in self._text_embedders("process_texts"):
            return embedder.process_texts(texts)
        return None

    def get_target_prompt_token_count(self, token_count):
        for embedder in self._text_embedders("get_target_prompt_token_count"):
            return embedder.get_target_prompt_token_count(token_count)
        return None


# ---------------------------------------------------------------------------------- A1111 text-encoder wrappers
class EmbeddingsWithFixes(nn.Module):
    """`sd_hijack.EmbeddingsWithFixes`: the token embedding, with textual-inversion vectors spliced in."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped, self.embeddings, self.textual_inversion_key = wrapped, embeddings, textual_inversion_key

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or not any(batch_fixes):
            return inputs_embeds
        return torch.stack([self._splice(fixes, row) for fixes, row in zip(batch_fixes, inputs_embeds)])

    def _splice(self, fixes, row):
        for offset, embedding in fixes:
            vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
            n = min(row.shape[0] - offset - 1, vec.shape[0])
            row = torch.cat([row[:offset + 1], vec[:n].to(row), row[offset + 1 + n:]])
        return row


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class _ChunkWriter:
    """Packs weighted tokens into 75-token chunks as `TextConditionalModel.tokenize_line` does (comma backtrack)."""

    def __init__(self, model: TextConditionalModel):
        self.model, self.chunks, self.current = model, [], PromptChunk()
        self.token_count, self.last_comma = 0, -1

    def close(self, is_last: bool = False) -> None:
        m, c = self.model, self.current
        self.token_count += len(c.tokens) if is_last else m.chunk_length
        pad = m.chunk_length - len(c.tokens)
        c.tokens = [m.id_start, *c.tokens, *[m.id_end] * pad, m.id_end]
        c.multipliers = [1.0, *c.multipliers, *[1.0] * pad, 1.0]
        self.chunks.append(c)
        self.current, self.last_comma = PromptChunk(), -1

    def add(self, token: int, weight: float) -> None:
        if token == self.model.comma_token:
            self.last_comma = len(self.current.tokens)
        elif self._should_backtrack():
            self._move_text_after_comma()
        if len(self.current.tokens) == self.model.chunk_length:
            self.close()
        self.current.tokens.append(token)
        self.current.multipliers.append(weight)

    def _should_backtrack(self) -> bool:
        n, limit = len(self.current.tokens), _opt("comma_padding_backtrack")
        return limit != 0 and n == self.model.chunk_length and self.last_comma != -1 and n - self.last_comma <= limit

    def _move_text_after_comma(self) -> None:
        cut = self.last_comma + 1
        tokens, mults = self.current.tokens[cut:], self.current.multipliers[cut:]
        del self.current.tokens[cut:], self.current.multipliers[cut:]
        self.close()
        self.current.tokens, self.current.multipliers = tokens, mults


class TextConditionalModel(nn.Module):
    """`sd_hijack_clip.TextConditionalModel`: long prompts in 75-token chunks, emphasis, BREAK."""

    def __init__(self):
        super().__init__()
        self.hijack, self.chunk_length = model_hijack, 75
        self.is_trainable, self.input_key, self.return_pooled = False, "txt", False
        self.comma_token = self.id_start = self.id_end = self.id_pad = None

    def empty_chunk(self) -> PromptChunk:
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize(self, texts):
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def tokenize_line(self, line):
        parsed = parse_prompt_attention(line) if _opt("emphasis") != "None" else [[line, 1.0]]
        writer = _ChunkWriter(self)
        for tokens, (text, weight) in zip(self.tokenize([text for text, _ in parsed]), parsed):
            if text == "BREAK" and weight == -1:
                writer.close()
                continue
            for token in tokens:
                writer.add(token, weight)
        if writer.current.tokens or not writer.chunks:
            writer.close(is_last=True)
        return writer.chunks, writer.token_count

    def process_texts(self, texts):
        cache, batch_chunks, token_count = {}, [], 0
        for line in texts:
            if line not in cache:
                cache[line], count = self.tokenize_line(line)
                token_count = max(count, token_count)
            batch_chunks.append(cache[line])
        return batch_chunks, token_count

    def forward(self, texts):
        batch_chunks, _ = self.process_texts(texts)
        zs = []
        for i in range(max(len(chunks) for chunks in batch_chunks)):
            batch = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.hijack.fixes = [chunk.fixes for chunk in batch]
            zs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        if any("(" in x or "[" in x for x in texts) and _opt("emphasis") != "Original":
            self.hijack.extra_generation_params["Emphasis"] = _opt("emphasis")
        return (torch.hstack(zs), zs[0].pooled) if self.return_pooled else torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        device = _first_param(self).device
        tokens = torch.asarray(remade_batch_tokens).to(device)
        if self.id_end != self.id_pad:
            for row, seq in zip(tokens, remade_batch_tokens):
                row[seq.index(self.id_end) + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        z = _apply_emphasis(z, torch.asarray(batch_multipliers).to(device))
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWordsBase(TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack, self.wrapped = hijack, wrapped
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    """SD1's `cond_stage_model`, with clip skip (`opts.CLIP_stop_at_last_layers`)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        self.comma_token = self.tokenizer.get_vocab().get(",</w>")
        self.id_start, self.id_end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = _opt("CLIP_stop_at_last_layers")
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        ids = self.wrapped.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)
        return layer(ids["input_ids"].to(layer.weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL `conditioner.embedders[0]`: hidden layer `layer_idx` (11 = penultimate), no final layer norm."""

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if _opt("sdxl_clip_l_skip") is True:
            return outputs.hidden_states[-_opt("CLIP_stop_at_last_layers")]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]


class _OpenCLIPWords(FrozenCLIPEmbedderWithCustomWordsBase):
    """What `sd_hijack_open_clip`'s two wrappers share: open_clip's tokenizer, padding with id 0 (`!`)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self._tokenizer = clip_tokenizer(PAD_BANG)
        vocab = self._tokenizer.get_vocab()
        self.comma_token = vocab[",</w>"]
        self.id_start, self.id_end, self.id_pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], 0

    def tokenize(self, texts):
        return self._tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.wrapped.model.token_embedding.wrapped
        ids = self._tokenizer(init_text, add_special_tokens=False)["input_ids"]
        return layer(torch.asarray([ids], device=layer.weight.device, dtype=torch.int)).squeeze(0)


class FrozenOpenCLIPEmbedderWithCustomWords(_OpenCLIPWords):
    """SD2's `cond_stage_model`: clip skip is ignored, the yaml's `penultimate` layer always applies."""

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)


class FrozenOpenCLIPEmbedder2WithCustomWords(_OpenCLIPWords):
    """SDXL `conditioner.embedders[1]`: returns `(z, pooled)`, pooled from the first chunk."""

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        if d.get("pooled") is not None:
            z.pooled = d["pooled"]
        return z


# ------------------------------------------------------------------------------------------------- the sd_models
class LatentDiffusion(nn.Module):
    """ldm `ddpm.LatentDiffusion` (SD1 / SD2) as A1111 holds it."""

    def __init__(self, unet, cond_stage_model, first_stage_model, parameterization="eps", scale_factor=0.18215):
        super().__init__()
        self.parameterization = parameterization
        self.model = DiffusionWrapper(unet, "crossattn")
        self.first_stage_key, self.cond_stage_key, self.channels, self.image_size = "jpg", "txt", 4, 64
        self.cond_stage_trainable, self.cond_stage_forward, self.scale_factor = False, None, scale_factor
        self.first_stage_model = _frozen(first_stage_model)
        self.cond_stage_model = _frozen(cond_stage_model)
        self._register_schedule()

    def _register_schedule(self, timesteps=1000, linear_start=0.00085, linear_end=0.012):
        betas = scaled_linear_betas(timesteps, linear_start, linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.num_timesteps, self.linear_start, self.linear_end = timesteps, linear_start, linear_end
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("alphas_cumprod_prev", previous.float())
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())

    @property
    def device(self) -> torch.device:
        return _first_param(self).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_param(self.model).dtype

    def get_first_stage_encoding(self, encoder_posterior):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    def get_learned_conditioning(self, c):
        encode = getattr(self.cond_stage_model, "encode", None)
        return encode(c) if callable(encode) else self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        x_recon = self.model(x_noisy, t, **cond)
        return x_recon[0] if isinstance(x_recon, tuple) and not return_ids else x_recon


class EpsScaling:
    def __call__(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1.0) ** 0.5, sigma.clone()


class DiscreteDenoiser(nn.Module):
    """sgm `DiscreteDenoiser` with `LegacyDDPMDiscretization` sigmas (descending), eps scaling."""

    def __init__(self, num_idx=1000):
        super().__init__()
        self.scaling = EpsScaling()
        alphas_cumprod = scaled_linear_alphas_cumprod(num_idx)
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.register_buffer("sigmas", torch.flip(sigmas, (0,)))
        self.quantize_c_noise = True


class DiffusionEngine(nn.Module):
    """sgm `DiffusionEngine` (SDXL base) with A1111's `sd_models_xl` methods."""

    def __init__(self, unet, conditioner, first_stage_model, scale_factor=0.13025):
        super().__init__()
        self.log_keys, self.input_key = None, "jpg"
        self.model = OpenAIWrapper(unet)
        self.denoiser = DiscreteDenoiser()
        self.sampler = None
        self.conditioner = conditioner
        self.first_stage_model = _frozen(first_stage_model)
        self.loss_fn, self.use_ema, self.no_cond_log = None, False, False
        self.scale_factor, self.disable_first_stage_autocast = scale_factor, True

    @property
    def device(self) -> torch.device:
        return _first_param(self).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_param(self.model).dtype

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    def get_first_stage_encoding(self, x):
        return x

    def apply_model(self, x, t, cond):
        if self.is_sdxl_inpaint:
            x = torch.cat([x, *cond["c_concat"]], dim=1)
        return self.model(x, t, cond)

    def get_learned_conditioning(self, batch):
        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width, height = getattr(batch, "width", 1024) or 1024, getattr(batch, "height", 1024) or 1024
        negative = getattr(batch, "is_negative_prompt", False)
        aesthetic = _opt(f"sdxl_refiner_{'low' if negative else 'high'}_aesthetic_score")
        args, n = dict(device=self.device, dtype=self.dtype), len(batch)
        crop = [_opt("sdxl_crop_top"), _opt("sdxl_crop_left")]
        conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1),
            "crop_coords_top_left": torch.tensor(crop, **args).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1),
            "aesthetic_score": torch.tensor([aesthetic], **args).repeat(n, 1),
        }
        zero_text = negative and all(x == "" for x in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if zero_text else [])


# ------------------------------------------------------------------------------------------------------ builders
def _hijack_ldm(model: LatentDiffusion) -> None:
    """`sd_hijack.StableDiffusionModelHijack.hijack` for SD1 / SD2."""
    te = model.cond_stage_model
    if isinstance(te, FrozenCLIPEmbedder):
        embeddings = te.transformer.text_model.embeddings
        embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, model_hijack)
        model.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(te, model_hijack)
    else:
        te.model.token_embedding = EmbeddingsWithFixes(te.model.token_embedding, model_hijack)
        model.cond_stage_model = FrozenOpenCLIPEmbedderWithCustomWords(te, model_hijack)
    model_hijack.clip = model.cond_stage_model


def _hijack_sgm(model: DiffusionEngine) -> None:
    """`sd_hijack` for SDXL: both text embedders wrapped in place, `cond_stage_model` is the conditioner."""
    embedders = model.conditioner.embedders
    clip_l, clip_g = embedders[0], embedders[1]
    embeddings = clip_l.transformer.text_model.embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, model_hijack)
    embedders[0] = FrozenCLIPEmbedderForSDXLWithCustomWords(clip_l, model_hijack)
    clip_g.model.token_embedding = EmbeddingsWithFixes(clip_g.model.token_embedding, model_hijack, "clip_g")
    embedders[1] = FrozenOpenCLIPEmbedder2WithCustomWords(clip_g, model_hijack)
    model.cond_stage_model = model.conditioner
    model_hijack.clip = model.conditioner


def _extend_sdxl(model: DiffusionEngine) -> None:
    """`sd_models_xl.extend_sdxl`."""
    model.model.diffusion_model.dtype = _first_param(model.model.diffusion_model).dtype
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    model.parameterization = "eps"
    model.alphas_cumprod = scaled_linear_alphas_cumprod().to(torch.float32)
    model.conditioner.wrapped = nn.Module()


def _set_model_fields(model: nn.Module, family: str, seed: int) -> None:
    """`sd_models.set_model_type`, `set_model_fields` and what `load_model_weights` / `load_model` set."""
    for flag in ("is_sd1", "is_sd2", "is_sdxl", "is_ssd", "is_sd3"):
        setattr(model, flag, flag == f"is_{family}")
    model.model_type = {"sd1": ModelType.SD1, "sd2": ModelType.SD2, "sdxl": ModelType.SDXL}[family]
    model.is_sdxl_inpaint = False
    model.latent_channels = 4
    model.lowvram = False
    model.alphas_cumprod_original = model.alphas_cumprod
    info = checkpoint_info(family, seed)
    model.sd_checkpoint_info, model.sd_model_hash, model.sd_model_checkpoint = info, info.shorthash, info.filename


def _as_loaded(model: nn.Module, family: str, seed: int) -> nn.Module:
    if family == "sdxl":
        _extend_sdxl(model)
        _hijack_sgm(model)
    else:
        _hijack_ldm(model)
    _set_model_fields(model, family, seed)
    model.eval()
    with torch.no_grad():
        empty = model.get_learned_conditioning([""])
    model.cond_stage_model_empty_prompt = empty["crossattn"] if isinstance(empty, dict) else empty
    log.debug("built a tiny %s stand-in (seed %d)", family, seed)
    return model


def build_sd1(seed: int = 0) -> LatentDiffusion:
    """SD1.5 (`configs/v1-inference.yaml`) at tiny widths."""
    with _seeded(seed):
        unet = UNetModel(model_channels=MODEL_CHANNELS, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                         num_heads=SD1_HEADS, context_dim=TEXT_WIDTH)
        te = FrozenCLIPEmbedder(tiny_clip_text_model(), clip_tokenizer(PAD_EOS))
        model = LatentDiffusion(unet, te, AutoencoderKL(), parameterization="eps")
        _randomize_norms(model)
    return _as_loaded(model, "sd1", seed)


def build_sd2(seed: int = 0) -> LatentDiffusion:
    """SD2.x v-prediction (`v2-inference-v.yaml`) at tiny widths: OpenCLIP ViT-H shape, 24 blocks, penultimate."""
    with _seeded(seed):
        unet = UNetModel(model_channels=MODEL_CHANNELS, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                         num_head_channels=HEAD_CHANNELS, context_dim=TEXT_WIDTH, use_linear_in_transformer=True)
        clip = CLIP(TEXT_WIDTH, 24, TEXT_HEADS, embed_dim=TEXT_WIDTH)
        te = FrozenOpenCLIPEmbedder(clip, layer="penultimate")
        model = LatentDiffusion(unet, te, AutoencoderKL(), parameterization="v")
        _randomize_norms(model)
    return _as_loaded(model, "sd2", seed)


def _sdxl_conditioner() -> GeneralConditioner:
    clip_l = FrozenCLIPEmbedder(tiny_clip_text_model(), clip_tokenizer(PAD_EOS), layer="hidden", layer_idx=11)
    clip_g = FrozenOpenCLIPEmbedder2(CLIP(TEXT_WIDTH, 32, TEXT_HEADS, embed_dim=TEXT_WIDTH))
    sizes = [(ConcatTimestepEmbedderND(SIZE_EMBED_DIM), key)
             for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    return GeneralConditioner([(clip_l, "txt"), (clip_g, "txt"), *sizes])


def build_sdxl(seed: int = 0) -> DiffusionEngine:
    """SDXL base (`sd_xl_base.yaml`) at tiny widths: crossattn = CLIP-L + bigG, vector = pooled + 3 size embeds."""
    with _seeded(seed):
        unet = UNetModel(model_channels=MODEL_CHANNELS, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                         num_head_channels=HEAD_CHANNELS, transformer_depth=(1, 2, 10), context_dim=2 * TEXT_WIDTH,
                         use_linear_in_transformer=True, adm_in_channels=TEXT_WIDTH + 6 * SIZE_EMBED_DIM,
                         cast_input=False)
        model = DiffusionEngine(unet, _sdxl_conditioner(), AutoencoderKLInferenceWrapper())
        _randomize_norms(model)
    return _as_loaded(model, "sdxl", seed)


def assign_network_names(sd_model: nn.Module) -> dict[str, nn.Module]:
    """`extensions-builtin/Lora/networks.py: assign_network_names_to_compvis_modules`."""
    mapping: dict[str, nn.Module] = {}

    def record(prefix: str, root: nn.Module) -> None:
        for name, module in root.named_modules():
            network_name = prefix + name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name

    if sd_model.is_sdxl:
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                record(f"{i}_", embedder.wrapped)
    else:
        record("", getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model))
    record("", sd_model.model)
    sd_model.network_layer_mapping = mapping
    return mapping
