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
def webui_host(root: str) -> Iterator[types.SimpleNamespace]:
    """The double without a model: `modules.*` importable, its data and model folders under `root` as
    `--data-dir root` would put them (v1.10.1 `modules/paths_internal.py:30-32`, Lora's `preload.py:7-8`)."""
    _purge()
    sys.path.insert(0, A1111)
    try:
        from modules import paths, shared

        models = os.path.join(root, "models")
        paths.data_path, paths.models_path = root, models
        shared.cmd_opts.data_dir = root
        shared.cmd_opts.lora_dir = os.path.join(models, "Lora")
        shared.cmd_opts.lyco_dir_backcompat = os.path.join(models, "LyCORIS")
        yield types.SimpleNamespace(shared=shared, paths=paths, root=root, lora_dir=shared.cmd_opts.lora_dir)
    finally:
        sys.path.remove(A1111)
        _purge()


@contextlib.contextmanager
def webui(family: str, root: str, seed: int = 0) -> Iterator[types.SimpleNamespace]:
    """The double with a tiny `family` model loaded; files under `root` (Lora folder, outputs)."""
    from tests.webui_double import models

    old_opts = models.opts
    with webui_host(root) as bare:
        try:
            import networks
            from modules import sd_models, shared

            models.opts = shared.opts  # the model's text encoders read clip skip etc. from the WebUI's settings
            model = getattr(models, BUILDERS[family])(seed=seed)
            models.assign_network_names(model)
            shared.sd_model = model
            sd_models.model_data.sd_model = model
            info = model.sd_checkpoint_info
            sd_models.checkpoint_aliases[info.title] = info
            shared.opts.data["sd_model_checkpoint"] = info.title
            networks.list_available_networks()
            yield types.SimpleNamespace(model=model, shared=shared, networks=networks, root=root,
                                        lora_dir=bare.lora_dir)
        finally:
            models.opts = old_opts


@contextlib.contextmanager
def recording_state(host: types.SimpleNamespace, on_set) -> Iterator[None]:
    """The WebUI's `shared.state` reports every attribute set to `on_set(state, name, value)` while inside."""
    state = host.shared.state
    plain = type(state)

    class Recording(plain):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            on_set(self, name, value)

    state.__class__ = Recording
    try:
        yield
    finally:
        state.__class__ = plain


def skip_unless_webui_gradio():
    """The gradio module, when it is the WebUI's Gradio 3.41 (the tab targets no other)."""
    import pytest

    gr = pytest.importorskip("gradio")
    if not gr.__version__.startswith("3."):
        pytest.skip(f"the tab targets the WebUI's Gradio 3.41, not {gr.__version__}")
    return gr
