"""The standalone backend: prompt encoding (chunks, clip skip, SDXL size conditioning), latent cache, samples."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from lora_trainer.model import SamplePrompt, SizeInfo, TrainingSetup
from lora_trainer.synthetic import make_dataset
from lora_trainer.train import train

from .conftest import base_config, tiny_bundle

LONG = ", ".join(f"tag{i}" for i in range(60))  # about 120 tokens


def prepared(name="tiny-sd1", **kw):
    bundle = tiny_bundle(name)
    setup = dict(device=torch.device("cpu"), weight_dtype=torch.float32, train_unet=True, train_text_encoder=True,
                 gradient_checkpointing=False, attention="sdpa", clip_skip=None, max_token_length=75)
    setup.update(kw)
    bundle.prepare(TrainingSetup(**setup))
    return bundle


def size(h=64, w=64):
    return SizeInfo((h, w), (0, 0), (h, w))


@torch.no_grad()
def test_long_captions_use_more_chunks_only_when_allowed():
    short = prepared(max_token_length=75).encode_prompts([LONG], [size()])["context"]
    long = prepared(max_token_length=150).encode_prompts([LONG, "a"], [size(), size()])["context"]
    assert short.shape[1] == 77 and long.shape[1] == 154
    # the first chunk is the same 77-token encoding either way
    assert torch.allclose(long[0, :77], short[0], atol=1e-5)


@torch.no_grad()
def test_clip_skip_uses_an_earlier_layer_through_the_final_norm():
    b1 = prepared(clip_skip=1)
    b2 = prepared(clip_skip=2)
    c1 = b1.encode_prompts(["a red circle"], [size()])["context"]
    c2 = b2.encode_prompts(["a red circle"], [size()])["context"]
    assert not torch.allclose(c1, c2)
    te = b2.c.text_encoders[0]
    ids = b2._chunk_ids(0, ["a red circle"]).reshape(1, 77)
    hidden = te(ids, output_hidden_states=True).hidden_states[-2]
    final_norm = getattr(te, "text_model", te).final_layer_norm
    assert torch.allclose(c2, final_norm(hidden), atol=1e-6)


@torch.no_grad()
def test_sdxl_conditioning_has_both_encoders_pooled_and_size_ids():
    b = prepared("tiny-sdxl")
    cond = b.encode_prompts(["a", "b"], [SizeInfo((96, 64), (4, 8), (64, 64)), size()])
    assert cond["context"].shape == (2, 77, 64)  # 32 (CLIP-L) + 32 (bigG) in the tiny model
    assert cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"][0].tolist() == [96, 64, 4, 8, 64, 64]


def test_samples_are_images_of_the_requested_size_and_reproducible():
    b = prepared()
    prompts = [SamplePrompt("a red circle", "blurry", 64, 128, seed=3, steps=3, cfg_scale=5.0),
               SamplePrompt("x", width=64, height=64, seed=4, steps=2, sampler="ddim")]
    imgs = b.sample(prompts)
    assert [i.size for i in imgs] == [(64, 128), (64, 64)] and all(isinstance(i, Image.Image) for i in imgs)
    again = b.sample(prompts[:1])[0]
    assert list(again.getdata()) == list(imgs[0].getdata())


def test_restore_puts_flags_devices_and_dtypes_back():
    b = tiny_bundle("tiny-sd1")
    b.c.unet.requires_grad_(True)
    flags = [p.requires_grad for p in b.c.unet.parameters()]
    b.prepare(TrainingSetup(torch.device("cpu"), torch.bfloat16, True, True, True, "vanilla", None, 75))
    assert not any(p.requires_grad for p in b.c.unet.parameters())
    assert next(b.c.unet.parameters()).dtype == torch.bfloat16
    b.restore()
    assert [p.requires_grad for p in b.c.unet.parameters()] == flags
    assert next(b.c.unet.parameters()).dtype == torch.float32
    assert not b.c.unet.is_gradient_checkpointing


def test_disk_latent_cache_is_reused_and_invalidated_by_a_changed_image(tmp_path, caplog):
    data = make_dataset(str(tmp_path / "d"), images=3, repeats=1, size=64, aspect_variety=False)
    cfg = base_config(data, str(tmp_path / "o"), cache_latents_to_disk=True, flip_aug=True, overwrite=True)
    caplog.set_level("INFO")
    train(cfg, tiny_bundle())
    assert "latents: 6 encoded, 0 reused" in caplog.text  # 3 images, plain and flipped
    caplog.clear()
    train(cfg, tiny_bundle())
    assert "latents: 0 encoded, 6 reused" in caplog.text
    img_path = os.path.join(data, "1_shapetok", "000.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(img_path)
    caplog.clear()
    train(cfg, tiny_bundle())
    assert "latents: 2 encoded, 4 reused" in caplog.text  # only the edited image, both flips
    caplog.clear()
    train(cfg.replace(resolution="128", max_bucket_reso=256), tiny_bundle())
    assert "latents: 6 encoded, 0 reused" in caplog.text  # a new bucket size never reuses old latents


def test_uncached_training_with_crop_and_colour_augmentation(tmp_path, dataset_dir):
    cfg = base_config(dataset_dir, str(tmp_path), cache_latents=False, random_crop=True, color_aug=True,
                      flip_aug=True)
    result = train(cfg, tiny_bundle())
    assert result.steps == 2 and os.path.isfile(result.final_file)


@pytest.mark.parametrize("bad", ["tiny-sd3", ""])
def test_unknown_model_names(bad):
    from lora_trainer.backends.diffusers_backend import load_components
    from lora_trainer.errors import UserError

    with pytest.raises(UserError, match="tiny-sd1"):
        load_components(bad)
