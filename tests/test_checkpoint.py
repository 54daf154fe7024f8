"""Single-file checkpoints, diffusers folders and VAE files -> SDComponents, checked by round trips of the tiny
models through the original (A1111) layout written by tests/ldm_convert.py."""

from __future__ import annotations

import functools
import hashlib
import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.backends.checkpoint import (
    is_v_prediction_sd2,
    load_diffusers_folder,
    load_single_file,
    load_vae_file,
)
from lora_trainer.backends.components import SDComponents, build_tiny
from lora_trainer.backends.sd_configs import TINY
from lora_trainer.errors import UserError

from .ldm_convert import to_ldm_state_dict

NAMES = list(TINY)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline, and any attempt to reach the network fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@functools.cache
def tiny(name: str) -> SDComponents:
    comps = build_tiny(name)
    for m in [comps.unet, comps.vae, *comps.text_encoders]:
        m.eval()
    return comps


def write(path, sd: dict) -> str:
    save_file(sd, str(path))
    return str(path)


def ldm_file(tmp_path, name: str, **edits) -> str:
    sd = to_ldm_state_dict(tiny(name))
    sd.update(edits)
    return write(tmp_path / f"{name}.safetensors", sd)


# -- comparisons -------------------------------------------------------------------------------------------------

@torch.no_grad()
def unet_out(unet, family: str) -> torch.Tensor:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    cond = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return unet(x, torch.tensor([500]), encoder_hidden_states=cond, **kwargs).sample


@torch.no_grad()
def vae_out(vae) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latent = vae.encode(img).latent_dist.mean
    return latent, vae.decode(latent).sample


