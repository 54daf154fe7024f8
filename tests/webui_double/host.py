"""Installing the WebUI double for a test: `modules.*` and `networks` on sys.path, a tiny model loaded."""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator

A1111 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "a1111")
BUILDERS = {"sd1": "build_sd1", "sd2": "build_sd2", "sdxl": "build_sdxl"}


def _purge() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name == "networks":
            del sys.modules[name]


@contextlib.contextmanager
def webui(family: str, root: str, seed: int = 0) -> Iterator[types.SimpleNamespace]:
    """The double with a tiny `family` model loaded; files under `root` (Lora folder, outputs)."""
    from tests.webui_double import models

    _purge()
    sys.path.insert(0, A1111)
    old_opts = models.opts
    try:
        import networks
        from modules import paths, sd_models, shared

        models.opts = shared.opts  # the model's text encoders read clip skip etc. from the WebUI's settings
        model = getattr(models, BUILDERS[family])(seed=seed)
        models.assign_network_names(model)
        shared.sd_model = model
        sd_models.model_data.sd_model = model
        info = model.sd_checkpoint_info
        sd_models.checkpoint_aliases[info.title] = info
        shared.opts.data["sd_model_checkpoint"] = info.title
        shared.cmd_opts.lora_dir = os.path.join(root, "models", "Lora")
        paths.data_path = root
        networks.list_available_networks()
        yield types.SimpleNamespace(model=model, shared=shared, networks=networks, root=root,
                                    lora_dir=shared.cmd_opts.lora_dir)
    finally:
        models.opts = old_opts
        sys.path.remove(A1111)
        _purge()
