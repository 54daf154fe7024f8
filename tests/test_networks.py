"""Networks on the tiny models: key sets against kohya's, every algorithm against A1111's merge formulas."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.networks.algorithms import ALGORITHMS, NetworkSettings
from lora_trainer.networks.network import LoraNetwork

from .a1111_emulation import group_by_module, merge_into
from .conftest import FAMILY, kohya_keys, tiny_bundle

SETTINGS = NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, dylora_unit=2, lokr_factor=4)


def make_network(bundle, algo: str, settings: NetworkSettings = SETTINGS) -> LoraNetwork:
    torch.manual_seed(1)
    return LoraNetwork(algo, bundle.network_trees(), settings)


def randomize(net: LoraNetwork, std: float = 0.05) -> None:
    """Non-zero weights everywhere (LoRA up matrices start at zero, which would make any comparison vacuous)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def unet_inputs(bundle, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    unet = bundle.c.unet
    latents = torch.randn((batch, 4, 8, 8), generator=gen)
    t = torch.tensor([10, 700])[:batch]
    ctx = torch.randn((batch, 77, unet.config.cross_attention_dim), generator=gen)
    cond = {"context": ctx}
    if bundle.family == "sdxl":
        cond["text_embeds"] = torch.randn((batch, bundle.c.text_encoders[1].config.projection_dim), generator=gen)
        cond["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
    return latents, t, cond


def te_ids():
    return torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


@torch.no_grad()
def outputs(bundle):
    latents, t, cond = unet_inputs(bundle)
    u = bundle.predict(latents, t, cond)
    tes = [te(te_ids(), output_hidden_states=True).hidden_states[-2] for te in bundle.c.text_encoders]
    return [u, *tes]


def layers_by_key(net: LoraNetwork) -> dict[str, torch.nn.Module]:
    return {t.key: t.module for t in net.targets}


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_lora_and_locon_key_sets_are_kohyas(name):
    bundle = tiny_bundle(name)
    fixture = kohya_keys(FAMILY[name])
    expected_lora = {e["key"] for e in fixture if e["algo"] == "lora"}
    expected_locon = {e["key"] for e in fixture}
    lora = make_network(bundle, "lora").export_state_dict()
    locon = make_network(bundle, "locon").export_state_dict()
    assert {k.partition(".")[0] for k in lora} == expected_lora
    assert {k.partition(".")[0] for k in locon} == expected_locon
    for key in expected_locon:
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(locon)
        assert locon[f"{key}.alpha"].dim() == 0


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_each_key_wraps_a_layer_of_the_type_a1111_patches(name):
    bundle = tiny_bundle(name)
    layers = layers_by_key(make_network(bundle, "locon"))
    for e in kohya_keys(FAMILY[name]):
        if e["via"]:  # q/k/v/out of OpenCLIP's fused attention: A1111 maps those onto the MHA module
            continue
        layer = layers[e["key"]]
        assert type(layer).__name__ == e["cls"], e["key"]
        kxk = len(e["delta_shape"]) == 4 and e["delta_shape"][2] > 1
        assert (isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)) == kxk, e["key"]


SUFFIXES = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "dylora": {"lora_down.weight", "lora_up.weight", "alpha"},
}


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "dylora"])
def test_lycoris_algorithms_cover_the_locon_layers_with_their_suffixes(name, algo):
    bundle = tiny_bundle(name)
    expected = {e["key"] for e in kohya_keys(FAMILY[name])}
    sd = make_network(bundle, algo).export_state_dict()
    by_module = group_by_module(sd)
    assert set(by_module) == expected
    for key, tensors in by_module.items():
        if algo == "lokr":
            assert ("lokr_w1" in tensors) != ({"lokr_w1_a", "lokr_w1_b"} <= set(tensors)), key
            assert ("lokr_w2" in tensors) != ({"lokr_w2_a", "lokr_w2_b"} <= set(tensors)), key
            assert "alpha" in tensors
        else:
            assert set(tensors) == SUFFIXES[algo], key


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_ia3_targets(name):
    bundle = tiny_bundle(name)
    by_module = group_by_module(make_network(bundle, "ia3").export_state_dict())
    unet = [k for k in by_module if k.startswith("lora_unet")]
    assert unet and all(k.endswith(("attn1_to_k", "attn1_to_v", "attn2_to_k", "attn2_to_v", "ff_net_2"))
                        for k in unet)
    for key, tensors in by_module.items():
        assert set(tensors) == {"weight", "on_input"}
        assert int(tensors["on_input"]) == int(key.endswith(("ff_net_2", "mlp_fc2")))
    te = [k for k in by_module if k.startswith("lora_te")]
    fused = {"tiny-sd2": "lora_te_", "tiny-sdxl": "lora_te2_"}.get(name)
    for k in te:  # A1111 applies attention deltas to a fused MultiheadAttention only as a complete q/k/v/out set
        if fused and k.startswith(fused):
            assert k.endswith("mlp_fc2"), k
    assert any(k.endswith("self_attn_k_proj") for k in te) == (name != "tiny-sd2")


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_a1111_merge_of_the_file_reproduces_the_trained_network(name, algo):
    """What the network computes while training is what A1111 computes from the saved file."""
    bundle = tiny_bundle(name)
    base = copy.deepcopy(bundle.c)
    net = make_network(bundle, algo)
    randomize(net, std=0.2 if algo == "loha" else 0.05)  # LoHa multiplies two rank products: larger factors
    net.eval()  # DyLoRA at full rank, no dropout: the file's content
    base_out = outputs(bundle)
    net.apply_to()
    live = outputs(bundle)
    net.remove()
    tensors = net.export_state_dict()
    bundle.c = base  # a fresh copy of the base model, merged as A1111 merges
    merged_net = make_network(bundle, algo)
    assert merge_into(layers_by_key(merged_net), tensors) == []
    merged = outputs(bundle)
    for b, lv, mg in zip(base_out, live, merged):
        effect = (lv - b).abs().max()
        assert effect > 1e-3, "the network should visibly change the output"
        assert (lv - mg).abs().max() <= 1e-4 * max(1.0, float(effect)), algo


