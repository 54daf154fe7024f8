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


def data_path() -> str:
    """The WebUI's data folder (`--data-dir`; `modules/paths_internal.py:30`)."""
    return mod("paths").data_path


# Folders of the WebUI's own: `paths.data_path`/`models_path` (`modules/paths_internal.py:30-32`), the command-line
# folders of `modules/cmd_args.py:22-27` and the Lora extension's (`extensions-builtin/Lora/preload.py:7-8`).
_PATHS_FOLDERS = ("data_path", "models_path")
_CMD_FOLDERS = ("data_dir", "models_dir", "ckpt_dir", "vae_dir", "lora_dir", "lyco_dir_backcompat")


def webui_folders() -> list[tuple[str, str]]:
    """(where it comes from, folder) for each data or model folder the WebUI is configured with."""
    paths, opts_ = mod("paths"), cmd_opts()
    found = [(f"paths.{n}", getattr(paths, n, None)) for n in _PATHS_FOLDERS]
    found += [("--" + n.replace("_", "-"), getattr(opts_, n, None)) for n in _CMD_FOLDERS]
    return [(where, str(folder)) for where, folder in found if folder]


def setting(key: str, default: Any) -> Any:
    """A value of the WebUI's settings; `default` when it was never registered nor saved (e.g. with --nowebui, where
    `on_ui_settings` never runs but `config.json` is still loaded)."""
    return getattr(opts(), key, default)


SETTINGS_SECTION = ("lora_trainer", "Train LoRA")


def add_setting(key: str, default: Any, label: str, *, info: str = "", lines: int = 1,
                restrict_api: bool = False, folders: bool = False) -> None:
    """Register an option on the Settings page, in the extension's own section (`shared.opts.add_option`,
    `modules/options.py:256-259`; `OptionInfo`, `:13-58`). `restrict_api` keeps `/sdapi/v1/options` from changing it
    (`:155-156`); `folders` hides it and refuses changes with --hide-ui-dir-config like the WebUI's own folder
    settings (`shared.hide_dirs`, `modules/shared.py:21`; `modules/options.py:105-108`)."""
    sh = shared()
    args: dict[str, Any] = {"lines": lines} if lines > 1 else {}
    if folders:
        args.update(getattr(sh, "hide_dirs", {}))
    option = sh.OptionInfo(default, label, component_args=args or None, section=SETTINGS_SECTION,
                           restrict_api=restrict_api)
    if info:
        option = option.info(info)
    sh.opts.add_option(key, option)


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
