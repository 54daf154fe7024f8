"""The host's integrity: after any run in the WebUI (finished, cancelled or interrupted in each phase, out of memory,
or failed with an exception in each phase) the loaded model and the WebUI's state are exactly as before.

Each case takes a full fingerprint of the host double's model and globals, runs one job with a fault injected at one
phase (through the host where the fault would come from there, through our code where it would come from us), and
compares. Then txt2img on a fixed seed must be bit-identical and a plain next run must finish.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.synthetic import make_dataset

from .webui_double.host import webui

pytest.importorskip("tests.webui_double.models")

_PLAIN = (int, float, str, bool, bytes, type(None), torch.dtype, torch.device)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _value(v: Any) -> Any:
    """Plain values by value, tuples element-wise, anything else by identity (a replaced object is a change)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, tuple):
        return tuple(_value(x) for x in v)
    return ("id", id(v))


# the built-in Lora extension's own cache of a layer's original weights, made the first time any Lora renders
# (our end-of-run check renders one): compared by `_backups_hold_the_weights` instead of by identity
_LORA_CACHE = ("network_weights_backup", "network_bias_backup")


def _module_state(m: torch.nn.Module) -> dict[str, Any]:
    attrs = {k: _value(v) for k, v in m.__dict__.items()
             if k not in ("_parameters", "_buffers", "_modules") and k not in _HOOK_DICTS + _LORA_CACHE}
    attrs.setdefault("network_current_names", ())  # the Lora extension reads it with getattr(..., ())
    hooks = {k: [(hid, id(fn)) for hid, fn in getattr(m, k, {}).items()] for k in _HOOK_DICTS}
    return {"type": type(m), "class_forward": type(m).forward, "attrs": attrs, "hooks": hooks}


def fingerprint(host: Any) -> dict[str, Any]:
    """Everything a run could leave changed: parameter and buffer contents (hashes), objects, devices, dtypes,
    `requires_grad`, training flags, instance and class `forward`s, every hook, every module attribute; the WebUI's
    settings, the Lora extension's loaded networks, the hijack and UNet toggles, the RNG and torch's global modes."""
    from modules import sd_hijack, sd_unet, shared

    model = host.model
    return {
        "params": {n: (id(p), _tensor_digest(p), p.device, p.dtype, p.requires_grad, p.grad is None)
                   for n, p in model.named_parameters()},
        "buffers": {n: (id(b), _tensor_digest(b), b.device, b.dtype) for n, b in model.named_buffers()},
        "modules": {n: _module_state(m) for n, m in model.named_modules()},
        "opts": dict(shared.opts.data),
        "parallel_processing_allowed": shared.parallel_processing_allowed,
        "loaded_networks": list(host.networks.loaded_networks),
        "circular": sd_hijack.model_hijack.circular_enabled,
        "sd_unet": sd_unet.current_unet_option,
        "sd_model": id(shared.sd_model),
        "rng": _tensor_digest(torch.get_rng_state()),
        "torch_modes": (torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_inference_mode_enabled(),
                        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                        torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()),
    }


def _backups_hold_the_weights(model: torch.nn.Module) -> list[str]:
    """Layers whose Lora-extension backup differs from their weights: its next restore would change the model."""
    bad = []
    for name, m in model.named_modules():
        backup = getattr(m, "network_weights_backup", None)
        if backup is None:
            continue
        if isinstance(m, torch.nn.MultiheadAttention):
            same = torch.equal(backup[0], m.in_proj_weight.cpu()) and torch.equal(backup[1], m.out_proj.weight.cpu())
        else:
            same = torch.equal(backup, m.weight.cpu())
        if not same:
            bad.append(name)
    return bad


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for key in a:
        if a[key] == b[key]:
            continue
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            names = sorted(set(a[key]) | set(b[key]))
            changed = [n for n in names if a[key].get(n) != b[key].get(n)]
            out.append(f"{key}: {len(changed)} changed, e.g. {changed[:3]}")
        else:
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


# ------------------------------------------------------------------------------------------------------------
# the runs


