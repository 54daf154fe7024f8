"""LoRA and LoCon files load into diffusers pipelines with `load_lora_weights`, completely and with the same effect.

Needs diffusers' PEFT backend (peft, transformers > 4.33): skipped in the WebUI-pins environment, which has neither.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lora_trainer.networks.algorithms import NetworkSettings
from lora_trainer.networks.export import save_network
from lora_trainer.networks.network import LoraNetwork

from .conftest import tiny_bundle
from .test_networks import outputs, randomize

diffusers_utils = pytest.importorskip("diffusers.utils")
if not getattr(diffusers_utils, "USE_PEFT_BACKEND", False):
    pytest.skip("diffusers has no PEFT backend here (needs peft and transformers > 4.33)", allow_module_level=True)


def pipeline(bundle):
    import diffusers

    c = bundle.c
    sched = diffusers.EulerDiscreteScheduler(**c.schedule)
    if bundle.family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0],
                                                   text_encoder_2=c.text_encoders[1], tokenizer=c.tokenizers[0],
                                                   tokenizer_2=c.tokenizers[1], unet=c.unet, scheduler=sched)
    return diffusers.StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                             unet=c.unet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def count_peft_layers(module) -> int:
    return sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_file_loads_into_diffusers_with_the_same_effect(tmp_path, caplog, name, algo):
    bundle = tiny_bundle(name)
    base = copy.deepcopy(bundle.c)
    torch.manual_seed(1)
    net = LoraNetwork(algo, bundle.network_trees(), NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0))
    randomize(net)
    net.eval()
    before = outputs(bundle)
    net.apply_to()
    ours = outputs(bundle)
    net.remove()
    path = str(tmp_path / "net.safetensors")
    save_network(path, net.export_state_dict(), {"ss_network_module": "networks.lora"}, "float")

    bundle.c = base
    pipe = pipeline(bundle)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(path)
    problems = [r.getMessage() for r in caplog.records if any(w in r.getMessage().lower()
                                                              for w in ("unexpected", "missing", "not loaded"))]
    assert not problems, problems
    parts = {"unet": net.parameters_of("unet"), "te": net.parameters_of("te")}
    assert all(list(p) for p in parts.values())
    n_unet = sum(1 for t in net.targets if t.part == "unet")
    n_te = sum(1 for t in net.targets if t.part != "unet")
    assert count_peft_layers(pipe.unet) == n_unet
    assert sum(count_peft_layers(te) for te in bundle.c.text_encoders) == n_te
    theirs = outputs(bundle)
    for b, o, t in zip(before, ours, theirs):
        effect = float((o - b).abs().max())
        assert effect > 1e-3
        assert float((o - t).abs().max()) <= 1e-4 * max(1.0, effect)

