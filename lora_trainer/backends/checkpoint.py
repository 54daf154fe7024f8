"""Model files -> SDComponents: single-file checkpoints (the layout AUTOMATIC1111 uses), diffusers folders, VAEs.

A single-file checkpoint holds the UNet under `model.diffusion_model.` (ldm/sgm module names), the VAE under
`first_stage_model.` (ldm names) and the text encoder(s) under `cond_stage_model.transformer.` (SD1, Hugging Face
CLIP layout), `cond_stage_model.model.` (SD2, OpenCLIP ViT-H layout) or `conditioner.embedders.{0,1}.` (SDXL:
CLIP-L in HF layout, OpenCLIP bigG). The keys are renamed here with tables built from the model config, so nothing
depends on diffusers' or transformers' own conversion code, which changes between releases. Tensors are read one at
a time, cast to float32 (exactly: every fp16/bf16 value is an fp32 value), checked against the shapes the config
expects, and assigned into models built on the meta device, so a full-size model is never randomly initialised.

Everything here works offline: no config or tokenizer is fetched from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..networks.naming import UNetNames
from .components import SDComponents, build_from_spec, family_of_unet_config
from .sd_configs import FULL, SD_SCHEDULE, FamilySpec
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# family -> text encoders as (key prefix, layout, OpenCLIP text_projection kept as HF text_projection)
TEXT_ENCODERS: dict[str, list[tuple[str, str, bool]]] = {
    "sd1": [("cond_stage_model.transformer.", "hf", False)],
    "sd2": [("cond_stage_model.model.", "openclip", False)],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf", False),
             ("conditioner.embedders.1.model.", "openclip", True)],
}
IN_CHANNEL_KINDS = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "an SD2 depth model"}
SUPPORTED = "Only SD1.x, SD2.x and SDXL base models with 4 latent input channels are supported."


# -- reading tensors ---------------------------------------------------------------------------------------------

class TensorFile:
    """The tensors of a checkpoint by name, each read once: safetensors files are read one tensor at a time, and a
    pickle's tensors are released as they are taken, so a file's tensors and the model never both fill the memory."""

    def __init__(self, path: str, keys: list[str], get: Callable[[str], Tensor], shape: Callable[[str], tuple],
                 copy: bool):
        self.path = path
        self.keys = keys
        self._get = get
        self._shape = shape
        self._copy = copy  # the reader's tensors live in its own buffers (safetensors): always copy them out

    def get(self, key: str) -> Tensor:
        """A floating-point tensor as contiguous, 64-byte aligned float32 (exact for fp16/bf16); others as stored.

        Tensors read from a file can sit at unaligned addresses, which makes CPU kernels take other code paths:
        results would differ in the last bits from the same weights in torch-allocated memory.
        """
        t = self._get(key)
        if not t.is_floating_point():
            return t
        if not self._copy and t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 64 == 0:
            return t
        return torch.empty(t.shape, dtype=torch.float32).copy_(t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shape(key))

    def has(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.keys)

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.keys if k.startswith(prefix)]


@contextlib.contextmanager
def open_tensors(path: str) -> Iterator[TensorFile]:
    """Open a .safetensors file or a torch pickle (with or without a top-level "state_dict")."""
    _check_file(path)
    if not _is_safetensors(path):
        tensors = _load_pickle(path)
        yield TensorFile(path, list(tensors), tensors.pop, lambda k: tensors[k].shape, copy=False)
        return
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as e:  # safetensors raises its own error types, which differ between releases
        raise UserError(f"{path}: not a valid .safetensors file ({_first_line(e)}); the file may be truncated or "
                        "not a model; download or export it again") from e
    yield TensorFile(path, keys, handle.get_tensor, lambda k: handle.get_slice(k).get_shape(), copy=True)


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give the path of a .safetensors or .ckpt model file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); the download or copy probably failed")


def _is_safetensors(path: str) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return n <= size - 8 and head[8:9] == b"{"


def _load_pickle(path: str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise UserError(f"{path}: this pickle holds Python objects besides tensors, and loading it would run "
                            "code from the file, so it was refused. Convert it to .safetensors (or use a "
                            ".safetensors download of the same model)") from e
        raise _unreadable(path, e) from e
    except Exception as e:  # zip/pickle/EOF errors: a corrupt or foreign file
        raise _unreadable(path, e) from e
    return _tensor_dict(obj, path)


def _unreadable(path: str, e: BaseException) -> UserError:
    return UserError(f"{path}: could not be read as a .safetensors file nor as a PyTorch .ckpt/.pt "
                     f"({_first_line(e)}); the file is corrupt or not a model file")


def _tensor_dict(obj: Any, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors; it is not a model file")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# -- what is in the file -----------------------------------------------------------------------------------------

def _not_a_model(tf: TensorFile) -> str | None:
    """What a file that is not an SD1/SD2/SDXL checkpoint looks like, or None."""
    keys = tf.keys
    checks = [
        (lambda: any(k.startswith(("lora_", "lycoris_")) or any(s in k for s in (".lora_down.", ".lora_A.",
                     ".hada_w1", ".lokr_w1")) for k in keys),
         "a LoRA/LyCORIS network, not a base model: give the checkpoint to train on as the base model"),
        (lambda: bool(keys) and set(keys) <= {"string_to_param", "emb_params", "clip_l", "clip_g", "string_to_token"},
         "a textual-inversion embedding, not a base model"),
        (lambda: tf.has("model.diffusion_model.joint_blocks.", "joint_blocks."), "a Stable Diffusion 3 model"),
        (lambda: tf.has("model.diffusion_model.double_blocks.", "double_blocks."), "a Flux model"),
        (lambda: not tf.has(UNET_PREFIX) and tf.has("encoder.conv_in.", VAE_PREFIX + "encoder.conv_in."),
         "a VAE on its own: use it as the 'vae' option and give a full checkpoint as the base model"),
        (lambda: tf.has("down_blocks.0.resnets.", "conv_in."),
         "a diffusers UNet weight file: give the diffusers model folder (the one with model_index.json) instead"),
        (lambda: tf.has("text_model.", "encoder.layers."), "a text encoder on its own, not a full checkpoint"),
    ]
    return next((what for test, what in checks if test()), None)


def _unet_without_known_te(tf: TensorFile) -> str:
    if tf.has("conditioner.embedders.0.model."):
        return "an SDXL refiner, which is not supported: use an SDXL base model"
    if tf.has("cond_stage_model.roberta.", "cond_stage_model.model.roberta"):
        return "an AltDiffusion model, which is not supported"
    if tf.has("embedder.", "noise_augmentor."):
        return "an SD2 unCLIP model, which is not supported"
    return "a UNet with an unknown text encoder (none of cond_stage_model.* / conditioner.embedders.*)"


def detect_family(tf: TensorFile) -> str:
    """'sd1' | 'sd2' | 'sdxl' from the key layout; UserError naming the file and what it looks like otherwise."""
    what = _not_a_model(tf)
    if what is None and not tf.has(UNET_PREFIX):
        sample = ", ".join(repr(k) for k in tf.keys[:3]) or "none"
        what = f"not a Stable Diffusion checkpoint ({len(tf.keys)} tensors, named like {sample})"
    if what is not None:
        raise UserError(f"{tf.path}: this file is {what}. {SUPPORTED}")
    if tf.has("conditioner.embedders.1.model."):
        family = "sdxl"
    elif tf.has("cond_stage_model.model.transformer."):
        family = "sd2"
    elif tf.has("cond_stage_model.transformer."):
        family = "sd1"
    else:
        raise UserError(f"{tf.path}: this file is {_unet_without_known_te(tf)}. {SUPPORTED}")
    _check_in_channels(tf, family)
    return family


def _check_in_channels(tf: TensorFile, family: str) -> None:
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in tf.keys:
        return
    shape = tf.shape(key)
    if len(shape) == 4 and shape[1] != 4:
        kind = IN_CHANNEL_KINDS.get(shape[1], "a model with an unusual input layer")
        raise UserError(f"{tf.path}: this {FAMILY_NAMES[family]} file is {kind} ({shape[1]} input channels "
                        f"instead of 4). {SUPPORTED} Train on the matching base model instead.")


def _resolve_family(detected: str, requested: str | None, path: str) -> str:
    if requested not in (None, "", "auto") and requested != detected:
        raise UserError(f"{path}: model_family is {requested!r} but this is an {FAMILY_NAMES[detected]} checkpoint; "
                        f"set model_family to 'auto' or {detected!r}")
    return detected


# -- key renaming ----------------------------------------------------------------------------------------------

def _rename(path: str, table: dict[str, str], children: dict[str, str]) -> str | None:
    """Longest module prefix of `path` found in `table`, renamed; the child right after it renamed by `children`."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            rest = parts[cut:]
            if rest and rest[0] in children:
                rest = [children[rest[0]], *rest[1:]]
            return ".".join([table[head], *rest])
    return None


