"""The tiny A1111 `shared.sd_model` stand-ins (tests/webui_double/models.py) against the real module maps."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

from tests.webui_double import models

from .conftest import fixture_path

FAMILIES = ("sd1", "sd2", "sdxl")
BUILD = {"sd1": models.build_sd1, "sd2": models.build_sd2, "sdxl": models.build_sdxl}
PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
LONG_PROMPT = " ".join(["cat"] * 100)  # 100 tokens: two chunks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the tokenizer files go where conftest puts them
        mp.setenv("LORA_TRAINER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return {family: BUILD[family]() for family in FAMILIES}


def fixture_entries(family: str) -> list[dict]:
    with open(fixture_path(f"a1111-v1.10.1-{family}-modules.json"), encoding="utf-8") as f:
        return json.load(f)


def weight_shape(module: torch.nn.Module) -> list[int] | None:
    """The shape the fixtures list: `.weight`, or `in_proj_weight` for MultiheadAttention."""
    mha = isinstance(module, torch.nn.MultiheadAttention)
    weight = module.in_proj_weight if mha else getattr(module, "weight", None)
    return None if weight is None else list(weight.shape)


def cond_for(model, texts):
    return model.get_learned_conditioning(texts)


def crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


@pytest.mark.parametrize("family", FAMILIES)
def test_network_layer_names_match_a1111(built, family):
    model, entries = built[family], fixture_entries(family)
    mapping = models.assign_network_names(model)
    assert model.network_layer_mapping is mapping
    with_weight = {name for name, module in mapping.items() if weight_shape(module) is not None}
    assert with_weight == {e["name"] for e in entries if e["shape"] is not None}
    assert set(mapping) == {e["name"] for e in entries}
    assert [n for n in mapping if n] == [e["name"] for e in entries if e["name"]]  # A1111's iteration order
    for e in entries:
        module = mapping[e["name"]]
        assert type(module).__name__ == e["cls"], e["name"]
        assert isinstance(module, PATCHED) == e["patched"], e["name"]
        assert model.get_submodule(e["path"]) is module, e["path"]
        assert module.network_layer_name == e["name"] or e["name"] == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_kinds_match_a1111(built, family):
    """Tiny widths, but the same kind of weight: Linear vs 1x1 / 3x3 conv, the same rank everywhere."""
    mapping = models.assign_network_names(built[family])
    for e in fixture_entries(family):
        if e["shape"] is None:
            continue
        shape = weight_shape(mapping[e["name"]])
        assert len(shape) == len(e["shape"]), e["name"]
        assert shape[2:] == e["shape"][2:], e["name"]


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_forward_is_fast(built, family):
    model = built[family]
    cond = cond_for(model, ["a photo of a cat"])
    with torch.no_grad():
        model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([999]), cond)  # warm-up
        start = time.perf_counter()
        out = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond)
    assert out.shape == (1, 4, 8, 8)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_forward_and_backward(built, family):
    """Every UNet parameter gets a gradient (16x16: at 8x8 the SD1/SD2 middle block sees one token, where
    self-attention's q/k get none, as in the real model)."""
    model = built[family]
    cond = cond_for(model, ["a photo of a cat", "a dog"])
    x = torch.randn(2, 4, 16, 16)
    out = model.apply_model(x, torch.tensor([500, 20]), cond)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    unet = model.model.diffusion_model
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.any()]
    unet.zero_grad(set_to_none=True)
    assert missing == []


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_conditioning_shapes(built, family):
    model = built[family]
    assert model.get_learned_conditioning(["a cat", "a dog"]).shape == (2, 77, models.TEXT_WIDTH)
    assert model.cond_stage_model([LONG_PROMPT]).shape == (1, 154, models.TEXT_WIDTH)
    mixed = model.cond_stage_model(["a cat", LONG_PROMPT])
    assert mixed.shape == (2, 154, models.TEXT_WIDTH)
    assert torch.allclose(mixed[:1, :77], model.cond_stage_model(["a cat"]), atol=1e-5)


