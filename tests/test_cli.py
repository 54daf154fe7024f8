"""The command line as a user runs it: subprocesses, exit codes, stdout JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_trainer.synthetic import make_dataset


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("args,fragment", [
    (["train", "--network_dim", "0"], "network_dim: 0 is out of range"),
    (["train", "--netwrok_dim", "4"], "unrecognized arguments"),
    (["train", "--config", "/nonexistent.json"], "config file not found"),
    (["train", "--train_data_dir", "/tmp"], "has no 'N_name' subfolders"),
])
def test_user_errors_exit_2_without_traceback(args, fragment):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_is_reported_after_the_dataset_check(tmp_path):
    data = make_dataset(str(tmp_path / "d"), images=1, repeats=1)
    out = cli("train", "--pretrained_model_name_or_path", "/nope.safetensors", "--train_data_dir", data,
              "--output_dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "is neither a file, a folder nor a built-in model" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_dataset_is_a_user_error(tmp_path):
    out = cli("train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "none"),
              "--output_dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "train_data_dir: folder not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_json_summary(tmp_path):
    data = make_dataset(str(tmp_path / "d"), images=3, repeats=1)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"pretrained_model_name_or_path": "tiny-sd1", "train_data_dir": data,
                               "output_dir": str(tmp_path / "o"), "resolution": "64", "max_train_steps": 2,
                               "network_dim": 2, "seed": 3, "min_bucket_reso": 64, "max_bucket_reso": 128}))
    out = cli("train", "--config", str(cfg), "--output_name", "cli_lora", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["final_file"].endswith("cli_lora.safetensors")
    assert os.path.isfile(summary["final_file"])
    for key in ("files", "epochs", "first_epoch_loss", "last_epoch_loss", "peak_memory_gb", "seconds"):
        assert key in summary
    assert "steps/epoch" in out.stderr  # the step arithmetic is printed before training


def test_presets_and_options_list():
    out = cli("presets")
    assert out.returncode == 0 and "character-sd15" in out.stdout and "sdxl-24gb" in out.stdout
    out = cli("options")
    assert out.returncode == 0 and "network_dim" in out.stdout


def test_demo_runs_and_reports_where_things_are(tmp_path):
    out = cli("demo", "--output", str(tmp_path / "demo"), "--steps", "4", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and os.path.isfile(summary["final_file"])
    assert summary["charts"] and all(os.path.isfile(c) for c in summary["charts"])
