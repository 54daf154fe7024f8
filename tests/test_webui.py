"""The WebUI side on the host double: keys, the A1111 merge, a run through the API, and the host's integrity."""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch

from lora_trainer.networks.algorithms import NetworkSettings
from lora_trainer.networks.network import LoraNetwork
from lora_trainer.synthetic import make_dataset

from .a1111_emulation import merge_into_targets
from .conftest import kohya_keys
from .webui_double.host import recording_state, skip_unless_webui_gradio, webui

pytest.importorskip("tests.webui_double.models")


def bundle_for(host):
    from lora_trainer.webui.bundle import WebUIBundle

    return WebUIBundle(host.model)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_keys_on_the_webui_model_are_kohyas(tmp_path, family):
    with webui(family, str(tmp_path)) as host:
        trees = bundle_for(host).network_trees()
        fixture = kohya_keys(family)
        lora = {t.key for t in LoraNetwork("lora", trees, NetworkSettings(dim=2, alpha=1.0)).targets}
        locon = {t.key for t in LoraNetwork("locon", trees, NetworkSettings(dim=2, alpha=1.0)).targets}
        assert lora == {e["key"] for e in fixture if e["algo"] == "lora"}
        assert locon == {e["key"] for e in fixture}


def _randomize(net, std=0.05):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def _outputs(model, family):
    g = torch.Generator().manual_seed(2)
    x = torch.randn((1, 4, 8, 8), generator=g)
    t = torch.tensor([500])
    prompts = ["a red circle, blue background"]
    if family == "sdxl":
        c = model.get_learned_conditioning(prompts)
        return [model.apply_model(x, t, dict(c)), c["crossattn"], c["vector"]]
    c = model.get_learned_conditioning(prompts)
    return [model.apply_model(x, t, c), c]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("algo", ["lora", "locon", "loha", "lokr", "dylora"])
def test_a1111_merge_of_the_file_reproduces_training_on_the_webui_model(tmp_path, family, algo):
    """Including the OpenCLIP text encoders, whose q/k/v/out deltas go into the fused attention weights."""
    from lora_trainer.webui.bundle import WebUIBundle

    settings = NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, dylora_unit=2, lokr_factor=4)
    with webui(family, str(tmp_path)) as host:
        model = host.model
        pristine = copy.deepcopy(model)
        net = LoraNetwork(algo, WebUIBundle(model).network_trees(), settings)
        _randomize(net, 0.2 if algo == "loha" else 0.05)
        net.eval()
        before = _outputs(model, family)
        net.apply_to()
        live = _outputs(model, family)
        net.remove()
        tensors = net.export_state_dict()
        merged_net = LoraNetwork(algo, WebUIBundle(pristine).network_trees(), settings)
        assert merge_into_targets(merged_net.targets, tensors) == []
        merged = _outputs(pristine, family)
    for b0, lv, mg in zip(before, live, merged):
        effect = float((lv - b0).abs().max())
        assert effect > 1e-4
        assert float((lv - mg).abs().max()) <= 1e-4 * max(1.0, effect), (family, algo)


# ------------------------------------------------------------------------------------------------------------
# runs through the job manager and the HTTP API


def _wait(job, timeout=600):
    job.thread.join(timeout)
    assert not job.thread.is_alive(), "the training thread did not finish"
    return job.status


def _txt2img(host, prompt="a red circle", seed=7):
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=host.model, prompt=prompt, negative_prompt="",
                                                    seed=seed, steps=3, cfg_scale=5.0, width=64, height=64)
    return processing.process_images(p).images[0]


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n for n, m in model.named_modules() if "forward" in m.__dict__})


def _assert_same(a, b):
    params_a, bufs_a, grads_a, modes_a, fwd_a = a
    params_b, bufs_b, grads_b, modes_b, fwd_b = b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a), "a parameter changed"
    assert all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a), "a buffer changed"
    assert grads_a == grads_b and modes_a == modes_b and fwd_a == fwd_b