def _unet_names(cfg: dict[str, Any]) -> UNetNames:
    down = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up = ["CrossAttn" in t for t in cfg["up_block_types"]]
    return UNetNames(down, up, int(cfg.get("layers_per_block", 2)))


def convert_unet(tf: TensorFile, cfg: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """ldm/sgm UNet keys -> diffusers UNet2DConditionModel keys; also the keys that have no diffusers name."""
    names = _unet_names(cfg)
    out, unknown = {}, []
    for key in tf.with_prefix(UNET_PREFIX):
        module, _, param = key[len(UNET_PREFIX):].rpartition(".")
        try:
            out[f"{names.to_diffusers(module)}.{param}"] = tf.get(key)
        except KeyError:
            unknown.append(key)
    return out, unknown


_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET_CHILDREN = {"nin_shortcut": "conv_shortcut"}


def vae_table(cfg: dict[str, Any]) -> dict[str, str]:
    """ldm VAE module path -> diffusers AutoencoderKL module path, for the config's block layout."""
    levels, n = len(cfg["block_out_channels"]), int(cfg["layers_per_block"])
    table = {m: m for m in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                            "quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        table[f"{side}.mid.block_1"] = f"{side}.mid_block.resnets.0"
        table[f"{side}.mid.block_2"] = f"{side}.mid_block.resnets.1"
        attn = f"{side}.mid_block.attentions.0"
        table.update({f"{side}.mid.attn_1.{a}": f"{attn}.{b}" for a, b in _VAE_ATTENTION.items()})
    for i in range(levels):
        up = levels - 1 - i  # ldm numbers the decoder levels from the bottom, diffusers from the top
        table.update({f"encoder.down.{i}.block.{j}": f"encoder.down_blocks.{i}.resnets.{j}" for j in range(n)})
        table.update({f"decoder.up.{up}.block.{j}": f"decoder.up_blocks.{i}.resnets.{j}" for j in range(n + 1)})
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
            table[f"decoder.up.{up}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return table


def convert_vae(tf: TensorFile, prefix: str, cfg: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """ldm VAE keys under `prefix` -> AutoencoderKL keys (a VAE already in diffusers layout passes unchanged)."""
    keys = [k for k in tf.with_prefix(prefix) if k[len(prefix):].startswith(VAE_ROOTS)]
    if any(k[len(prefix):].startswith("encoder.down_blocks.") for k in keys):
        return {k[len(prefix):]: tf.get(k) for k in keys}, []
    table = vae_table(cfg)
    out, unknown = {}, []
    for key in keys:
        module, _, param = key[len(prefix):].rpartition(".")
        new = _rename(module, table, _VAE_RESNET_CHILDREN)
        if new is None:
            unknown.append(key)
        else:
            out[f"{new}.{param}"] = tf.get(key)
    return out, unknown


def convert_hf_clip(tf: TensorFile, prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """A CLIP text model stored in Hugging Face layout; keys get the `text_model.` level (old files lack it)."""
    out = {}
    for key in tf.with_prefix(prefix):
        name = key[len(prefix):]
        if name.endswith("position_ids"):  # a constant; some merged checkpoints carry a corrupted copy
            continue
        if not name.startswith(("text_model.", "text_projection")):
            name = "text_model." + name
        out[name] = tf.get(key)
    return out, []


_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_UNUSED = {"logit_scale", "attn_mask"}
_RESBLOCKS = "transformer.resblocks."


def convert_openclip(tf: TensorFile, prefix: str, projection: bool,
                     keep_layers: int | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """An OpenCLIP text tower -> HF CLIPTextModel(WithProjection) keys.

    `keep_layers`: resblocks from this index on are not used (SD2 conditions on the penultimate layer, so its
    converted encoder has 23 of ViT-H's 24 blocks). `projection`: keep `text_projection` (OpenCLIP stores it as
    x @ P, the transpose of a Linear weight).
    """
    out, unknown = {}, []
    for key in tf.with_prefix(prefix):
        name = key[len(prefix):]
        if name in _OPENCLIP_TOP:
            out["text_model." + _OPENCLIP_TOP[name]] = tf.get(key)
        elif name == "text_projection":
            if projection:
                out["text_projection.weight"] = tf.get(key).t().contiguous()
        elif name.startswith(_RESBLOCKS):
            if not _convert_resblock(name[len(_RESBLOCKS):], lambda k=key: tf.get(k), keep_layers, out):
                unknown.append(key)
        elif name not in _OPENCLIP_UNUSED:
            unknown.append(key)
    return out, unknown


def _convert_resblock(name: str, get: Callable[[], Tensor], keep_layers: int | None, out: dict[str, Tensor]) -> bool:
    """One `resblocks.N.*` tensor into `out`; False when the name is not an OpenCLIP block tensor."""
    index, _, rest = name.partition(".")
    if not index.isdigit():
        return False
    if keep_layers is not None and int(index) >= keep_layers:
        return True
    base = f"text_model.encoder.layers.{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        for proj, part in zip("qkv", get().chunk(3, dim=0), strict=False):
            out[f"{base}self_attn.{proj}_proj.{kind}"] = part.clone()
        return True
    module, _, param = rest.rpartition(".")
    if module not in _OPENCLIP_BLOCK:
        return False
    out[f"{base}{_OPENCLIP_BLOCK[module]}.{param}"] = get()
    return True


def convert_text_encoder(tf: TensorFile, prefix: str, layout: str, projection: bool,
                         cfg: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    if layout == "hf":
        return convert_hf_clip(tf, prefix)
    keep = None if projection else int(cfg["num_hidden_layers"])
    return convert_openclip(tf, prefix, projection, keep)


# -- filling models ----------------------------------------------------------------------------------------------

def _empty_models(spec: FamilySpec) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """The family's models on the meta device: shapes without memory or random init."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_from_spec(spec)


def _fit_layout(sd: dict[str, Tensor], expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Drop the `text_model.` level where the model has none (transformers >= 5.6 flattened CLIPTextModel)."""
    out = {}
    for key, t in sd.items():
        flat = key[len("text_model."):] if key.startswith("text_model.") else key
        out[flat if key not in expected and flat in expected else key] = t
    return out


def _fit_shape(t: Tensor, shape: torch.Size) -> Tensor | None:
    """`t` in `shape` when they differ only by trailing 1s (ldm 1x1 convs vs diffusers Linear), else None."""
    if t.shape == shape:
        return t
    squeeze = list(t.shape)
    while squeeze and squeeze[-1] == 1 and len(squeeze) > len(shape):
        squeeze.pop()
    target = list(shape)
    while target and target[-1] == 1 and len(target) > len(squeeze):
        target.pop()
    return t.reshape(shape) if squeeze == target else None


def _weight_problems(sd: dict[str, Tensor], expected: dict[str, torch.Size], unknown: list[str]) -> list[str]:
    """One line per kind of problem (wrong shapes, missing, not in the model); fits the shapes it can in place."""
    wrong = []
    for key, t in list(sd.items()):
        if key not in expected:
            unknown.append(key)
            continue
        fitted = _fit_shape(t, expected[key])
        if fitted is None:
            wrong.append(f"{key} is {tuple(t.shape)} instead of {tuple(expected[key])}")
        else:
            sd[key] = fitted
    missing = [k for k in expected if k not in sd and not k.endswith("position_ids")]
    lines = [(wrong, "have the wrong shape"), (missing, "are missing"), (unknown, "are not part of the model")]
    return [f"{len(items)} weights {what}, e.g. {'; '.join(items[:2])}" for items, what in lines if items]


def fill_model(model: nn.Module, sd: dict[str, Tensor], unknown: list[str], what: str, path: str,
               family: str) -> nn.Module:
    """Check `sd` against the meta `model`'s keys and shapes, then assign the tensors into it."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if not sd:
        raise UserError(f"{path}: holds no {what} weights; it is not a complete {FAMILY_NAMES[family]} checkpoint")
    sd = _fit_layout(sd, expected)
    problems = _weight_problems(sd, expected, list(unknown))
    if problems:
        raise UserError(f"{path}: the {what} weights do not fit a standard {FAMILY_NAMES[family]} model: "
                        f"{'. '.join(problems)}. "
                        "The file is probably another architecture or an incomplete checkpoint; check that it is an "
                        "SD1.x, SD2.x or SDXL base model and that model_family is right")
    for key, shape in expected.items():
        if key not in sd:  # position_ids, persistent in transformers < 4.31
            sd[key] = _position_ids(shape)
    model.load_state_dict(sd, strict=True, assign=True)
    _materialize_buffers(model)
    return model.eval()


def _position_ids(shape: torch.Size) -> Tensor:
    return torch.arange(shape.numel(), dtype=torch.long).reshape(shape)


def _materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers are not in a state dict; the only ones these models have are CLIP's position_ids."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} of {type(model).__name__} has no value after loading")
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = _position_ids(buf.shape)


# -- prediction type -----------------------------------------------------------------------------------------------

@torch.no_grad()
def is_v_prediction_sd2(unet: nn.Module) -> bool:
    """A1111's test (v1.10.1 `is_using_v_parameterization_for_sd2`) on a diffusers UNet.

    At t=999 on a constant 0.5 latent, an epsilon model predicts noise of about the input's size, while a v-model
    predicts v = sqrt(a)*eps - sqrt(1-a)*x0, strongly negative here: the mean of (output - input) is below -1.
    """
    param = next(unet.parameters())
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    cond = torch.full((1, 2, cfg.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    t = torch.tensor([999], device=param.device)
    was_training = unet.training
    unet.eval()
    try:
        out = unet(x, t, encoder_hidden_states=cond).sample
    finally:
        unet.train(was_training)
    return bool((out - x).float().mean().item() < -1)


def default_prediction_type(family: str, unet: nn.Module) -> str:
    if family != "sd2":
        return "epsilon"
    pred = "v_prediction" if is_v_prediction_sd2(unet) else "epsilon"
    log.info("SD2 model: detected %s prediction", pred)
    return pred


def vae_identity(vae: nn.Module) -> str:
    """Content hash of a VAE's weights and scaling factor: the same VAE gets the same id whatever file it came in."""
    h = hashlib.sha256(repr(float(getattr(vae.config, "scaling_factor", 0.0))).encode())
    for key, t in sorted(vae.state_dict().items()):
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"vae-sha256-{h.hexdigest()[:24]}"


# -- public loaders ------------------------------------------------------------------------------------------------

def load_single_file(path: str, family: str = "auto", prediction_type: str | None = None,
                     spec: FamilySpec | None = None) -> SDComponents:
    """An SD1.x / SD2.x / SDXL checkpoint in the original single-file layout, as diffusers/transformers modules.

    `spec` sets the model configs (default: the full-size config of the detected family).
    """
    with open_tensors(path) as tf:
        family = _resolve_family(detect_family(tf), family, path)
        spec = spec or FULL[family]
        if spec.family != family:
            raise UserError(f"{path}: is an {FAMILY_NAMES[family]} checkpoint, but a {spec.family} config was given")
        unet, vae, text_encoders = _load_models(tf, spec, family)
    pred = prediction_type or default_prediction_type(family, unet)
    tokenizers = [clip_tokenizer(pad) for pad in spec.pad_tokens]
    return SDComponents(family, unet, vae, text_encoders, tokenizers, pred, spec.scaling_factor, dict(SD_SCHEDULE),
                        source=path, model_hash=sha256_file(path), vae_id=vae_identity(vae))


def _load_models(tf: TensorFile, spec: FamilySpec, family: str) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    unet, vae, text_encoders = _empty_models(spec)
    unet = fill_model(unet, *convert_unet(tf, spec.unet), "UNet (model.diffusion_model.*)", tf.path, family)
    vae = fill_model(vae, *convert_vae(tf, VAE_PREFIX, spec.vae), "VAE (first_stage_model.*)", tf.path, family)
    loaded = []
    parts = zip(text_encoders, spec.text_encoders, TEXT_ENCODERS[family], strict=True)
    for i, (te, cfg, (prefix, layout, proj)) in enumerate(parts):
        what = f"text encoder {i + 1} ({prefix}*)"
        loaded.append(fill_model(te, *convert_text_encoder(tf, prefix, layout, proj, cfg), what, tf.path, family))
    return unet, vae, loaded


def load_vae_file(path: str, family: str, spec: FamilySpec | None = None) -> nn.Module:
    """A standalone VAE: .safetensors/.pt/.ckpt in ldm layout (optionally under `first_stage_model.`, so a full
    checkpoint's VAE works too; a diffusers-layout VAE file works as well) or a diffusers VAE folder."""
    if os.path.isdir(path):
        return _vae_from_folder(path)
    if spec is None and family not in FULL:
        raise UserError(f"{path}: cannot load a VAE for model family {family!r}; use one of {', '.join(FULL)}")
    spec = spec or FULL[family]
    with open_tensors(path) as tf:
        prefix = _vae_prefix(tf)
        empty = _empty_vae(spec)
        return fill_model(empty, *convert_vae(tf, prefix, spec.vae), "VAE", path, spec.family)


def _vae_prefix(tf: TensorFile) -> str:
    for prefix in ("", VAE_PREFIX, "vae."):
        if tf.has(prefix + "encoder.conv_in.") and tf.has(prefix + "decoder.conv_out."):
            return prefix
    what = _not_a_model(tf) or ("a full checkpoint without a VAE" if tf.has(UNET_PREFIX) else None)
    looks = f"it looks like {what}" if what else f"its tensors are named like {', '.join(tf.keys[:3]) or 'nothing'}"
    raise UserError(f"{tf.path}: not a VAE file (no encoder.conv_in / decoder.conv_out weights; {looks}). "
                    "Give a VAE .safetensors/.pt/.ckpt or a diffusers VAE folder")


def _empty_vae(spec: FamilySpec) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return AutoencoderKL(**spec.vae)


def _vae_from_folder(path: str) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{path}: a folder without config.json (nor vae/config.json); give a diffusers VAE folder "
                        "or a VAE file")
    return _pretrained(AutoencoderKL, folder, path)


def load_diffusers_folder(path: str, prediction_type: str | None = None) -> SDComponents:
    """A diffusers model folder (unet/, vae/, text_encoder/[, text_encoder_2/], tokenizers optional), offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _check_diffusers_folder(path)
    unet = _pretrained(UNet2DConditionModel, os.path.join(path, "unet"), path)
    vae = _pretrained(AutoencoderKL, os.path.join(path, "vae"), path)
    family = family_of_unet_config(unet.config)
    text_encoders = _folder_text_encoders(path, family)
    if family == "sd1" and getattr(text_encoders[0].config, "hidden_act", "") == "gelu":
        family = "sd2"  # OpenCLIP ViT-H uses gelu, CLIP-L quick_gelu (the tiny SD2 has no 1024-wide cross-attention)
    pads = FULL[family].pad_tokens
    subs = ("tokenizer", "tokenizer_2")[:len(text_encoders)]
    tokenizers = [_folder_tokenizer(path, sub, pad) for sub, pad in zip(subs, pads, strict=True)]
    scheduler = _scheduler_config(path)
    pred = prediction_type or scheduler.get("prediction_type") or default_prediction_type(family, unet)
    schedule = {k: scheduler.get(k, v) for k, v in SD_SCHEDULE.items()}
    return SDComponents(family, unet, vae, text_encoders, tokenizers, pred, float(vae.config.scaling_factor), schedule,
                        source=path, vae_id=vae_identity(vae))


def _check_diffusers_folder(path: str) -> None:
    missing = [sub for sub in ("unet", "vae", "text_encoder") if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise UserError(f"{path}: not a diffusers model folder (no {', '.join(s + '/' for s in missing)}); give a "
                        "folder saved with save_pretrained (with model_index.json) or a .safetensors/.ckpt file")


def _pretrained(cls: Any, folder: str, root: str) -> Any:
    part = os.path.relpath(folder, root) if folder != root else "the folder"
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{root}: could not load {part} as a {cls.__name__} ({_first_line(e)}); check that the "
                        "folder is complete") from e
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    missing += [str(k) for k in info.get("mismatched_keys", [])]
    if missing:  # from_pretrained only warns and leaves these randomly initialised
        newer = (" or saved by transformers >= 5.6, which writes CLIP text encoders without the text_model. level "
                 "that this transformers needs" if missing[0].startswith("text_model.") else "")
        raise UserError(f"{root}: {part} does not hold all weights of a {cls.__name__} ({len(missing)} missing or "
                        f"of the wrong shape, e.g. {missing[0]}). The folder is incomplete{newer}; save it again or "
                        "use a single-file checkpoint")
    return _own_memory(model)


@torch.no_grad()
def _own_memory(model: nn.Module) -> nn.Module:
    """Move tensors that from_pretrained left inside the file buffer (unaligned) into memory torch allocated, so
    that a folder computes bit for bit like the same weights from a single file (see TensorFile.get)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
    return model


def _folder_text_encoders(path: str, family: str) -> list[nn.Module]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders = [_pretrained(CLIPTextModel, os.path.join(path, "text_encoder"), path)]
    if family == "sdxl":
        if not os.path.isdir(os.path.join(path, "text_encoder_2")):
            raise UserError(f"{path}: an SDXL diffusers folder needs text_encoder_2/, which is missing")
        encoders.append(_pretrained(CLIPTextModelWithProjection, os.path.join(path, "text_encoder_2"), path))
    return encoders


def _folder_tokenizer(path: str, sub: str, pad: str) -> Any:
    folder = os.path.join(path, sub)
    if os.path.isdir(folder) and os.listdir(folder):
        from transformers import CLIPTokenizerFast

        try:
            return CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # e.g. a tokenizer.json written by a newer `tokenizers` than the installed one
            log.warning("%s: could not load the tokenizer (%s); using the built-in CLIP tokenizer", folder,
                        _first_line(e))
    return clip_tokenizer(pad)


def _scheduler_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); using the default SD noise schedule", file, _first_line(e))
        return {}
    return cfg if isinstance(cfg, dict) else {}