@torch.no_grad()
def te_out(te, tokenizer) -> list[torch.Tensor]:
    ids = tokenizer(["a photo of a cat, best quality"], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    out = te(ids, output_hidden_states=True)
    extra = [out.text_embeds] if hasattr(out, "text_embeds") else []
    return [out.last_hidden_state, out.hidden_states[-2], *extra]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def assert_same_outputs(orig: SDComponents, loaded: SDComponents) -> None:
    assert torch.equal(unet_out(orig.unet, orig.family), unet_out(loaded.unet, loaded.family))
    for x, y in zip(vae_out(orig.vae), vae_out(loaded.vae), strict=True):
        assert torch.equal(x, y)
    for i, (te_a, te_b) in enumerate(zip(orig.text_encoders, loaded.text_encoders, strict=True)):
        for x, y in zip(te_out(te_a, orig.tokenizers[i]), te_out(te_b, loaded.tokenizers[i]), strict=True):
            assert torch.equal(x, y)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- single-file checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_single_file_round_trip(tmp_path, name):
    path = ldm_file(tmp_path, name)
    loaded = load_single_file(path, spec=TINY[name], prediction_type="epsilon" if name == "tiny-sd2" else None)
    orig = tiny(name)
    assert loaded.family == TINY[name].family
    assert loaded.prediction_type == "epsilon"
    assert (loaded.source, loaded.model_hash) == (path, sha256(path))
    assert loaded.scaling_factor == TINY[name].scaling_factor
    assert loaded.schedule == TINY[name].schedule
    assert len(loaded.tokenizers) == len(loaded.text_encoders) == len(TINY[name].text_encoders)
    assert loaded.vae_id
    pairs = [(orig.unet, loaded.unet), (orig.vae, loaded.vae)]
    pairs += zip(orig.text_encoders, loaded.text_encoders, strict=True)
    for a, b in pairs:
        assert_same_weights(a, b)
    assert_same_outputs(orig, loaded)


def test_ckpt_pickle_with_state_dict(tmp_path):
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": to_ldm_state_dict(tiny("tiny-sd1")), "global_step": 1234}, path)
    loaded = load_single_file(path, spec=TINY["tiny-sd1"])
    assert loaded.family == "sd1" and loaded.model_hash == sha256(path)
    assert_same_outputs(tiny("tiny-sd1"), loaded)


def test_pt_pickle_without_state_dict(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save(to_ldm_state_dict(tiny("tiny-sdxl")), path)
    assert_same_outputs(tiny("tiny-sdxl"), load_single_file(path, spec=TINY["tiny-sdxl"]))


def test_fp16_file_loads_exactly_as_float32(tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in to_ldm_state_dict(tiny("tiny-sd1")).items()}
    loaded = load_single_file(write(tmp_path / "half.safetensors", sd), spec=TINY["tiny-sd1"])
    for key, value in tiny("tiny-sd1").unet.state_dict().items():
        got = loaded.unet.state_dict()[key]
        assert got.dtype == torch.float32 and torch.equal(got, value.half().float())


def test_vae_id_follows_the_vae_not_the_file(tmp_path):
    sd = to_ldm_state_dict(tiny("tiny-sd1"))
    a = load_single_file(write(tmp_path / "a.safetensors", sd), spec=TINY["tiny-sd1"])
    b = load_single_file(ldm_file(tmp_path, "tiny-sd1", alphas_cumprod=torch.zeros(1000)), spec=TINY["tiny-sd1"])
    sd["first_stage_model.quant_conv.bias"] = sd["first_stage_model.quant_conv.bias"] + 1
    c = load_single_file(write(tmp_path / "c.safetensors", sd), spec=TINY["tiny-sd1"])
    assert a.model_hash != b.model_hash
    assert a.vae_id == b.vae_id != c.vae_id


@pytest.mark.parametrize("name", NAMES)
def test_family_is_detected_and_checked(tmp_path, name):
    path = ldm_file(tmp_path, name)
    family = TINY[name].family
    assert load_single_file(path, family=family, spec=TINY[name], prediction_type="epsilon").family == family
    other = "sd1" if family != "sd1" else "sdxl"
    with pytest.raises(UserError, match="model_family") as err:
        load_single_file(path, family=other, prediction_type="epsilon")
    assert path in str(err.value)


def test_sd1_text_encoder_without_text_model_level(tmp_path):
    """Old SD1 checkpoints (transformers < 4.19) have no `text_model.` level and a float position_ids."""
    sd = to_ldm_state_dict(tiny("tiny-sd1"))
    prefix = "cond_stage_model.transformer."
    sd = {k.replace(prefix + "text_model.", prefix): v for k, v in sd.items()}
    sd[prefix + "embeddings.position_ids"] = torch.rand(1, 77)  # a broken copy must not be used
    loaded = load_single_file(write(tmp_path / "old.safetensors", sd), spec=TINY["tiny-sd1"])
    assert_same_outputs(tiny("tiny-sd1"), loaded)


def test_linear_projections_stored_as_1x1_convolutions(tmp_path):
    """Some SD2 fine-tunes keep proj_in/proj_out as 1x1 convolutions; the weights are the same numbers."""
    sd = to_ldm_state_dict(tiny("tiny-sd2"))
    for key in [k for k in sd if k.endswith(("proj_in.weight", "proj_out.weight")) and sd[k].dim() == 2]:
        sd[key] = sd[key][:, :, None, None].contiguous()
    path = write(tmp_path / "conv.safetensors", sd)
    loaded = load_single_file(path, spec=TINY["tiny-sd2"], prediction_type="epsilon")
    assert_same_weights(tiny("tiny-sd2").unet, loaded.unet)


def test_unknown_unet_weights_are_reported(tmp_path):
    path = ldm_file(tmp_path, "tiny-sd1", **{"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="not part of the model") as err:
        load_single_file(path, spec=TINY["tiny-sd1"])
    assert path in str(err.value) and "input_blocks.1.2.weight" in str(err.value)


def test_full_size_spec_rejects_tiny_shapes(tmp_path):
    path = ldm_file(tmp_path, "tiny-sd1")
    with pytest.raises(UserError, match="do not fit a standard SD1.x model") as err:
        load_single_file(path)
    assert path in str(err.value) and "shape" in str(err.value)


def test_missing_vae_is_reported(tmp_path):
    sd = {k: v for k, v in to_ldm_state_dict(tiny("tiny-sd1")).items() if not k.startswith("first_stage_model.")}
    path = write(tmp_path / "novae.safetensors", sd)
    with pytest.raises(UserError, match="no VAE") as err:
        load_single_file(path, spec=TINY["tiny-sd1"])
    assert path in str(err.value)


class NotATensor:
    pass


def _lora(tmp_path):
    return write(tmp_path / "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4)})


def _empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return str(path)


def _random_bytes(suffix):
    def make(tmp_path):
        path = tmp_path / f"noise{suffix}"
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).tolist()))
        return str(path)
    return make


def _vae_only(tmp_path):
    sd = {k[len("first_stage_model."):]: v for k, v in to_ldm_state_dict(tiny("tiny-sd1")).items()
          if k.startswith("first_stage_model.")}
    return write(tmp_path / "vae.safetensors", sd)


def _inpainting(tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weight = to_ldm_state_dict(tiny("tiny-sd1"))[key]
    return ldm_file(tmp_path, "tiny-sd1", **{key: torch.cat([weight, weight, weight[:, :1]], dim=1)})


def _sd3(tmp_path):
    return write(tmp_path / "sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight":
                                                torch.zeros(8, 8)})


def _refiner(tmp_path):
    sd = {k: v for k, v in to_ldm_state_dict(tiny("tiny-sdxl")).items() if not k.startswith("conditioner.")}
    sd["conditioner.embedders.0.model.ln_final.weight"] = torch.ones(8)
    return write(tmp_path / "refiner.safetensors", sd)


def _unsafe_pickle(tmp_path):
    path = str(tmp_path / "unsafe.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": NotATensor()}, path)
    return path


def _not_a_dict(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([torch.zeros(1)], path)
    return path


@pytest.mark.parametrize("make, words", [
    (_lora, "LoRA"), (_empty, "empty"), (_random_bytes(".safetensors"), "corrupt"), (_random_bytes(".ckpt"), "corrupt"),
    (_vae_only, "VAE on its own"), (_inpainting, "inpainting"), (_sd3, "Stable Diffusion 3"), (_refiner, "refiner"),
    (_unsafe_pickle, "refused"), (_not_a_dict, "not a dictionary"),
])
def test_not_a_supported_checkpoint(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        load_single_file(path)
    assert path in str(err.value)
    assert words in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_single_file(str(tmp_path / "nope.safetensors"))


# -- SD2 v-prediction detection ------------------------------------------------------------------------------------

def test_v_prediction_detection_returns_a_bool():
    assert isinstance(is_v_prediction_sd2(tiny("tiny-sd2").unet), bool)


@pytest.mark.parametrize("bias, expected", [(-10.0, "v_prediction"), (10.0, "epsilon")])
def test_v_prediction_detection_reads_the_unet(tmp_path, bias, expected):
    """A UNet whose output is the constant `bias`: mean(out - x) = bias - 0.5, v-prediction below -1."""
    sd = to_ldm_state_dict(tiny("tiny-sd2"))
    sd["model.diffusion_model.out.2.weight"] = torch.zeros_like(sd["model.diffusion_model.out.2.weight"])
    sd["model.diffusion_model.out.2.bias"] = torch.full_like(sd["model.diffusion_model.out.2.bias"], bias)
    path = write(tmp_path / "sd2.safetensors", sd)
    assert load_single_file(path, spec=TINY["tiny-sd2"]).prediction_type == expected
    assert load_single_file(path, spec=TINY["tiny-sd2"], prediction_type="epsilon").prediction_type == "epsilon"


def test_sd1_and_sdxl_default_to_epsilon(tmp_path):
    for name in ("tiny-sd1", "tiny-sdxl"):
        assert load_single_file(ldm_file(tmp_path, name), spec=TINY[name]).prediction_type == "epsilon"


# -- diffusers folders ---------------------------------------------------------------------------------------------

def save_diffusers(comps: SDComponents, folder, prediction_type: str | None, tokenizers: bool) -> str:
    comps.unet.save_pretrained(str(folder / "unet"))
    comps.vae.save_pretrained(str(folder / "vae"))
    for i, te in enumerate(comps.text_encoders):
        te.save_pretrained(str(folder / ("text_encoder" if i == 0 else "text_encoder_2")))
        if tokenizers:
            comps.tokenizers[i].save_pretrained(str(folder / ("tokenizer" if i == 0 else "tokenizer_2")))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if prediction_type:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"prediction_type": prediction_type, "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear"}))
    return str(folder)


