"""Test helper: diffusers/transformers components -> the original single-file checkpoint layout (A1111's).

Written independently of `lora_trainer.backends.checkpoint` (regular expressions here, tables there), so that a
round trip through both cannot hide a naming mistake that both would share. The UNet names come from
`networks.naming.UNetNames`, which has its own tests against kohya's key sets.

SD1:  model.diffusion_model.* (ldm), first_stage_model.*, cond_stage_model.transformer.text_model.*
SD2:  as SD1 but cond_stage_model.model.* (OpenCLIP ViT-H: fused attention in_proj, one more resblock than the
      23-layer HF encoder, text_projection and logit_scale, all unused by SD)
SDXL: model.diffusion_model.* (sgm), first_stage_model.*, conditioner.embedders.0.transformer.text_model.* and
      conditioner.embedders.1.model.* (OpenCLIP bigG, text_projection stored as OpenCLIP does: x @ P)
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from lora_trainer.backends.components import SDComponents
from lora_trainer.networks.naming import UNetNames, te_path

# Tensors real checkpoints carry besides the three models (the sampler's schedule, EMA bookkeeping).
EXTRAS = {"alphas_cumprod": torch.linspace(0.999, 0.005, 1000), "model_ema.num_updates": torch.tensor(0)}


def to_ldm_state_dict(components: SDComponents, extras: bool = True) -> dict[str, Tensor]:
    c = components
    out = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(c.unet, c.family).items()}
    out.update({"first_stage_model." + k: v for k, v in vae_to_ldm(c.vae).items()})
    if c.family == "sd1":
        out.update(hf_clip(c.text_encoders[0], "cond_stage_model.transformer."))
    elif c.family == "sd2":
        out.update(openclip(c.text_encoders[0], "cond_stage_model.model.", extra_block=True))
    else:
        out.update(hf_clip(c.text_encoders[0], "conditioner.embedders.0.transformer."))
        out.update(openclip(c.text_encoders[1], "conditioner.embedders.1.model.", extra_block=False))
    if extras:
        out.update({k: v.clone() for k, v in EXTRAS.items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def unet_to_ldm(unet: nn.Module, family: str) -> dict[str, Tensor]:
    names = UNetNames.for_family(family)
    out = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        out[f"{names.to_ldm(module)}.{param}"] = value
    return out


_VAE_PATTERNS = [  # (diffusers regex, ldm replacement); {up} is filled with the ldm decoder level
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up.{up}.upsample.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]


def vae_key(key: str, levels: int) -> str:
    for pattern, repl in _VAE_PATTERNS:
        m = re.match(pattern, key)
        if m:
            if "{up}" in repl:
                repl = repl.replace("{up}", str(levels - 1 - int(m.group(1))))
            key = re.sub(pattern, repl, key)
            break
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def vae_to_ldm(vae: nn.Module) -> dict[str, Tensor]:
    """ldm keeps the mid attention's q/k/v/proj_out as 1x1 convolutions: 4-D weights."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def hf_clip(te: nn.Module, prefix: str) -> dict[str, Tensor]:
    """HF layout with the `text_model.` level, plus position_ids as real SD1 checkpoints carry them."""
    sd = {te_path(k): v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    n = te.config.max_position_embeddings
    sd["text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return {prefix + k: v for k, v in sd.items()}


def openclip(te: nn.Module, prefix: str, extra_block: bool) -> dict[str, Tensor]:
    sd = {k if k.startswith("text_projection") else te_path(k): v for k, v in te.state_dict().items()}
    tm = "text_model."
    out = {"token_embedding.weight": sd[tm + "embeddings.token_embedding.weight"],
           "positional_embedding": sd[tm + "embeddings.position_embedding.weight"],
           "ln_final.weight": sd[tm + "final_layer_norm.weight"], "ln_final.bias": sd[tm + "final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    layers = te.config.num_hidden_layers
    for i in range(layers):
        out.update(resblock(sd, i, i))
    if extra_block:  # A1111's ViT-H has 24 blocks; the converted HF encoder keeps 23 (SD2 uses the penultimate)
        out.update({k: torch.zeros_like(v) for k, v in resblock(sd, 0, layers).items()})
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t()
    else:  # SD2's file has ViT-H's projection, which SD does not use
        width = te.config.hidden_size
        out["text_projection"] = torch.full((width, width), 0.5)
    return {prefix + k: v for k, v in out.items()}


def resblock(sd: dict[str, Tensor], src: int, dst: int) -> dict[str, Tensor]:
    p = f"text_model.encoder.layers.{src}."
    b = f"transformer.resblocks.{dst}."
    out = {}
    for kind in ("weight", "bias"):
        qkv = [sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"]
        out[f"{b}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        out[f"{b}attn.out_proj.{kind}"] = sd[f"{p}self_attn.out_proj.{kind}"]
        out[f"{b}ln_1.{kind}"] = sd[f"{p}layer_norm1.{kind}"]
        out[f"{b}ln_2.{kind}"] = sd[f"{p}layer_norm2.{kind}"]
        out[f"{b}mlp.c_fc.{kind}"] = sd[f"{p}mlp.fc1.{kind}"]
        out[f"{b}mlp.c_proj.{kind}"] = sd[f"{p}mlp.fc2.{kind}"]
    return out
