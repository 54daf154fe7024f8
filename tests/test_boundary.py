"""The import boundary: the core never imports the WebUI or Gradio; diffusers/transformers only in backends/."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lora_trainer"
HOST_ONLY = {"modules", "launch", "gradio", "fastapi", "starlette"}
BACKEND_ONLY = {"diffusers", "transformers", "peft", "accelerate"}


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_no_host_and_no_diffusers_outside_backends():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        roots = imported_roots(path)
        if not rel.startswith("webui/") and roots & HOST_ONLY:
            offenders.append(f"{rel}: {sorted(roots & HOST_ONLY)}")
        if not rel.startswith(("backends/", "webui/")) and roots & BACKEND_ONLY:
            offenders.append(f"{rel}: {sorted(roots & BACKEND_ONLY)}")
    assert not offenders, offenders


def test_importing_the_core_loads_neither_diffusers_nor_transformers():
    code = ("import sys, lora_trainer.train, lora_trainer.cli, lora_trainer.config, lora_trainer.networks.network;"
            "bad = [m for m in ('diffusers', 'transformers', 'gradio', 'modules') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