def test_sdxl_conditioning_shapes(built):
    model = built["sdxl"]
    vector = models.TEXT_WIDTH + 3 * 2 * models.SIZE_EMBED_DIM
    cond = model.get_learned_conditioning(["a cat", "a dog"])
    assert cond["crossattn"].shape == (2, 77, 2 * models.TEXT_WIDTH)
    assert cond["vector"].shape == (2, vector)
    long = model.get_learned_conditioning([LONG_PROMPT])
    assert long["crossattn"].shape == (1, 154, 2 * models.TEXT_WIDTH)
    z, pooled = model.conditioner.embedders[1]([LONG_PROMPT])
    assert z.shape == (1, 154, models.TEXT_WIDTH) and pooled.shape == (1, models.TEXT_WIDTH)
    assert model.conditioner.embedders[0]([LONG_PROMPT]).shape == (1, 154, models.TEXT_WIDTH)


def test_sdxl_size_conditioning(built):
    """Per-sample sizes through `conditioner(dict)`; the size part of `vector` is (height, width) order."""
    model = built["sdxl"]
    sizes = torch.tensor([[512.0, 768.0], [1024.0, 1024.0]])
    batch = {"txt": ["a", "a"], "original_size_as_tuple": sizes, "crop_coords_top_left": torch.zeros(2, 2),
             "target_size_as_tuple": sizes}
    vector = model.conditioner(batch)["vector"]
    n = 2 * models.SIZE_EMBED_DIM
    size_part = vector[:, models.TEXT_WIDTH:models.TEXT_WIDTH + n]
    assert torch.equal(size_part, model.conditioner.embedders[2](sizes))
    assert torch.equal(vector[0, :models.TEXT_WIDTH], vector[1, :models.TEXT_WIDTH])
    assert not torch.equal(size_part[0], size_part[1])


