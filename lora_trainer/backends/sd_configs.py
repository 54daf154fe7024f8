"""Model configs for SD1.x, SD2.x and SDXL (full size), and the built-in tiny models.

The tiny models keep the real families' block layout, module names and layer types (so their network keys are
exactly kohya's key sets) at tiny widths, with random weights from a fixed seed. They train on a CPU in seconds and
stand in for real checkpoints in the demo and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

_SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
_SD2_UNET = {**_SD1_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True, "sample_size": 96}
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_CLIP_H23 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


@dataclass(frozen=True)
class FamilySpec:
    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    pad_tokens: tuple[str, ...]
    prediction_type: str = "epsilon"
    schedule: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULE))
    resolution: int = 512

    @property
    def scaling_factor(self) -> float:
        return float(self.vae["scaling_factor"])


FULL: dict[str, FamilySpec] = {
    "sd1": FamilySpec("sd1", _SD1_UNET, _VAE, (_CLIP_L,), ("<|endoftext|>",)),
    "sd2": FamilySpec("sd2", _SD2_UNET, _VAE, (_CLIP_H23,), ("!",), "v_prediction", resolution=768),
    "sdxl": FamilySpec("sdxl", _SDXL_UNET, {**_VAE, "scaling_factor": 0.13025, "sample_size": 1024,
                                            "force_upcast": True},
                       (_CLIP_L, _CLIP_BIGG), ("<|endoftext|>", "!"), resolution=1024),
}

_TINY_VAE = {**_VAE, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "sample_size": 64,
             "layers_per_block": 1}
_TINY_TE = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32)
_TINY_UNET = dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32, sample_size=8)

TINY: dict[str, FamilySpec] = {
    "tiny-sd1": FamilySpec(
        "sd1", {**_SD1_UNET, **_TINY_UNET, "attention_head_dim": 4}, _TINY_VAE,
        ({**_TINY_TE, "num_hidden_layers": 12, "hidden_act": "quick_gelu"},), ("<|endoftext|>",), resolution=64),
    "tiny-sd2": FamilySpec(
        "sd2", {**_SD2_UNET, **_TINY_UNET, "attention_head_dim": (2, 4, 8, 8)}, _TINY_VAE,
        ({**_TINY_TE, "num_hidden_layers": 23, "hidden_act": "gelu"},), ("!",), "v_prediction", resolution=64),
    "tiny-sdxl": FamilySpec(
        "sdxl", {**_SDXL_UNET, "block_out_channels": (16, 32, 64), "norm_num_groups": 8,
                 "attention_head_dim": (2, 4, 8),
                 "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 8},
        {**_TINY_VAE, "scaling_factor": 0.13025},
        ({**_TINY_TE, "num_hidden_layers": 12, "hidden_act": "quick_gelu"},
         {**_TINY_TE, "num_hidden_layers": 32, "hidden_act": "gelu"}), ("<|endoftext|>", "!"), resolution=64),
}
TINY_SEED = 20240601