def _config(tmp_path, name: str, **kw):
    from lora_trainer.config import TrainConfig

    data = make_dataset(str(tmp_path / "data"), images=4, repeats=1, size=64, aspect_variety=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapetok, red circle --w 64 --h 64 --d 3 --s 3 --l 5\n")
    values = dict(train_data_dir=data, output_dir="", output_name=name, resolution="64", min_bucket_reso=64,
                  max_bucket_reso=128, network_dim=4, network_alpha=4.0, learning_rate=1e-3, train_batch_size=2,
                  max_train_steps=4, seed=11, sample_prompts=str(prompts), sample_every_n_steps=2,
                  save_precision="float", cache_latents=True, network_module="locon", save_state=True)
    values.update(kw)
    return TrainConfig(**values)


def _txt2img(host) -> list:
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(sd_model=host.model, prompt="a red circle", negative_prompt="",
                                                    seed=7, steps=3, cfg_scale=5.0, width=64, height=64)
    host.shared.state.begin(job="txt2img")  # as the WebUI's queue wrapper does for every generation
    try:
        return list(processing.process_images(p).images[0].getdata())
    finally:
        host.shared.state.end()


def _run(cfg) -> Any:
    from lora_trainer.webui.job import MANAGER

    job = MANAGER.start(cfg)
    job.thread.join(600)
    assert not job.thread.is_alive(), "the training thread did not finish"
    return job.status


Fault = Callable[[Any, pytest.MonkeyPatch], None]  # installs the fault on (host, monkeypatch)


def _stop(host) -> None:
    host.shared.state.interrupt()  # the WebUI's Interrupt button (the tab's Cancel does the same through MANAGER)


def _on_nth(n: int, action: Callable[[], None], real: Callable[..., Any], every: bool = False) -> Callable[..., Any]:
    """`real` with `action` run before its `n`th call (and every later one with `every`)."""
    calls = {"n": 0}

    def wrapped(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n or (every and calls["n"] > n):
            action()
        return real(*a, **k)
    return wrapped


def _raise(exc: BaseException) -> Callable[[], None]:
    def action() -> None:
        raise exc
    return action


def _host_vae(n: int, action: Callable[[Any], Callable[[], None]]) -> Fault:
    def install(host, mp):
        mp.setattr(host.model, "encode_first_stage", _on_nth(n, action(host), host.model.encode_first_stage))
    return install


def _host_unet(n: int, action: Callable[[Any], Callable[[], None]], every: bool = False) -> Fault:
    def install(host, mp):
        mp.setattr(host.model, "apply_model", _on_nth(n, action(host), host.model.apply_model, every))
    return install


def _host_render(match: Callable[[Any], bool], action: Callable[[Any], Callable[[], None]]) -> Fault:
    """A fault in the WebUI's txt2img when it renders a preview (`match` picks which render)."""
    def install(host, mp):
        from modules import processing

        real = processing.process_images

        def process_images(p):
            if match(p):
                action(host)()
            return real(p)
        mp.setattr(processing, "process_images", process_images)
    return install


def _our_step(cls_path: str, method: str, action: Callable[[Any], Callable[[], None]], after: bool = True) -> Fault:
    """A fault inside our own code, after (or before) the real method ran: what a bug there would leave."""
    def install(host, mp):
        import importlib

        module, cls_name = cls_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), cls_name)
        real = getattr(cls, method)

        def wrapped(self, *a, **k):
            if not after:
                action(host)()
            out = real(self, *a, **k)
            if after:
                action(host)()
            return out
        mp.setattr(cls, method, wrapped)
    return install


def _save_fault(action: Callable[[Any], Callable[[], None]], n: int = 1) -> Fault:
    def install(host, mp):
        from lora_trainer.networks import export

        mp.setattr(export, "atomic_write_bytes", _on_nth(n, action(host), export.atomic_write_bytes))
    return install


def _interrupt(host) -> Callable[[], None]:
    return lambda: _stop(host)


def _cancel_button(host) -> Callable[[], None]:
    from lora_trainer.webui.job import MANAGER

    return MANAGER.stop


def _fail(message: str) -> Callable[[Any], Callable[[], None]]:
    return lambda host: _raise(RuntimeError(message))