def test_sdxl_learned_conditioning_reads_the_batch(built):
    """`sd_models_xl.get_learned_conditioning`: width/height from an SdConditioning, empty negative -> zeros."""

    class SdConditioning(list):
        width, height, is_negative_prompt = 512, 768, True

    model = built["sdxl"]
    cond = model.get_learned_conditioning(SdConditioning([""]))
    n = 2 * models.SIZE_EMBED_DIM
    assert not cond["crossattn"].any() and not cond["vector"][:, :models.TEXT_WIDTH].any()
    size = model.conditioner.embedders[2](torch.tensor([[768.0, 512.0]]))
    assert torch.equal(cond["vector"][:, models.TEXT_WIDTH:models.TEXT_WIDTH + n], size)
    assert cond["crossattn"].dtype == torch.float32


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(built):
    te = built["sd1"].cond_stage_model
    cat, comma, dog = (te.tokenize([w])[0][0] for w in ("cat", ",", "dog"))
    chunks, count = te.tokenize_line(" ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10))
    assert [c.tokens[1:72] for c in chunks[:1]] == [[cat] * 70 + [comma]]
    assert chunks[0].tokens[72:] == [te.id_end] * 5
    assert chunks[1].tokens[1:12] == [dog] * 10 + [te.id_end] and count == 85


def test_opts_can_be_rebound_to_a_partial_object(built, monkeypatch):
    te = built["sd1"].cond_stage_model
    monkeypatch.setattr(models.opts, "CLIP_stop_at_last_layers", 2)
    expected = te(["a cat"])
    monkeypatch.setattr(models, "opts", types.SimpleNamespace(CLIP_stop_at_last_layers=2))
    assert torch.equal(te(["a cat"]), expected)


def test_sdxl_text_gradients_follow_is_trainable(built):
    """sgm runs an embedder under no_grad unless `is_trainable` (the A1111 wrappers copy False)."""
    model = built["sdxl"]
    te = [model.conditioner.embedders[0], model.conditioner.embedders[1]]
    params = [p for e in te for p in e.parameters()]
    assert not any(p.requires_grad for p in params)
    try:
        for p in params:
            p.requires_grad_(True)
        assert not model.get_learned_conditioning(["a cat"])["crossattn"].requires_grad
        for e in te:
            e.is_trainable = True
        cond = model.get_learned_conditioning(["a cat"])
        (cond["crossattn"].sum() + cond["vector"].sum()).backward()
        attn = te[1].wrapped.model.transformer.resblocks[0].attn
        assert attn.in_proj_weight.grad is not None and attn.in_proj_weight.grad.any()
        q_proj = te[0].wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
        assert q_proj.weight.grad is not None and q_proj.weight.grad.any()
    finally:
        for e in te:
            e.is_trainable = False
        for p in params:
            p.requires_grad_(False)
            p.grad = None


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_text_encoder_backward(built, family):
    model = built[family]
    params = list(model.cond_stage_model.parameters())
    try:
        for p in params:
            p.requires_grad_(True)
        model.cond_stage_model(["a photo of a cat"]).sum().backward()
        assert sum(p.grad is not None and bool(p.grad.any()) for p in params) > len(params) // 2
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_sd1_clip_skip(built, monkeypatch):
    te = built["sd1"].cond_stage_model
    default = te(["a photo of a cat"])
    monkeypatch.setattr(models.opts, "CLIP_stop_at_last_layers", 2)
    skipped = te(["a photo of a cat"])
    tokens = torch.asarray([te.tokenize_line("a photo of a cat")[0][0].tokens])
    hidden = te.wrapped.transformer(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(skipped, te.wrapped.transformer.text_model.final_layer_norm(hidden[-2]), atol=1e-5)
    assert not torch.allclose(default, skipped)


def test_sdxl_clip_l_is_hidden_layer_11_without_final_norm(built):
    wrapper = built["sdxl"].conditioner.embedders[0]
    assert (wrapper.wrapped.layer, wrapper.wrapped.layer_idx) == ("hidden", 11)
    tokens = torch.asarray([wrapper.tokenize_line("a cat")[0][0].tokens])
    hidden = wrapper.wrapped.transformer(input_ids=tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == 13
    assert torch.allclose(wrapper(["a cat"]), hidden[11], atol=1e-5)


def test_prompt_parsing_and_escapes():
    parse = models.parse_prompt_attention
    assert parse("normal text") == [["normal text", 1.0]]
    assert parse("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse("(unbalanced") == [["unbalanced", 1.1]]
    assert parse("\\(literal\\]") == [["(literal]", 1.0]]
    assert parse("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]
    assert parse("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse("") == [["", 1.0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_escaped_parentheses_are_literal_text(built, family, monkeypatch):
    model = built[family]
    te = model.conditioner.embedders[0] if family == "sdxl" else model.cond_stage_model
    literal, _ = te.tokenize_line("a \\(cat\\)")
    weighted, _ = te.tokenize_line("a (cat)")
    assert set(literal[0].multipliers) == {1.0}
    assert 1.1 in weighted[0].multipliers
    assert len(literal[0].tokens) == 77 and literal[0].tokens[0] == te.id_start
    monkeypatch.setattr(models.opts, "emphasis", "None")
    assert te.tokenize_line("a (cat)")[0][0].tokens == literal[0].tokens


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_openclip_pads_with_bang_after_the_first_end_token(built, family):
    model = built[family]
    te = model.conditioner.embedders[1] if family == "sdxl" else model.cond_stage_model
    assert (te.id_start, te.id_end, te.id_pad) == (49406, 49407, 0)
    tokens = te.tokenize_line("a cat")[0][0].tokens
    assert tokens[:4] == [49406, *te.tokenize(["a cat"])[0], 49407] and tokens[-1] == 49407


@pytest.mark.parametrize("family", FAMILIES)
def test_first_stage_round_trip(built, family):
    model = built[family]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    encoded = model.encode_first_stage(x)
    if family == "sdxl":
        assert isinstance(encoded, torch.Tensor) and model.get_first_stage_encoding(encoded) is encoded
    else:  # a DiagonalGaussianDistribution; get_first_stage_encoding = scale_factor * sample()
        assert encoded.mode().shape == (1, 4, 8, 8)
        torch.manual_seed(1)
        sampled = model.get_first_stage_encoding(encoded)
        torch.manual_seed(1)
        noise = torch.randn(encoded.mean.shape)
        assert torch.allclose(sampled, model.scale_factor * (encoded.mean + encoded.std * noise))
    z = model.get_first_stage_encoding(encoded)
    assert z.shape == (1, 4, 8, 8) and not z.requires_grad
    assert model.decode_first_stage(z).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_host_attributes(built, family):
    model = built[family]
    sdxl = family == "sdxl"
    assert type(model).__name__ == ("DiffusionEngine" if sdxl else "LatentDiffusion")
    assert type(model.model).__name__ == ("OpenAIWrapper" if sdxl else "DiffusionWrapper")
    assert (model.is_sd1, model.is_sd2, model.is_sdxl) == (family == "sd1", family == "sd2", sdxl)
    assert hasattr(getattr(model.cond_stage_model, "wrapped", None), "model") == (family == "sd2")  # SD2 rule
    assert model.parameterization == ("v" if family == "sd2" else "eps")
    assert model.scale_factor == (0.13025 if sdxl else 0.18215)
    assert model.lowvram is False and model.latent_channels == 4 and model.model.conditioning_key == "crossattn"
    ac = model.alphas_cumprod_original
    assert ac is model.alphas_cumprod and ac.dtype == torch.float32 and ac.shape == (1000,)
    expected = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    assert torch.allclose(ac.double(), expected)
    info = model.sd_checkpoint_info
    assert model.sd_model_hash == info.shorthash == info.sha256[:10] and info.title == f"{info.name} [{info.shorthash}]"
    assert {info.name_for_extra, info.model_name} == {f"tiny-{family}"} and info.filename == model.sd_model_checkpoint
    assert all(p.requires_grad for p in model.model.parameters())
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    assert model.cond_stage_model_empty_prompt.shape == (1, 77, (2 if sdxl else 1) * models.TEXT_WIDTH)


def test_sdxl_host_attributes(built):
    model = built["sdxl"]
    conditioner = model.conditioner
    assert model.cond_stage_model is conditioner and type(conditioner.wrapped) is torch.nn.Module
    names = [type(e).__name__ for e in conditioner.embedders]
    assert names == ["FrozenCLIPEmbedderForSDXLWithCustomWords", "FrozenOpenCLIPEmbedder2WithCustomWords",
                     *["ConcatTimestepEmbedderND"] * 3]
    assert [e.input_key for e in conditioner.embedders] == [
        "txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
    assert not any(e.is_trainable for e in conditioner.embedders)
    assert len(conditioner.embedders[1].wrapped.model.transformer.resblocks) == 32
    unet = model.model.diffusion_model
    assert [len(b[1].transformer_blocks) for b in unet.input_blocks if len(b) > 1] == [2, 2, 10, 10]
    assert len(unet.middle_block[1].transformer_blocks) == 10


def test_sd_text_encoder_layouts(built):
    sd1, sd2 = built["sd1"].cond_stage_model, built["sd2"].cond_stage_model
    assert type(sd1.wrapped).__name__ == "FrozenCLIPEmbedder" and sd1.tokenizer is sd1.wrapped.tokenizer
    assert len(sd1.wrapped.transformer.text_model.encoder.layers) == 12
    assert type(sd2.wrapped).__name__ == "FrozenOpenCLIPEmbedder" and sd2.wrapped.layer == "penultimate"
    clip = sd2.wrapped.model
    assert len(clip.transformer.resblocks) == 24 and clip.attn_mask.shape == (77, 77)
    assert clip.positional_embedding.shape == (77, models.TEXT_WIDTH) and clip.text_projection.dim() == 2
    assert not clip.transformer.resblocks[0].attn.batch_first


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic(built, family):
    again, other = BUILD[family](seed=0), BUILD[family](seed=1)
    reference, same, different = (m.state_dict() for m in (built[family], again, other))
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(v, same[k]) for k, v in reference.items())
    assert not all(torch.equal(v, different[k]) for k, v in reference.items())
    assert again.sd_model_hash == built[family].sd_model_hash != other.sd_model_hash
