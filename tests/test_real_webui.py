"""Opt-in: the extension in a real AUTOMATIC1111 WebUI, trained and checked through the HTTP API.

Set SD_WEBUI_DIR to a v1.10.x checkout whose environment works (and SD_WEBUI_PYTHON to its python, default
$SD_WEBUI_DIR/venv/bin/python; SD_WEBUI_ARGS for launch flags, default a CPU run). The test links this repository
into its extensions/ folder, starts the WebUI with --api on a free port, trains a few steps on a synthetic dataset,
and checks that the file is in /sdapi/v1/loras and that txt2img with and without <lora:name:1> differs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from lora_trainer.synthetic import make_dataset

WEBUI = os.environ.get("SD_WEBUI_DIR", "")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not WEBUI, reason="set SD_WEBUI_DIR to run against a real "
                                                                      "AUTOMATIC1111")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    link = os.path.join(WEBUI, "extensions", "train-lora")
    if not os.path.exists(link):
        os.symlink(REPO, link)
    port = _free_port()
    python = os.environ.get("SD_WEBUI_PYTHON") or os.path.join(WEBUI, "venv", "bin", "python")
    args = os.environ.get("SD_WEBUI_ARGS", "--skip-prepare-environment --use-cpu all --no-half").split()
    log = open(tmp_path_factory.mktemp("webui") / "webui.log", "w")  # noqa: SIM115 - closed below
    args += ["--ui-settings-file", _settings_allowing(tmp_path_factory)]
    proc = subprocess.Popen([python, "launch.py", *args, "--api", "--port", str(port)], cwd=WEBUI, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()


def _settings_allowing(tmp_path_factory) -> str:
    """The WebUI's settings (a copy, the user's file untouched) with this session's temporary folder added to the
    folders the extension's HTTP API may use, as a user does in Settings > Train LoRA."""
    own = os.path.join(WEBUI, "config.json")
    settings = {}
    if os.path.isfile(own):
        with open(own, encoding="utf-8") as f:
            settings = json.load(f)
    settings["lora_trainer_allowed_dirs"] = str(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("settings") / "config.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    return str(path)


def _wait_ready(base: str, proc) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the WebUI exited during start-up")
        try:
            _call(base, "/lora-trainer/v1/status", timeout=5)
            _call(base, "/sdapi/v1/sd-models", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise TimeoutError("the WebUI did not start in 10 minutes")


def _txt2img(base: str, prompt: str) -> bytes:
    r = _call(base, "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 5, "steps": 2, "width": 64, "height": 64,
                                          "sampler_name": "Euler", "cfg_scale": 5})
    return base64.b64decode(r["images"][0])


def test_train_through_the_api_and_use_the_result(server, tmp_path):
    from PIL import Image

    data = make_dataset(str(tmp_path / "data"), images=3, repeats=1, size=64, aspect_variety=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapetok, red circle --w 64 --h 64 --d 3 --s 2 --l 5\n")
    name = f"train_lora_test_{int(time.time())}"
    body = {"train_data_dir": data, "output_dir": "", "output_name": name, "resolution": "64",
            "min_bucket_reso": 64, "max_bucket_reso": 128, "max_train_steps": 3, "network_dim": 4,
            "network_alpha": 4, "learning_rate": 1e-2, "seed": 1, "sample_prompts": str(prompts)}
    with pytest.raises(urllib.error.HTTPError) as refused:  # a folder outside the allowed ones
        _call(server, "/lora-trainer/v1/train", {**body, "train_data_dir": "/etc"})
    answer = json.loads(refused.value.read())
    assert refused.value.code == 403 and any(p.startswith("train_data_dir") for p in answer["problems"]), answer
    started = _call(server, "/lora-trainer/v1/train", body)
    assert started["id_task"]
    status = _wait_for_the_run(server)
    loras = {x["name"]: x for x in _call(server, "/sdapi/v1/loras")}
    assert name in loras and loras[name]["metadata"]["ss_output_name"] == name
    plain = Image.open(io.BytesIO(_txt2img(server, "a red circle")))
    with_lora = Image.open(io.BytesIO(_txt2img(server, f"a red circle <lora:{name}:1>")))
    assert list(plain.getdata()) != list(with_lora.getdata())
    assert status["preview_diff"] < 0.01, status["check"]
    again = Image.open(io.BytesIO(_txt2img(server, "a red circle")))
    assert list(again.getdata()) == list(plain.getdata())  # the host model is back as it was


def _wait_for_the_run(server: str) -> dict:
    deadline = time.time() + 1800
    while (status := _call(server, "/lora-trainer/v1/status"))["state"] in ("running", "paused"):
        assert time.time() < deadline, status
        time.sleep(5)
    logging.getLogger(__name__).info("Train LoRA status at the end: %s", json.dumps(status))
    assert status["state"] == "finished", status
    return status


def test_low_vram_settings_train_and_preview_with_parts_offloaded(server, tmp_path):
    """Cached latents and text-encoder outputs (the WebUI's SD1 conditioning is a plain tensor), the VAE and text
    encoders off the GPU while training, previews rendered with them back; the model ends as it was."""
    from PIL import Image

    data = make_dataset(str(tmp_path / "data"), images=3, repeats=1, size=64, aspect_variety=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapetok, red circle --w 64 --h 64 --d 3 --s 2 --l 5\n")
    name = f"train_lora_lowvram_{int(time.time())}"
    before = Image.open(io.BytesIO(_txt2img(server, "a red circle")))
    _call(server, "/lora-trainer/v1/train", {
        "train_data_dir": data, "output_dir": "", "output_name": name, "resolution": "64", "min_bucket_reso": 64,
        "max_bucket_reso": 128, "max_train_steps": 4, "network_dim": 4, "network_alpha": 4, "seed": 1,
        "sample_prompts": str(prompts), "sample_every_n_steps": 2, "cache_latents": True,
        "cache_text_encoder_outputs": True, "offload_vae": True, "network_train_unet_only": True})
    status = _wait_for_the_run(server)
    assert len(status["samples"]) == 2 and all(os.path.isfile(p) for p in status["samples"]), status
    assert status["preview_diff"] < 0.01, status["check"]
    after = Image.open(io.BytesIO(_txt2img(server, "a red circle")))
    assert list(after.getdata()) == list(before.getdata())