def test_remove_restores_every_layer_exactly():
    bundle = tiny_bundle("tiny-sd1")
    before = outputs(bundle)
    net = make_network(bundle, "locon")
    randomize(net)
    layers = [t.module for t in net.targets]
    assert not any("forward" in m.__dict__ for m in layers)
    net.apply_to()
    assert all("forward" in m.__dict__ for m in layers)
    assert not torch.equal(outputs(bundle)[0], before[0])
    net.remove()
    assert not any("forward" in m.__dict__ for m in layers)
    assert all(torch.equal(a, b) for a, b in zip(outputs(bundle), before))


def test_instance_forward_set_by_someone_else_is_restored():
    bundle = tiny_bundle("tiny-sd1")
    net = make_network(bundle, "lora")
    layer = net.targets[0].module
    sentinel = layer.forward  # e.g. hypertile's wrapper in the WebUI
    layer.forward = sentinel
    net.apply_to()
    assert layer.forward is not sentinel
    net.remove()
    assert layer.__dict__["forward"] is sentinel


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_export_then_network_weights_roundtrip(algo):
    bundle = tiny_bundle("tiny-sd1")
    net = make_network(bundle, algo)
    randomize(net)
    sd = net.export_state_dict()
    fresh = make_network(bundle, algo)
    fresh.load_exported(sd, "test.safetensors")
    again = fresh.export_state_dict()
    assert set(sd) == set(again)
    assert all(torch.allclose(sd[k].float(), again[k].float()) for k in sd)


def test_network_weights_of_another_rank_is_a_clear_error():
    bundle = tiny_bundle("tiny-sd1")
    sd = make_network(bundle, "lora", NetworkSettings(dim=8, alpha=4.0)).export_state_dict()
    with pytest.raises(UserError, match="network_dim"):
        make_network(bundle, "lora").load_exported(sd, "other.safetensors")


def test_network_weights_of_another_algorithm_is_a_clear_error():
    bundle = tiny_bundle("tiny-sd1")
    sd = make_network(bundle, "locon").export_state_dict()
    with pytest.raises(UserError, match="another algorithm"):
        make_network(bundle, "lora").load_exported(sd, "locon.safetensors")


def test_dylora_trains_each_truncated_rank_at_the_loaders_scale(monkeypatch):
    """DyLoRA picks a rank block per forward; whatever it picks, the scale is alpha/dim, as in A1111's `dyn`."""
    bundle = tiny_bundle("tiny-sd1")
    settings = NetworkSettings(dim=4, alpha=2.0, dylora_unit=1)
    net = make_network(bundle, "dylora", settings)
    randomize(net)
    t = next(t for t in net.targets if isinstance(t.module, torch.nn.Linear))
    m = net.modules_by_key[t.key]
    x = torch.randn(3, t.module.in_features)
    full = net.export_state_dict()
    up, down = full[f"{t.key}.lora_up.weight"], full[f"{t.key}.lora_down.weight"]
    from lora_trainer.networks.algorithms import delta_dylora

    for b in range(4):
        monkeypatch.setattr(torch, "randint", lambda *a, b=b, **k: torch.tensor([b]))
        m.train()
        y, factor = delta_dylora(m, t.module, x)
        got = y * factor
        r = b + 1
        expected = x @ (up[:, :r] @ down[:r]).T * (2.0 / 4)
        assert torch.allclose(got, expected, atol=1e-6)


def test_only_network_parameters_receive_gradients():
    bundle = tiny_bundle("tiny-sd1")
    for part in [bundle.c.unet, *bundle.c.text_encoders]:
        part.requires_grad_(False)
    net = make_network(bundle, "locon")
    randomize(net)
    net.apply_to()
    latents, t, cond = unet_inputs(bundle)
    bundle.predict(latents, t, cond).pow(2).mean().backward()
    net.remove()
    unet_params = list(net.parameters_of("unet"))
    assert unet_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet_params)
    assert all(p.grad is None for p in net.parameters_of("te"))  # the text encoders were not run
    assert all(p.grad is None for p in bundle.c.unet.parameters())
