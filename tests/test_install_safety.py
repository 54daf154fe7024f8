"""Dependency safety: the real install.py, run by a real pip in a real environment with the A1111 v1.10.1 pins.

A fresh venv gets stub wheels (metadata and an empty module, built here, no network) for every package that
`requirements_versions.txt` pins plus torch 2.1.2+cu121 and torchvision 0.16.2+cu121 as `TORCH_COMMAND` installs
them. pip then sees only a find-links folder of stubs: the host's versions, newer versions of pinned packages
(numpy 2, torch 2.4, ...) that an unconstrained install would happily pull in, and the optional packages with their
real Requires-Dist, plus traps: lycoris-lora 4.1.3 declares only `torch` but needs torch >= 2.4 at import,
bitsandbytes 0.48.0 needs torch >= 2.3, and dadaptation 3.2 is made to require numpy >= 2. install.py must install
what fits, report what does not, exit 0, and leave every installed package at its version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import venv
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INSTALL_PY = ROOT / "install.py"

# AUTOMATIC1111 v1.10.1 requirements_versions.txt, in full (research/a1111-host-contract.md §1.7).
REQUIREMENTS_VERSIONS = """\
setuptools==69.5.1  # temp fix for compatibility with some old packages
GitPython==3.1.32
Pillow==9.5.0
accelerate==0.21.0
blendmodes==2022
clean-fid==0.1.35
diskcache==5.6.3
einops==0.4.1
facexlib==0.3.0
fastapi==0.94.0
gradio==3.41.2
httpcore==0.15
inflection==0.5.1
jsonmerge==1.8.0
kornia==0.6.7
lark==1.1.2
numpy==1.26.2
omegaconf==2.2.3
open-clip-torch==2.20.0
piexif==1.1.3
protobuf==3.20.0
psutil==5.9.5
pytorch_lightning==1.9.4
resize-right==0.0.2
safetensors==0.4.2
scikit-image==0.21.0
spandrel==0.3.4
spandrel-extra-arches==0.1.1
tomesd==0.1.3
torch
torchdiffeq==0.2.3
torchsde==0.2.6
transformers==4.30.2
httpx==0.24.1
pillow-avif-plugin==1.4.3
"""
# modules/launch_utils.py:319-320 (TORCH_COMMAND); tqdm is not pinned but always there (transformers needs it)
INSTALLED_OUTSIDE_THE_FILE = {"torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "tqdm": "4.66.1"}
# newer releases of installed packages that pip can see: what a careless install would upgrade to
NEWER = {"numpy": "2.1.3", "torch": "2.4.0", "einops": "0.8.0", "safetensors": "0.4.5", "tqdm": "4.67.1",
         "transformers": "4.46.0"}


@dataclass(frozen=True)
class Stub:
    name: str
    version: str
    requires: tuple[str, ...] = ()


# Requires-Dist as the real wheels declare them (extras left out), except dadaptation 3.2 (it declares nothing)
OPTIONAL = (
    Stub("lycoris-lora", "3.4.0", ("torch", "einops", "toml", "tqdm")),
    Stub("lycoris-lora", "4.1.3", ("torch", "einops", "toml", "tqdm", "numpy", "safetensors")),
    Stub("toml", "0.10.2"),
    Stub("prodigyopt", "1.1.2"),
    Stub("dadaptation", "3.2", ("numpy>=2",)),
    Stub("bitsandbytes", "0.45.5", ("torch<3,>=2.0", "numpy>=1.17")),
    Stub("bitsandbytes", "0.48.0", ("torch<3,>=2.3", "numpy>=1.17", "packaging>=20.9")),
    Stub("packaging", "24.1"),
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """name -> version for each `name==version` line (a bare name such as `torch` is left to TORCH_COMMAND)."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


HOST_PINS = parse_pins(REQUIREMENTS_VERSIONS)
HOST = {**HOST_PINS, **INSTALLED_OUTSIDE_THE_FILE}
HOST_REQUIRES = {"torchvision": ("torch==2.1.2",)}  # the host's own inter-dependencies, kept to this one


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


