"""Everything the extension takes from AUTOMATIC1111, in one place.

Only `lora_trainer/webui/` imports `modules.*` (and only lazily, through these functions), so the rest of the
package runs without the WebUI and the tests can put a double of exactly this surface in place.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


def mod(name: str) -> ModuleType:
    """`modules.<name>` of the running WebUI."""
    return importlib.import_module(f"modules.{name}")


def shared() -> ModuleType:
    return mod("shared")


def loaded_model() -> Any | None:
    """The loaded checkpoint without triggering a load (shared.sd_model would block and load one)."""
    return mod("sd_models").model_data.sd_model


def current_model() -> Any | None:
    """The loaded checkpoint, waiting for (or starting) its load as any generation does; call it under the queue
    lock, never while building the UI."""
    return shared().sd_model


def lora_networks() -> ModuleType | None:
    """The built-in Lora extension's `networks` module (loaded before any user extension), if it is there."""
    return sys.modules.get("networks")


def opts() -> Any:
    return shared().opts


def cmd_opts() -> Any:
    return shared().cmd_opts


def state() -> Any:
    return shared().state


def devices() -> ModuleType:
    return mod("devices")


def lora_dir() -> str:
    return cmd_opts().lora_dir


def checkpoint_title(model: Any) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "title", "") or ""


def checkpoint_name(model: Any) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "name", "") or getattr(info, "title", "") or "unknown"


def loaded_vae_name() -> str | None:
    try:
        return mod("sd_vae").get_loaded_vae_name()
    except (ImportError, AttributeError):
        return None


def model_family(model: Any) -> str:
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    if getattr(model, "is_sd1", False):
        return "sd1"
    raise ValueError(f"{type(model).__name__} is not an SD1, SD2 or SDXL model")
