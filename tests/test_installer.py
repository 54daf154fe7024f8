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


def test_versions_pip_cannot_parse_are_pinned_exactly_and_bad_names_left_out():
    """pip >= 24.1 rejects a whole constraints file over one `==` with a non-PEP 440 version; `===` takes any."""
    have = {"numpy": "1.26.2", "torch": "2.1.2+cu121", "xformers": "0.0.23.post1", "blendmodes": "2022",
            "httpcore": "0.15", "weird": "1!2.0rc1.post3.dev4+local.7", "legacy": "0.1.dev-unknown",
            "bad name": "1.0", "empty": ""}
    assert installer.constraints(have).splitlines() == [
        "blendmodes==2022", "httpcore==0.15", "legacy===0.1.dev-unknown", "numpy==1.26.2", "torch==2.1.2+cu121",
        "weird==1!2.0rc1.post3.dev4+local.7", "xformers==0.0.23.post1"]


def test_the_first_of_two_installs_on_sys_path_is_the_one_pinned(tmp_path, monkeypatch):
    for folder, version in (("first", "1.0"), ("second", "2.0")):
        info = tmp_path / folder / f"lt_dup_probe-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lt_dup.probe\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "second"))
    monkeypatch.syspath_prepend(str(tmp_path / "first"))
    assert installer.installed_distributions()["lt-dup-probe"] == "1.0"


CONFLICT = """Processing ./dadaptation-3.2-py3-none-any.whl
INFO: pip is looking at multiple versions of dadaptation to determine which version is compatible with other

The conflict is caused by:
    dadaptation 3.2 depends on numpy>=2
    The user requested (constraint) numpy==1.26.2

To fix this you could try to:
1. loosen the range of package versions you've specified

ERROR: Cannot install dadaptation==3.2 because these package versions have conflicting dependencies.
ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""
NOT_FOUND = """Looking in links: /wheels
ERROR: Could not find a version that satisfies the requirement prodigyopt>=1.0 (from versions: none)
ERROR: No matching distribution found for prodigyopt>=1.0

[notice] A new release of pip is available: 23.2.1 -> 26.3
"""


def test_the_report_gives_pips_reason_not_its_last_line():
    assert installer.pip_reason(CONFLICT) == "dadaptation 3.2 depends on numpy>=2; the WebUI has numpy==1.26.2"
    assert installer.pip_reason(NOT_FOUND) == "No matching distribution found for prodigyopt>=1.0"
    assert installer.pip_reason("\nsomething odd\n\n") == "something odd"
    need = {n.dist: n for n in installer.NEEDS}
    line = installer.skipped(need["dadaptation"], "dadaptation>=3.1", CONFLICT)
    assert line == ("Train LoRA: could not install dadaptation>=3.1 (optional, for the DAdaptAdam optimizer): it would "
                    "change a package the WebUI has installed (dadaptation 3.2 depends on numpy>=2; the WebUI has "
                    "numpy==1.26.2); skipped. Train LoRA works without it; only the DAdaptAdam optimizer will be "
                    "unavailable.")
    line = installer.skipped(need["lycoris-lora"], "lycoris-lora==3.4.0", NOT_FOUND.replace("prodigyopt>=1.0", "x"))
    assert "(required, for the LoRA/LyCORIS network modules): No matching distribution found for x; skipped." in line
    assert "cannot train until it is there" in line and 'python -m pip install "lycoris-lora==3.4.0"' in line
