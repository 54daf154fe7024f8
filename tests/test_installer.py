"""install.py's logic: only what is missing, versions chosen by the host's torch, nothing installed changes."""

from __future__ import annotations

from lora_trainer import installer

HOST = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "safetensors": "0.4.2", "numpy": "1.26.2",
        "pillow": "9.5.0", "einops": "0.4.1", "gradio": "3.41.2"}


def test_plan_follows_the_hosts_torch():
    specs = dict((n.dist, s) for n, s in installer.plan(HOST, installer.torch_version(HOST)))
    assert specs["lycoris-lora"] == "lycoris-lora==3.4.0"  # 4.x imports torch.library.custom_op (torch >= 2.4)
    assert specs["bitsandbytes"] == "bitsandbytes==0.45.5"  # >= 0.46 needs torch >= 2.2
    newer = {**HOST, "torch": "2.13.0"}
    specs = dict((n.dist, s) for n, s in installer.plan(newer, installer.torch_version(newer)))
    assert specs["lycoris-lora"].startswith("lycoris-lora>=3.4.0") and specs["bitsandbytes"] == "bitsandbytes>=0.45.5"


def test_nothing_installed_is_planned_again():
    have = {**HOST, "lycoris-lora": "3.4.0", "prodigyopt": "1.1.2", "dadaptation": "3.2", "bitsandbytes": "0.45.5"}
    assert installer.plan(have, (2, 1)) == []


def test_every_installed_package_is_pinned_for_pip(tmp_path):
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        with open(cmd[cmd.index("-c") + 1]) as f:
            constraints = f.read().splitlines()
        assert {"transformers==4.30.2", "torch==2.1.2+cu121", "numpy==1.26.2", "pillow==9.5.0"} <= set(constraints)
        return (1, "ERROR: Cannot install x because it needs numpy>=2") if "bitsandbytes" in cmd[-1] else (0, "ok")

    report = installer.install(dict(HOST), run=fake_pip)
    assert len(calls) == 4 and all(c[1:4] == ["-m", "pip", "install"] for c in calls)
    assert any("installed lycoris-lora==3.4.0" in line for line in report)
    assert any("could not install bitsandbytes==0.45.5" in line and "skipped" in line for line in report)


def test_skip_variable(monkeypatch):
    monkeypatch.setenv(installer.SKIP_ENV, "1")
    assert installer.install(dict(HOST), run=lambda cmd: (_ for _ in ()).throw(AssertionError("pip ran"))) == [
        f"Train LoRA: {installer.SKIP_ENV} is set, installing nothing"]
