"""Run queues: several configs one after another, each in its own run folder, checked before the first starts; on
the CLI, in the WebUI's job manager and through the API."""

from __future__ import annotations

import json
import os
import time

import pytest
from safetensors.torch import load_file

from lora_trainer import cli
from lora_trainer.config import save_json
from lora_trainer.synthetic import make_dataset

from .conftest import base_config
from .webui_double.host import webui


def _config_file(tmp_path, name: str, data: str, **kw) -> str:
    cfg = base_config(data, str(tmp_path / "unused"), output_name=name, max_train_steps=1, **kw)
    path = str(tmp_path / f"{name}.json")
    save_json(cfg, path)
    return path


def test_two_configs_run_one_after_another_in_their_own_folders(tmp_path, dataset_dir, capsys):
    a, b = _config_file(tmp_path, "first", dataset_dir), _config_file(tmp_path, "second", dataset_dir, network_dim=2)
    runs = tmp_path / "runs"
    assert cli.main(["train", "--config", a, "--config", b, "--multi_run_folder", str(runs), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["state"] for e in summary["queue"]] == ["finished", "finished"]
    assert [r["final_file"] for r in summary["runs"]] == [str(runs / "run1" / "first.safetensors"),
                                                         str(runs / "run2" / "second.safetensors")]
    dims = [load_file(r["final_file"])["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0]
            for r in summary["runs"]]
    assert dims == [4, 2]  # each run trained with its own config
    assert sorted(os.listdir(runs)) == ["run1", "run2"] and not (tmp_path / "unused").exists()


def test_duplicate_output_names_are_refused_before_the_first_run(tmp_path, dataset_dir, capsys):
    a = _config_file(tmp_path, "same", dataset_dir)
    b = _config_file(tmp_path, "Same", dataset_dir)
    runs = tmp_path / "runs"
    assert cli.main(["train", "--config", a, "--config", b, "--multi_run_folder", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "runs 1 and 2 both have output_name 'Same'" in err and "nothing was trained" in err
    assert not runs.exists()


def test_a_broken_later_config_stops_the_queue_before_anything_trains(tmp_path, dataset_dir, capsys):
    a = _config_file(tmp_path, "good", dataset_dir)
    b = _config_file(tmp_path, "bad", str(tmp_path / "no_such_folder"))
    runs = tmp_path / "runs"
    assert cli.main(["train", "--config", a, "--config", b, "--multi_run_folder", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "queue run 2 (bad)" in err and "nothing was trained" in err
    assert not list(runs.rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# the WebUI


def _webui_config(tmp_path, name: str, **kw):
    from lora_trainer.config import TrainConfig

    data = make_dataset(str(tmp_path / "data"), images=2, repeats=1, size=64, aspect_variety=False)
    values = dict(train_data_dir=data, output_dir="", output_name=name, resolution="64", min_bucket_reso=64,
                  max_bucket_reso=128, network_dim=2, network_alpha=2.0, train_batch_size=1, max_train_steps=2,
                  seed=1, save_precision="float")
    values.update(kw)
    return TrainConfig(**values)


def _wait_queue(manager, timeout=600):
    deadline = time.time() + timeout
    while manager.busy() and time.time() < deadline:
        time.sleep(0.05)
    assert not manager.busy(), "the queue did not finish"


def test_a_queue_in_the_webui_runs_each_config_and_shows_in_the_status(tmp_path):
    from lora_trainer.errors import UserError
    from lora_trainer.webui.job import MANAGER

    with webui("sd1", str(tmp_path)) as host:
        with pytest.raises(UserError, match="both have output_name"):
            MANAGER.start_queue([_webui_config(tmp_path, "q1"), _webui_config(tmp_path, "Q1")])
        assert not MANAGER.busy()
        MANAGER.start_queue([_webui_config(tmp_path, "q1"), _webui_config(tmp_path, "q2", max_train_steps=40)])
        while MANAGER.job is None or MANAGER.job.cfg.output_name != "q2" or MANAGER.job.status.step < 1:
            time.sleep(0.05)
        MANAGER.enqueue(_webui_config(tmp_path, "q3"))  # added while the queue runs
        with pytest.raises(UserError, match="q3 was not added to the queue .the queued runs go on.: runs 3 and 4 "
                                            "both have output_name 'q3'"):
            MANAGER.enqueue(_webui_config(tmp_path, "q3"))
        MANAGER.stop()  # cancels q2 (its steps so far are saved) and the rest of the queue
        _wait_queue(MANAGER)
        states = [(e["output_name"], e["state"]) for e in MANAGER.status()["queue"]]
        assert states == [("q1", "finished"), ("q2", "cancelled"), ("q3", "skipped")]
        from lora_trainer.webui.ui import queue_html

        shown = queue_html(MANAGER.queue)  # what the tab shows under the status
        assert "1. q1: finished" in shown and "3. q3: skipped - the queue was cancelled" in shown
        assert os.path.isfile(os.path.join(host.lora_dir, "q1.safetensors"))
        assert not os.path.exists(os.path.join(host.lora_dir, "q3.safetensors"))

        MANAGER.start_queue([_webui_config(tmp_path, "q4"), _webui_config(tmp_path, "q5")])
        _wait_queue(MANAGER)
        assert [e["state"] for e in MANAGER.status()["queue"]] == ["finished", "finished"]
        assert all(os.path.isfile(os.path.join(host.lora_dir, f"{n}.safetensors")) for n in ("q4", "q5"))


def test_the_api_takes_an_array_as_a_queue(tmp_path):
    fastapi = pytest.importorskip("fastapi")
    testclient = pytest.importorskip("fastapi.testclient")
    from lora_trainer.webui.api import register_routes
    from lora_trainer.webui.job import MANAGER

    with webui("sd1", str(tmp_path)):
        app = fastapi.FastAPI()
        register_routes(app)
        client = testclient.TestClient(app)
        body = [json.loads(json.dumps(_webui_config(tmp_path, n).__dict__)) for n in ("api1", "api2")]
        for item in body:
            item["train_data_dir"] = os.path.relpath(item["train_data_dir"], str(tmp_path))
        r = client.post("/lora-trainer/v1/train", json=body)
        assert r.status_code == 200, r.text
        assert [e["output_name"] for e in r.json()["queue"]] == ["api1", "api2"]
        _wait_queue(MANAGER)
        assert [e["state"] for e in client.get("/lora-trainer/v1/status").json()["queue"]] == ["finished"] * 2
        r = client.post("/lora-trainer/v1/train", json=[body[0], {**body[0], "network_dim": "x"}])
        assert r.status_code == 422 and "queue run 2" in r.json()["error"]
