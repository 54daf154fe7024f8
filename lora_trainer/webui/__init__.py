"""The WebUI side: the only code that imports `modules.*` (AUTOMATIC1111) or Gradio.

`register()` is called by `scripts/lora_trainer_tab.py` and hooks the tab, the HTTP routes and the clean-up into the
WebUI's callbacks. If something the tab needs is missing (an optional package, an unsupported WebUI), a tab that
says what is missing and how to get it is registered instead: the WebUI always starts.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

REQUIRED = (("lycoris", "lycoris-lora"), ("safetensors", "safetensors"))


def missing_packages() -> list[str]:
    import importlib.util

    return [pip for module, pip in REQUIRED if importlib.util.find_spec(module) is None]


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(_on_ui_tabs)
    script_callbacks.on_app_started(_on_app_started)
    script_callbacks.on_script_unloaded(_on_unloaded)


def _on_ui_tabs():
    from .ui import TAB_ID

    missing = missing_packages()
    if missing:
        return [(_missing_tab(missing), "Train LoRA", TAB_ID)]
    from .ui import build_tab

    return [(build_tab(), "Train LoRA", TAB_ID)]


def _missing_tab(missing: list[str]):
    import gradio as gr

    cmd = "pip install " + " ".join(missing)
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(f"<p><b>Train LoRA needs {', '.join(missing)}</b>, which the extension's installer could not add."
                f" Restart the WebUI to let it try again, or install it into the WebUI's Python environment "
                f"with <code>{cmd}</code> (lycoris-lora 3.4.0 for torch below 2.4).</p>")
    return tab


def _on_app_started(demo, app) -> None:
    from .host import cmd_opts

    if missing_packages() or not (getattr(cmd_opts(), "api", False) or getattr(cmd_opts(), "nowebui", False)):
        return  # the HTTP routes are mounted with --api, like the WebUI's own
    from .api import register_routes

    register_routes(app)


def _on_unloaded() -> None:
    """Reload UI: ask a running job to stop (the host's Interrupt does the same) so it restores the model."""
    from .job import MANAGER

    MANAGER.stop()