def _oom(host) -> Callable[[], None]:
    return _raise(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def _enospc(host) -> Callable[[], None]:
    return _raise(OSError(errno.ENOSPC, "No space left on device"))


def _preview(p) -> bool:
    return "<lora:" not in p.prompt and "shapetok" in p.prompt and not getattr(p, "disable_extra_networks", False)


def _check_with_lora(p) -> bool:
    return "<lora:" in p.prompt


# (case, fault, expected state, a fragment of the status's error/message[, config overrides])
CASES: list[tuple[Any, ...]] = [
    ("finished", None, "finished", ""),
    ("cancelled-caching", _host_vae(1, _cancel_button), "cancelled", ""),
    ("interrupted-caching", _host_vae(2, _interrupt), "cancelled", ""),
    ("interrupted-training", _host_unet(2, _interrupt), "cancelled", ""),
    ("cancelled-training", _host_unet(3, _cancel_button), "cancelled", ""),
    ("interrupted-preview", _host_render(_preview, _interrupt), "cancelled", ""),
    ("interrupted-save", _save_fault(_interrupt), "cancelled", "", {"save_every_n_steps": 1}),
    ("interrupted-final-save", _save_fault(_interrupt), "finished", ""),  # every step was trained: the file is whole
    ("interrupted-check", _host_render(_check_with_lora, _interrupt), "finished", ""),
    ("oom-backed-off", _host_unet(1, _oom), "finished", ""),  # batch 2 -> 1, same samples per step
    ("oom-training", _host_unet(1, _oom, every=True), "failed", "out of GPU memory even at batch size 1"),
    ("failed-prepare", _our_step("lora_trainer.webui.bundle.WebUIBundle", "prepare", _fail("in prepare")),
     "failed", "in prepare"),
    ("failed-network", _our_step("lora_trainer.train.Trainer", "_build_network", _fail("in network")),
     "failed", "in network"),
    ("failed-caching", _host_vae(2, _fail("in the VAE")), "failed", "in the VAE"),
    ("failed-training", _host_unet(3, _fail("in the UNet")), "failed", "in the UNet"),
    ("failed-preview", _host_render(_preview, _fail("in a preview")), "failed", "in a preview"),
    ("failed-save", _save_fault(_enospc), "failed", "No space left on device"),
    ("failed-state", _our_step("lora_trainer.train.Trainer", "_save_state", _fail("in save_state")),
     "failed", "in save_state"),
    ("failed-check", _host_render(_check_with_lora, _fail("in the check")), "failed", "in the check"),
]


@contextlib.contextmanager
def _fault(host, fault: Fault | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if fault is not None:
            fault(host, mp)
        yield


@pytest.mark.parametrize("case,fault,state,fragment,overrides", [(*c, {})[:5] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_exit_path_leaves_the_host_exactly_as_it_was(tmp_path, case, fault, state, fragment, overrides):
    with webui("sd1", str(tmp_path)) as host:
        host.shared.state.begin()
        host.shared.state.end()
        image_before = _txt2img(host)
        before = fingerprint(host)
        with _fault(host, fault):
            status = _run(_config(tmp_path, case.replace("-", "_"), **overrides))
        after = fingerprint(host)
        assert status.state == state, (status.state, status.error, status.message)
        assert fragment in (status.error or status.message or ""), status
        if state == "failed":
            assert "Traceback" not in (status.error or "")
        if state == "cancelled" and status.final_file:
            assert load_file(status.final_file), "the file saved on cancel does not load"
        assert not _diff(before, after), _diff(before, after)
        assert not _backups_hold_the_weights(host.model)
        assert _txt2img(host) == image_before, "txt2img on a fixed seed changed"

        # the next run starts and finishes normally, with nothing left over from the faulty one
        t = time.time()
        nxt = _run(_config(tmp_path, "next_run", max_train_steps=2, sample_every_n_steps=None, save_state=False))
        assert nxt.state == "finished", (nxt.error, time.time() - t)
        assert not _diff(before, fingerprint(host))


def test_the_fingerprint_sees_each_kind_of_change(tmp_path):
    """The comparison above can fail: every kind of leftover a run could leave is caught."""
    with webui("sd1", str(tmp_path)) as host:
        model = host.model
        p = next(model.parameters())
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        class_forward = type(linear).forward
        saved = p.detach().clone()
        changes: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
            ("params", lambda: p.data.view(-1)[0].add_(1.0), lambda: p.data.copy_(saved)),
            ("params", lambda: p.requires_grad_(not p.requires_grad), lambda: p.requires_grad_(not p.requires_grad)),
            ("modules", lambda: setattr(linear, "forward", linear.forward), lambda: linear.__dict__.pop("forward")),
            ("modules", lambda: linear.train(not linear.training), lambda: linear.train(not linear.training)),
            ("modules", lambda: setattr(linear, "_h", linear.register_forward_hook(lambda *a: None)),
             lambda: linear.__dict__.pop("_h").remove()),
            ("modules", lambda: setattr(type(linear), "forward", lambda self, x: x),
             lambda: setattr(type(linear), "forward", class_forward)),
            ("opts", lambda: host.shared.opts.data.__setitem__("lora_trainer_test", 7),
             lambda: host.shared.opts.data.pop("lora_trainer_test")),
            ("rng", lambda: torch.rand(1), lambda: None),
        ]
        for key, do, undo in changes:
            snapshot = fingerprint(host)
            do()
            try:
                assert any(line.startswith(key) for line in _diff(snapshot, fingerprint(host))), key
            finally:
                undo()
            assert not _diff(snapshot, fingerprint(host)) or key == "rng", key