WHEEL = b"Wheel-Version: 1.0\nGenerator: lora-trainer-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def build_wheel(dest: Path, stub: Stub) -> Path:
    """A py3-none-any wheel holding only metadata and an empty, uniquely named module."""
    dist = re.sub(r"[-_.]+", "_", stub.name)
    info = f"{dist}-{stub.version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {stub.name}\nVersion: {stub.version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in stub.requires)
    files = {
        f"_lora_trainer_stub_{dist.lower()}.py": b"",
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": WHEEL,
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = dest / f"{dist}-{stub.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def build_wheels(dest: Path, stubs: Sequence[Stub]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [build_wheel(dest, s) for s in stubs]


def pip_env(find_links: Sequence[Path]) -> dict[str, str]:
    """The environment for everything run in the stub venv: pip sees only `find_links`, no config, no index."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "LORA_TRAINER_")) and k != "INDEX_URL"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=" ".join(str(p) for p in find_links),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def venv_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: Sequence[str | Path], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def installed(env_dir: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, re\n"
            "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version"
            " for d in m.distributions()}))")
    proc = run([venv_python(env_dir), "-c", code], pip_env([]))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@dataclass(frozen=True)
class Index:
    host: Path  # the host's own versions
    extra: Path  # newer versions and the optional packages


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Index:
    base = tmp_path_factory.mktemp("find-links")
    build_wheels(base / "host", [Stub(name, version, HOST_REQUIRES.get(name, ())) for name, version in HOST.items()])
    build_wheels(base / "extra", [Stub(n, v) for n, v in NEWER.items()] + list(OPTIONAL))
    return Index(base / "host", base / "extra")


@pytest.fixture(scope="module")
def host_env(index, tmp_path_factory) -> Path:
    """A venv with pip and the A1111 v1.10.1 environment (as stubs), nothing else."""
    env_dir = tmp_path_factory.mktemp("host") / "venv"
    try:
        venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(env_dir)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create a venv with pip here (venv/ensurepip unavailable): {e}")
    proc = run([venv_python(env_dir), "-m", "pip", "install", "--no-deps", *sorted(index.host.glob("*.whl"))],
               pip_env([index.host]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    have = installed(env_dir)
    assert {k: have.get(k) for k in HOST} == HOST
    return env_dir


@pytest.fixture()
def webui_env(host_env, tmp_path) -> Path:
    """A private copy of the host venv (a venv's python finds its site-packages relative to pyvenv.cfg)."""
    env_dir = tmp_path / "venv"
    shutil.copytree(host_env, env_dir, symlinks=True)
    return env_dir


def run_install_py(env_dir: Path, find_links: Sequence[Path], webui_root: Path) -> subprocess.CompletedProcess:
    """As modules/launch_utils.py:228-241 runs it: `"{python}" "{install.py}"` from the WebUI root, own process."""
    webui_root.mkdir(exist_ok=True)
    env = pip_env(find_links)
    env["PYTHONPATH"] = str(webui_root)
    return run([venv_python(env_dir), INSTALL_PY], env, cwd=webui_root)


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("Train LoRA:")]


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, f"install.py changed installed packages (before, after): {changed}"
    assert {k: after[k] for k in HOST} == HOST


def test_the_traps_are_armed(host_env, index):
    """Without install.py's constraints pip would upgrade numpy for dadaptation and take lycoris-lora 4.x."""
    env = pip_env([index.host, index.extra])
    py = venv_python(host_env)
    proc = run([py, "-m", "pip", "install", "--dry-run", "dadaptation>=3.1", "lycoris-lora>=3.4.0"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    would = {w.lower() for w in proc.stdout.split("Would install", 1)[-1].split()}
    assert {"dadaptation-3.2", "numpy-2.1.3", "lycoris-lora-4.1.3"} <= would, proc.stdout


def test_install_py_adds_what_fits_and_changes_nothing_installed(webui_env, index, tmp_path):
    before = installed(webui_env)
    first = run_install_py(webui_env, [index.host, index.extra], tmp_path / "webui")
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stdout + first.stderr
    after = installed(webui_env)
    assert_unchanged(before, after)
    added = {k: v for k, v in after.items() if k not in before}
    assert added == {"lycoris-lora": "3.4.0", "toml": "0.10.2", "prodigyopt": "1.1.2", "bitsandbytes": "0.45.5"}

    report = lines(first)
    assert "Train LoRA: installed lycoris-lora==3.4.0 (the LoRA/LyCORIS network modules)" in report
    assert any(line.startswith("Train LoRA: installed prodigyopt>=1.0") for line in report)
    assert any(line.startswith("Train LoRA: installed bitsandbytes==0.45.5") for line in report)
    skipped = [line for line in report if "dadaptation" in line]
    assert len(skipped) == 1
    assert skipped[0].startswith("Train LoRA: could not install dadaptation>=3.1 (optional, for the DAdaptAdam")
    # pip's reason, not its last line ("ResolutionImpossible: for help visit ..."): the conflict with the host's pin
    assert ("it would change a package the WebUI has installed (dadaptation 3.2 depends on numpy>=2; "
            "the WebUI has numpy==1.26.2); skipped. Train LoRA works without it" in skipped[0]), skipped

    second = run_install_py(webui_env, [index.host, index.extra], tmp_path / "webui")
    assert second.returncode == 0, second.stdout + second.stderr
    assert installed(webui_env) == after
    assert [line.split(" (")[0] for line in lines(second)] == ["Train LoRA: could not install dadaptation>=3.1"]


def test_an_older_release_that_fits_is_found_and_then_nothing_is_left(webui_env, index, tmp_path):
    """pip backtracks from dadaptation 3.2 (numpy >= 2) to 3.1 under the host's pins; a later run installs nothing."""
    older = build_wheels(tmp_path / "older", [Stub("dadaptation", "3.1")])[0].parent
    links = [index.host, index.extra, older]
    before = installed(webui_env)
    first = run_install_py(webui_env, links, tmp_path / "webui")
    assert first.returncode == 0, first.stdout + first.stderr
    after = installed(webui_env)
    assert_unchanged(before, after)
    assert after["dadaptation"] == "3.1" and "could not" not in first.stdout, first.stdout

    again = run_install_py(webui_env, links, tmp_path / "webui")
    assert again.returncode == 0 and lines(again) == ["Train LoRA: everything it needs is installed"], again.stdout
    assert installed(webui_env) == after


def test_a_missing_optional_package_is_reported_not_fatal(webui_env, index, tmp_path):
    without = tmp_path / "without-prodigyopt"
    shutil.copytree(index.extra, without, ignore=shutil.ignore_patterns("prodigyopt-*"))
    before = installed(webui_env)
    proc = run_install_py(webui_env, [index.host, without], tmp_path / "webui")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    after = installed(webui_env)
    assert_unchanged(before, after)
    assert "prodigyopt" not in after and after["lycoris-lora"] == "3.4.0" and after["bitsandbytes"] == "0.45.5"
    missing = [line for line in lines(proc) if "prodigyopt" in line]
    assert len(missing) == 1 and missing[0].startswith("Train LoRA: could not install prodigyopt>=1.0 (optional")
    assert ": No matching distribution found for prodigyopt>=1.0; skipped." in missing[0], missing
    assert "would change a package" not in missing[0]  # nothing conflicted: there was no release to install


def test_the_pins_are_a1111_v1_10_1s():
    """The list above is the real file, when a checkout is around (SD_WEBUI_DIR, or ../a1111 beside the repo)."""
    webui = Path(os.environ.get("SD_WEBUI_DIR") or ROOT.parent / "a1111" / "stable-diffusion-webui")
    path = webui / "requirements_versions.txt"
    if not path.is_file():
        pytest.skip(f"no A1111 checkout at {webui} to compare the pins with")
    assert parse_pins(path.read_text(encoding="utf-8")) == HOST_PINS
    assert len(HOST_PINS) == 34 and "torch" not in HOST_PINS
