"""What install.py installs into the WebUI's environment: only what is missing, never a change to what is there.

Every installed distribution is written to a pip constraints file (`name==version`), so pip cannot upgrade or
downgrade anything the host pinned (the most common way training extensions break a WebUI); a package that would
need such a change is reported and skipped instead. Versions are chosen by the host's torch: lycoris-lora 4.x needs
torch >= 2.4 at import, bitsandbytes >= 0.46 needs torch >= 2.2. `LORA_TRAINER_SKIP_INSTALL=1` skips it all.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SKIP_ENV = "LORA_TRAINER_SKIP_INSTALL"
TorchVersion = tuple[int, int]


@dataclass(frozen=True)
class Need:
    dist: str
    spec: Callable[[TorchVersion], str | None]  # the pip requirement for this torch, or None to skip
    why: str
    required: bool = False


def _lycoris(tv: TorchVersion) -> str:
    return "lycoris-lora==3.4.0" if tv < (2, 4) else "lycoris-lora>=3.4.0,<5"


def _bitsandbytes(tv: TorchVersion) -> str | None:
    if sys.platform == "darwin":
        return None  # no CUDA: the 8-bit optimizers cannot run there
    return "bitsandbytes==0.45.5" if tv < (2, 2) else "bitsandbytes>=0.45.5"


NEEDS = (
    Need("lycoris-lora", _lycoris, "the LoRA/LyCORIS network modules", required=True),
    Need("prodigyopt", lambda tv: "prodigyopt>=1.0", "the Prodigy optimizer"),
    Need("dadaptation", lambda tv: "dadaptation>=3.1", "the DAdaptAdam optimizer"),
    Need("bitsandbytes", _bitsandbytes, "the 8-bit optimizers (AdamW8bit, Lion8bit)"),
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Normalized name -> version; where a name is found twice the first on sys.path wins, as with pip and import."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            out.setdefault(_norm(name), dist.version)
    return out


def torch_version(installed: dict[str, str]) -> TorchVersion | None:
    raw = installed.get("torch")
    m = re.match(r"(\d+)\.(\d+)", raw or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def plan(installed: dict[str, str], tv: TorchVersion) -> list[tuple[Need, str]]:
    """(need, pip requirement) for each missing package this torch can use."""
    todo = []
    for need in NEEDS:
        spec = need.spec(tv)
        if spec is not None and _norm(need.dist) not in installed:
            todo.append((need, spec))
    return todo


# PEP 440 version syntax (the PEP's appendix B); `==` needs it, `===` takes any string
_PEP440 = re.compile(r"""v?(?:\d+!)?\d+(?:\.\d+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?
    (?:-\d+|[-_.]?(?:post|rev|r)[-_.]?\d*)?(?:[-_.]?dev[-_.]?\d*)?(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?""",
                     re.IGNORECASE | re.VERBOSE)
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?", re.IGNORECASE)


def _pin(name: str, version: str) -> str | None:
    """`name==version`, `name===version` for a version pip cannot parse (pip >= 24.1 rejects the whole file over
    one such `==` line), or None for a name no requirement can spell (pip cannot install over it anyway)."""
    if not _NAME.fullmatch(name) or not version.strip() or any(c.isspace() or c in ";#" for c in version):
        return None
    op = "==" if _PEP440.fullmatch(version) else "==="
    return f"{name}{op}{version}"


def constraints(installed: dict[str, str]) -> str:
    """Pin every installed distribution to its current version (pip -c), so nothing installed can change."""
    pins = (_pin(name, version) for name, version in sorted(installed.items()))
    return "".join(f"{pin}\n" for pin in pins if pin)


Runner = Callable[[Sequence[str]], tuple[int, str]]


def _run(cmd: Sequence[str]) -> tuple[int, str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    return proc.returncode, proc.stdout + "\n" + proc.stderr


def pip_command(spec: str, constraints_file: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--prefer-binary", "--disable-pip-version-check",
           "-c", constraints_file, spec]
    if os.environ.get("INDEX_URL"):
        cmd += ["--index-url", os.environ["INDEX_URL"]]
    return cmd


def install(installed: dict[str, str] | None = None, run: Runner = _run) -> list[str]:
    """Install what is missing; returns one report line per package considered."""
    if os.environ.get(SKIP_ENV):
        return [f"Train LoRA: {SKIP_ENV} is set, installing nothing"]
    installed = installed if installed is not None else installed_distributions()
    tv = torch_version(installed)
    if tv is None:
        return ["Train LoRA: torch is not installed here; install the WebUI first"]
    todo = plan(installed, tv)
    if not todo:
        return ["Train LoRA: everything it needs is installed"]
    report = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "host-constraints.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(constraints(installed))
        for need, spec in todo:
            code, out = run(pip_command(spec, path))
            report.append(f"Train LoRA: installed {spec} ({need.why})" if code == 0 else skipped(need, spec, out))
    return report


_CONFLICT = "The conflict is caused by:"


def pip_reason(out: str) -> str:
    """Why pip failed, from its output: the conflict it found, else its last error, else its last line."""
    lines = [line.strip() for line in out.splitlines()]
    if _CONFLICT in lines:
        cause = []
        for line in lines[lines.index(_CONFLICT) + 1:]:
            if not line:
                break
            cause.append(line.replace("The user requested (constraint) ", "the WebUI has "))
        return "; ".join(cause[:6])[:500]
    errors = [line for line in lines if line.startswith("ERROR:") and "ResolutionImpossible" not in line]
    last = errors[-1:] or [line for line in lines if line][-1:] or ["no output"]
    return last[0].removeprefix("ERROR: ")[:500]


def skipped(need: Need, spec: str, out: str) -> str:
    """The report line for a package pip could not install under the host's pins: why, and what that means."""
    reason = pip_reason(out)
    if _CONFLICT in out or "conflicting dependencies" in out:
        reason = f"it would change a package the WebUI has installed ({reason})"
    if need.required:
        effect = (f"Train LoRA cannot train until it is there: install a version that fits the WebUI's packages "
                  f"into the WebUI's Python by hand (python -m pip install \"{spec}\")")
    else:
        effect = f"Train LoRA works without it; only {need.why} will be unavailable"
    kind = "required" if need.required else "optional"
    return f"Train LoRA: could not install {spec} ({kind}, for {need.why}): {reason}; skipped. {effect}."


def main() -> int:
    for line in install():
        sys.stdout.write(line + "\n")
    return 0
