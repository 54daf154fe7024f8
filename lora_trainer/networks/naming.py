"""Module names <-> kohya keys.

kohya writes SD1/SD2 UNet keys with diffusers module names (`lora_unet_down_blocks_0_attentions_0_...`) and SDXL
UNet keys with the Stability (ldm/sgm) names (`lora_unet_input_blocks_4_1_...`), text-encoder keys always with the
`text_model_` level (`lora_te_text_model_encoder_layers_0_...`, SDXL `lora_te1_`/`lora_te2_`). A model tree may use
either naming (diffusers in the standalone backend, ldm/sgm inside the WebUI), so the UNet table below converts
module paths both ways; it is built like kohya's `make_unet_conversion_map` from the block layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RESNET_CHILDREN = {  # diffusers -> ldm
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_RESNET_CHILDREN_LDM = {v: k for k, v in RESNET_CHILDREN.items()}


@dataclass(frozen=True)
class _Block:
    diffusers: str
    ldm: str
    kind: str  # "resnet" | "attention" | "plain"


def _unet_blocks(down_attn: Sequence[bool], up_attn: Sequence[bool], layers_per_block: int) -> list[_Block]:
    n = layers_per_block
    blocks = [_Block("conv_in", "input_blocks.0.0", "plain"),
              _Block("time_embedding.linear_1", "time_embed.0", "plain"),
              _Block("time_embedding.linear_2", "time_embed.2", "plain"),
              _Block("add_embedding.linear_1", "label_emb.0.0", "plain"),
              _Block("add_embedding.linear_2", "label_emb.0.2", "plain"),
              _Block("conv_norm_out", "out.0", "plain"),
              _Block("conv_out", "out.2", "plain"),
              _Block("mid_block.attentions.0", "middle_block.1", "attention")]
    blocks += [_Block(f"mid_block.resnets.{j}", f"middle_block.{2 * j}", "resnet") for j in range(2)]
    levels = len(down_attn)
    for i in range(levels):
        for j in range(n):
            idx = (n + 1) * i + j + 1
            blocks.append(_Block(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if down_attn[i]:
                blocks.append(_Block(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attention"))
        if i < levels - 1:
            blocks.append(_Block(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(n + 1) * (i + 1)}.0.op",
                                 "plain"))
    for i in range(levels):
        for j in range(n + 1):
            idx = (n + 1) * i + j
            blocks.append(_Block(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if up_attn[i]:
                blocks.append(_Block(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "attention"))
        if i < levels - 1:
            slot = 2 if up_attn[i] else 1
            blocks.append(_Block(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{(n + 1) * i + n}.{slot}", "plain"))
    return blocks


class UNetNames:
    """Converts UNet module paths between diffusers and ldm/sgm naming for one block layout."""

    def __init__(self, down_attn: Sequence[bool], up_attn: Sequence[bool], layers_per_block: int = 2):
        blocks = _unet_blocks(down_attn, up_attn, layers_per_block)
        self._to_ldm = {b.diffusers: b for b in blocks}
        self._to_diffusers = {b.ldm: b for b in blocks}

    @classmethod
    def for_family(cls, family: str) -> UNetNames:
        if family == "sdxl":
            return cls([False, True, True], [True, True, False])
        return cls([True, True, True, False], [False, True, True, True])

    def to_ldm(self, path: str) -> str:
        return self._convert(path, self._to_ldm, to_ldm=True)

    def to_diffusers(self, path: str) -> str:
        return self._convert(path, self._to_diffusers, to_ldm=False)

    def _convert(self, path: str, table: dict[str, _Block], to_ldm: bool) -> str:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            block = table.get(head)
            if block is None:
                continue
            rest = ".".join(parts[cut:])
            new_head = block.ldm if to_ldm else block.diffusers
            if block.kind == "resnet" and rest:
                rest = _map_resnet_child(rest, RESNET_CHILDREN if to_ldm else _RESNET_CHILDREN_LDM)
            return f"{new_head}.{rest}" if rest else new_head
        raise KeyError(f"no {'ldm' if to_ldm else 'diffusers'} name for UNet module {path!r}")


def _map_resnet_child(rest: str, table: dict[str, str]) -> str:
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            return table[src] + rest[len(src):]
    return rest


def kohya_key(prefix: str, path: str) -> str:
    """`prefix` + module path with dots as underscores, the way every loader rebuilds its table."""
    return f"{prefix}_{path.replace('.', '_')}"


def te_path(path: str) -> str:
    """HF CLIP text-encoder path with the `text_model.` level (transformers >= 5.6 dropped it from CLIPTextModel)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def te_prefixes(family: str) -> list[str]:
    return ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
