"""The WebUI side: the only code that imports `modules.*` (AUTOMATIC1111) or Gradio.

`register()` is called by `scripts/lora_trainer_tab.py` and hooks the tab, the settings, the HTTP routes and the
clean-up into the WebUI's callbacks. If something the tab needs is missing or broken (an optional package that is
absent or fails to import, an unsupported WebUI), a tab that says what is wrong and how to fix it is registered
instead, and every callback logs its own failures instead of raising them: the WebUI always starts.
"""

from __future__ import annotations

import html
import importlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

REQUIRED = (("lycoris", "lycoris-lora"), ("safetensors", "safetensors"))
TAB_TITLE = "Train LoRA"
TAB_ID = "lora_trainer"  # the same as ui.TAB_ID; kept here so that the fallback tab never imports ui
ALLOWED_DIRS_KEY = "lora_trainer_allowed_dirs"
ALLOWED_DIRS_LABEL = "Folders the HTTP API may use besides the WebUI's data and model folders"


@dataclass(frozen=True)
class PackageProblem:
    module: str
    pip: str
    error: str = ""  # "" when the package is not installed, else the first line of its import error


def package_problems() -> list[PackageProblem]:
    """The required packages that are not installed or raise when imported (e.g. lycoris on a too-old torch)."""
    problems = []
    for module, pip in REQUIRED:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                problems.append(PackageProblem(module, pip))
            else:  # installed, but something it imports is not
                problems.append(PackageProblem(module, pip, _first_line(e)))
        except (Exception, SystemExit) as e:  # a broken package must not stop the WebUI
            log.warning("Train LoRA: importing %s failed", module, exc_info=True)
            problems.append(PackageProblem(module, pip, _first_line(e)))
    return problems


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def missing_packages() -> list[str]:
    """pip names of the required packages that are missing or broken."""
    return [p.pip for p in package_problems()]


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(_on_ui_tabs)
    script_callbacks.on_ui_settings(_on_ui_settings)
    script_callbacks.on_app_started(_on_app_started)
    script_callbacks.on_script_unloaded(_on_unloaded)


def _on_ui_tabs():
    problems = package_problems()
    if problems:
        return _fallback_tab(problems_html(problems))
    try:
        from .ui import build_tab

        return [(build_tab(), TAB_TITLE, TAB_ID)]
    except Exception as e:  # the WebUI starts with a tab that says why, not without the tab
        log.exception("Train LoRA: building the tab failed")
        return _fallback_tab(f"<p><b>Train LoRA could not build its tab:</b> {html.escape(_first_line(e))}. "
                             "The console has the details.</p>")


def problems_html(problems: list[PackageProblem]) -> str:
    """What the fallback tab says: which packages are missing or broken, the import error, and the fix."""
    items = []
    for p in problems:
        if p.error:
            items.append(f"<li><b>{p.pip}</b> is installed but importing <code>{p.module}</code> fails: "
                         f"<code>{html.escape(p.error)}</code>. Reinstall a version that fits the WebUI's torch: "
                         f"<code>pip install --force-reinstall {p.pip}</code>.</li>")
        else:
            items.append(f"<li><b>{p.pip}</b> is not installed: <code>pip install {p.pip}</code>.</li>")
    return (f"<p><b>Train LoRA cannot start:</b></p><ul>{''.join(items)}</ul><p>The extension's installer adds "
            "missing packages when the WebUI starts: restart the WebUI to let it try again, or run the commands "
            "above in the WebUI's Python environment (lycoris-lora 3.4.0 for torch below 2.4).</p>")


def _fallback_tab(message_html: str) -> list:
    try:
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as tab:
            gr.HTML(message_html)
    except Exception:
        log.exception("Train LoRA: even the tab that reports the problem could not be built")
        return []
    return [(tab, TAB_TITLE, TAB_ID)]


def _on_ui_settings() -> None:
    try:
        from .host import add_setting

        add_setting(ALLOWED_DIRS_KEY, "", ALLOWED_DIRS_LABEL, lines=3, restrict_api=True, folders=True,
                    info="one per line or comma-separated; paths in /lora-trainer/v1 requests must lie under "
                         "these or the WebUI's own folders. The tab is not restricted")
    except Exception:
        log.exception("Train LoRA: could not add its settings")


def _on_app_started(demo, app) -> None:
    try:
        from .host import cmd_opts

        if missing_packages() or not (getattr(cmd_opts(), "api", False) or getattr(cmd_opts(), "nowebui", False)):
            return  # the HTTP routes are mounted with --api, like the WebUI's own
        from .api import register_routes

        register_routes(app)
    except Exception:
        log.exception("Train LoRA: could not add its HTTP routes; the WebUI continues without them")


def _on_unloaded() -> None:
    """Reload UI: ask a running job to stop (the host's Interrupt does the same) so it restores the model."""
    try:
        from .job import MANAGER

        MANAGER.stop()
    except Exception:
        log.exception("Train LoRA: could not stop the running job on reload")