def _config(tmp_path, **kw):
    from lora_trainer.config import TrainConfig

    data = make_dataset(str(tmp_path / "data"), images=4, repeats=1, size=64, aspect_variety=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapetok, red circle --w 64 --h 64 --d 3 --s 3 --l 5\n")
    values = dict(train_data_dir=data, output_dir="", output_name="webui_lora", resolution="64",
                  min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=4.0, learning_rate=1e-3,
                  train_batch_size=2, max_train_steps=4, seed=11, sample_prompts=str(prompts),
                  sample_every_n_steps=2, save_precision="float")
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_run_saves_into_the_lora_folder_and_leaves_the_model_exactly_as_it_was(tmp_path, family):
    from lora_trainer.webui.job import MANAGER

    with webui(family, str(tmp_path)) as host:
        host.shared.state.begin()
        host.shared.state.end()
        image_before = _txt2img(host)
        snap = _snapshot(host.model)
        job = MANAGER.start(_config(tmp_path, network_module="locon"))
        status = _wait(job)
        assert status.state == "finished", status.error
        assert status.final_file == os.path.join(host.lora_dir, "webui_lora.safetensors")
        assert "webui_lora" in host.networks.available_networks  # the Lora list was refreshed
        assert status.samples and all(os.path.isfile(p) for p in status.samples)
        assert status.check["ok"] and status.preview_diff < 0.01, status.check
        from PIL import Image

        assert "Steps: 3" in Image.open(status.samples[0]).info["parameters"]  # saved with the WebUI's infotext
        _assert_same(snap, _snapshot(host.model))
        image_after = _txt2img(host)
        assert list(image_after.getdata()) == list(image_before.getdata())
        assert list(_txt2img(host, "a red circle <lora:webui_lora:1>").getdata()) != list(image_before.getdata())


def test_the_progress_bar_only_moves_forward_and_is_full_only_after_the_check(tmp_path):
    from lora_trainer.webui.job import MANAGER

    seen = []

    def progress(state, name, value):
        if name in ("job_no", "job_count") and state.job_count > 0 and MANAGER.job is not None:
            seen.append((min(state.job_no / state.job_count, 1.0), MANAGER.job.status.phase))

    with webui("sd1", str(tmp_path)) as host, recording_state(host, progress):
        # 4 steps, previews at steps 2 and 4 and a final one, then the two renders of the check
        status = _wait(MANAGER.start(_config(tmp_path, sample_every_n_steps=2)))
    assert status.state == "finished" and status.check["ok"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions), seen
    first_check = next(i for i, (_, phase) in enumerate(seen) if phase == "checking")
    assert max(fractions[:first_check]) < 1.0 and fractions[-1] == 1.0, seen


def test_cancel_and_an_injected_failure_restore_the_model(tmp_path):
    from lora_trainer.webui.job import MANAGER

    with webui("sd1", str(tmp_path)) as host:
        snap = _snapshot(host.model)
        image_before = _txt2img(host)
        job = MANAGER.start(_config(tmp_path, max_train_steps=200, sample_every_n_steps=None))
        deadline = time.time() + 120
        while job.status.step < 2 and time.time() < deadline and job.thread.is_alive():
            time.sleep(0.05)
        host.shared.state.interrupt()  # the WebUI's Interrupt button
        status = _wait(job)
        assert status.state == "cancelled" and status.final_file and 2 <= status.step < 200
        _assert_same(snap, _snapshot(host.model))

        calls = {"n": 0}
        real = host.model.apply_model

        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")
            return real(*a, **k)
        host.model.apply_model = failing
        try:
            status = _wait(MANAGER.start(_config(tmp_path, output_name="failing", sample_every_n_steps=None)))
        finally:
            del host.model.apply_model
        assert status.state == "failed" and "injected failure" in status.error
        _assert_same(snap, _snapshot(host.model))
        assert list(_txt2img(host).getdata()) == list(image_before.getdata())


def test_lowvram_is_refused_with_a_clear_message(tmp_path):
    from lora_trainer.webui.job import MANAGER

    with webui("sd1", str(tmp_path)) as host:
        host.shared.cmd_opts.lowvram = True
        try:
            status = _wait(MANAGER.start(_config(tmp_path)))
        finally:
            host.shared.cmd_opts.lowvram = False
        assert status.state == "failed" and "--lowvram" in status.error


def test_http_api_trains_and_reports(tmp_path):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lora_trainer.config import to_dict
    from lora_trainer.webui.api import register_routes
    from lora_trainer.webui.job import MANAGER

    app = fastapi.FastAPI()
    register_routes(app)
    client = TestClient(app)
    with webui("sd1", str(tmp_path)) as host:
        body = to_dict(_config(tmp_path, output_name="api_lora"))
        r = client.post("/lora-trainer/v1/train", json=body)
        assert r.status_code == 200, r.text
        busy = client.post("/lora-trainer/v1/train", json=body)
        assert busy.status_code in (200, 409)  # 409 while the first run is still going
        status = _wait(MANAGER.job)
        assert status.state == "finished", status.error
        assert client.post("/lora-trainer/v1/pause").status_code == 200
        assert client.post("/lora-trainer/v1/resume").status_code == 200
        got = client.get("/lora-trainer/v1/status").json()
        assert got["final_file"].endswith("api_lora.safetensors") and got["state"] == "finished"
        assert {"step", "total_steps", "epoch", "loss", "avg_loss", "lr", "it_per_s", "eta_s", "vram_gb", "outputs",
                "samples", "preview_diff", "error"} <= set(got)
        assert "api_lora" in host.networks.available_networks
        bad = client.post("/lora-trainer/v1/train", json={"network_dim": 0})
        assert bad.status_code == 422 and "network_dim" in json.dumps(bad.json())
        assert client.get("/lora-trainer/v1/options").json()[0]["name"] == "pretrained_model_name_or_path"
        host.shared.cmd_opts.api_auth = "user:secret"
        try:
            assert client.get("/lora-trainer/v1/status").status_code == 401
            assert client.get("/lora-trainer/v1/status", auth=("user", "wrong")).status_code == 401
            assert client.get("/lora-trainer/v1/status", auth=("user", "secret")).status_code == 200
        finally:
            host.shared.cmd_opts.api_auth = None


def test_tab_builds_on_the_webuis_gradio_and_maps_every_field(tmp_path):
    gr = skip_unless_webui_gradio()
    from lora_trainer import config as cfgmod
    from lora_trainer.webui import ui

    with webui("sd1", str(tmp_path)):
        tab = ui.build_tab()
    comps = tab.lora_trainer_components
    assert set(comps) == {f.name for f in ui.tab_fields()}
    assert not set(comps) & ui.HIDDEN_IN_WEBUI
    for name, comp in comps.items():
        spec = cfgmod.field_spec(name)
        expected = {bool: gr.Checkbox}.get(spec.base_type) or (gr.Dropdown if spec.choices else None)
        if expected:
            assert isinstance(comp, expected), name
    values = {n: c.value for n, c in comps.items()}
    assert ui.config_from_values(values) == ui.webui_defaults()
    vis = ui.visibility(ui.lenient_config({**values, "network_module": "lora"}), None)
    assert not vis["conv_dim"] and vis["network_dim"]
    assert ui.visibility(ui.lenient_config({**values, "network_module": "locon"}), None)["conv_dim"]
    assert not ui.visibility(ui.webui_defaults(), "low-vram-8gb")["shuffle_caption"]
    shown = ui.visibility(ui.webui_defaults(), None)
    assert {n: c.visible for n, c in comps.items()} == shown  # the page opens with only what applies
    assert not comps["conv_dim"].visible


def test_optimizer_switch_sets_and_then_undoes_adaptive_learning_rates():
    from lora_trainer import config as cfgmod
    from lora_trainer.webui import ui

    cfg = ui.webui_defaults()
    prodigy = ui.learning_rates_for("Prodigy", cfg)
    assert prodigy["learning_rate"] == 1.0
    back = ui.learning_rates_for("AdamW", ui.lenient_config({**cfgmod.to_dict(cfg), **prodigy}))
    assert back["learning_rate"] == cfg.learning_rate and back["unet_lr"] is None
    assert ui.learning_rates_for("AdamW", cfg) == {}  # a user's own small rate stays


def test_progress_text_is_plain_and_says_the_phase():
    from lora_trainer.webui.job import JobStatus, status_html, status_text

    s = JobStatus(state="running", phase="caching latents", step=0, total_steps=40, epoch=0, total_epochs=2,
                  message="caching <latents>")
    text = status_text(s)
    assert text.startswith("caching latents") and "step 0/40" in text and "<" not in text
    assert "&lt;latents&gt;" in status_html(s)


def test_a_checkpoint_switch_during_training_cancels_cleanly(tmp_path):
    from lora_trainer.webui.job import MANAGER

    with webui("sd1", str(tmp_path)) as host:
        from modules import sd_models

        snap = _snapshot(host.model)
        job = MANAGER.start(_config(tmp_path, max_train_steps=200, sample_every_n_steps=None))
        deadline = time.time() + 120
        while job.status.step < 1 and time.time() < deadline and job.thread.is_alive():
            time.sleep(0.05)
        sd_models.model_data.sd_model = object()  # the user picked another checkpoint
        status = _wait(job)
        sd_models.model_data.sd_model = host.model
        assert status.state == "cancelled" and "another checkpoint" in status.message
        assert status.final_file and os.path.isfile(status.final_file)
        _assert_same(snap, _snapshot(host.model))


def test_routes_are_mounted_only_with_api(tmp_path):
    fastapi = pytest.importorskip("fastapi")
    from lora_trainer import webui as ext

    with webui("sd1", str(tmp_path)) as host:
        app = fastapi.FastAPI()
        host.shared.cmd_opts.api = False
        ext._on_app_started(None, app)
        assert not [r for r in app.routes if r.path.startswith("/lora-trainer")]
        host.shared.cmd_opts.api = True
        ext._on_app_started(None, app)
        assert {"/lora-trainer/v1/train", "/lora-trainer/v1/cancel", "/lora-trainer/v1/resume"} <= {
            r.path for r in app.routes}


def test_gradient_checkpointing_on_the_webui_unet_trains_the_same(tmp_path):
    """The blocks are checkpointed non-reentrantly: a frozen UNet's network still gets its gradients."""
    from safetensors.torch import load_file

    from lora_trainer.webui.job import MANAGER

    results = {}
    for ckpt in (False, True):
        with webui("sdxl", str(tmp_path / str(ckpt))) as host:
            snap = _snapshot(host.model)
            status = _wait(MANAGER.start(_config(tmp_path, output_name=f"ckpt{int(ckpt)}", max_train_steps=1,
                                                 sample_every_n_steps=None, gradient_checkpointing=ckpt)))
            assert status.state == "finished", status.error
            _assert_same(snap, _snapshot(host.model))
            results[ckpt] = load_file(status.final_file)
    a, b = results[False], results[True]
    assert any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("lora_up.weight"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_previews_bring_the_cached_parts_back_and_training_goes_on_without_them(tmp_path, monkeypatch, family):
    """With latents and text-encoder outputs cached, the VAE and text encoders leave the GPU while training; the
    WebUI's pipeline renders previews with every part in place, then they leave again; the model ends as it was."""
    from lora_trainer.webui.bundle import WebUIBundle
    from lora_trainer.webui.job import MANAGER

    away_in_steps, away_in_renders = [], []
    predict, render = WebUIBundle.predict, WebUIBundle._render
    monkeypatch.setattr(WebUIBundle, "predict", lambda self, *a: (away_in_steps.append(set(self._offloaded)),
                                                                  predict(self, *a))[1])
    monkeypatch.setattr(WebUIBundle, "_render", lambda self, *a: (away_in_renders.append(set(self._offloaded)),
                                                                  render(self, *a))[1])
    with webui(family, str(tmp_path)) as host:
        snap = _snapshot(host.model)
        allowed = host.shared.parallel_processing_allowed
        status = _wait(MANAGER.start(_config(tmp_path, cache_latents=True, cache_text_encoder_outputs=True,
                                             offload_vae=True, network_train_unet_only=True)))
        assert status.state == "finished", status.error
        assert len(status.samples) == 2 and all(os.path.isfile(p) for p in status.samples)
        assert away_in_steps and all(a == {"vae", "text_encoders"} for a in away_in_steps)
        assert away_in_renders and all(a == set() for a in away_in_renders)
        _assert_same(snap, _snapshot(host.model))
        assert host.shared.parallel_processing_allowed == allowed