@pytest.mark.parametrize("name, prediction_type, tokenizers", [
    ("tiny-sd1", None, False), ("tiny-sd2", "v_prediction", True), ("tiny-sdxl", "epsilon", True)])
def test_diffusers_folder(tmp_path, name, prediction_type, tokenizers):
    orig = tiny(name)
    path = save_diffusers(orig, tmp_path, prediction_type, tokenizers)
    loaded = load_diffusers_folder(path)
    assert loaded.family == orig.family and loaded.source == path
    assert loaded.prediction_type == (prediction_type or "epsilon")
    assert loaded.scaling_factor == orig.scaling_factor and loaded.vae_id
    assert loaded.tokenizers[-1].pad_token == orig.tokenizers[-1].pad_token
    assert_same_outputs(orig, loaded)


def test_diffusers_folder_prediction_type_argument_wins(tmp_path):
    path = save_diffusers(tiny("tiny-sd1"), tmp_path, "epsilon", False)
    assert load_diffusers_folder(path, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_diffusers_folder_with_missing_weights(tmp_path):
    path = save_diffusers(tiny("tiny-sd1"), tmp_path, None, False)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd["conv_in.weight"]
    save_file(sd, str(weights))
    with pytest.raises(UserError, match="unet") as err:
        load_diffusers_folder(path)
    assert path in str(err.value)


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder") as err:
        load_diffusers_folder(str(tmp_path))
    assert str(tmp_path) in str(err.value)


# -- VAE files -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_vae_file(tmp_path, prefix):
    sd = {prefix + k[len("first_stage_model."):]: v for k, v in to_ldm_state_dict(tiny("tiny-sdxl")).items()
          if k.startswith("first_stage_model.")}
    sd["loss.logvar"] = torch.zeros(())  # training leftovers in some VAE files are ignored
    vae = load_vae_file(write(tmp_path / "vae.safetensors", sd), "sdxl", TINY["tiny-sdxl"])
    assert vae.config.scaling_factor == TINY["tiny-sdxl"].scaling_factor
    assert_same_weights(tiny("tiny-sdxl").vae, vae)
    for x, y in zip(vae_out(tiny("tiny-sdxl").vae), vae_out(vae), strict=True):
        assert torch.equal(x, y)


def test_vae_from_full_checkpoint_and_pickle(tmp_path):
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": to_ldm_state_dict(tiny("tiny-sd1"))}, path)
    assert_same_weights(tiny("tiny-sd1").vae, load_vae_file(path, "sd1", TINY["tiny-sd1"]))


def test_vae_folder(tmp_path):
    tiny("tiny-sd1").vae.save_pretrained(str(tmp_path / "vae"))
    assert_same_weights(tiny("tiny-sd1").vae, load_vae_file(str(tmp_path / "vae"), "sd1"))
    assert_same_weights(tiny("tiny-sd1").vae, load_vae_file(str(tmp_path), "sd1"))


def test_not_a_vae_file(tmp_path):
    path = _lora(tmp_path)
    with pytest.raises(UserError, match="not a VAE file") as err:
        load_vae_file(path, "sd1", TINY["tiny-sd1"])
    assert path in str(err.value) and "LoRA" in str(err.value)
