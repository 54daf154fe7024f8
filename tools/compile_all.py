"""Compile every project file with the running interpreter (tools/test.sh runs it with Python 3.10)."""

import pathlib
import sys

bad = []
for path in sorted(pathlib.Path(".").glob("**/*.py")):
    if any(part.startswith(".venv") for part in path.parts):
        continue
    try:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    except SyntaxError as e:
        bad.append(f"{path}: {e}")
sys.stdout.write("\n".join(bad) + "\n" if bad else f"python {sys.version.split()[0]}: every file compiles\n")
sys.exit(1 if bad else 0)
