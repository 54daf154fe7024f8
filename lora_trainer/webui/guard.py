"""Keeping the WebUI's model exactly as it was.

`HostGuard` refuses setups training cannot work in (--lowvram, fp8 weight storage, --medvram without the caches it
needs), clears what the user's last generation left merged into the weights by the built-in Lora extension, turns
off model-wide toggles that would change training (a custom UNet, circular padding), and on exit restores the RNG,
those toggles, every parameter's device/dtype/requires_grad, every module's training flag, and checks that no
instance `forward` or hook was left behind. It is a context manager: the restore runs whether training finished,
was cancelled or failed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from . import host

log = logging.getLogger(__name__)


def refusals(model: Any, cfg: TrainConfig) -> list[str]:
    """Why training cannot run on this host setup (empty when it can)."""
    cmd = host.cmd_opts()
    problems = []
    if getattr(cmd, "lowvram", False):
        problems.append("the WebUI runs with --lowvram, which moves every UNet block to the CPU between calls; "
                        "training needs the UNet on the GPU: restart the WebUI without --lowvram (--medvram works "
                        "with cached latents and text-encoder outputs)")
    medvram = getattr(cmd, "medvram", False) or (getattr(cmd, "medvram_sdxl", False)
                                                  and getattr(model, "is_sdxl", False))
    if medvram and not (cfg.network_train_unet_only and cfg.cache_latents and cfg.cache_text_encoder_outputs):
        problems.append("with --medvram the text encoder and VAE leave the GPU whenever the UNet runs: set "
                        "network_train_unet_only, cache_latents and cache_text_encoder_outputs (or restart without "
                        "--medvram)")
    if _fp8_weights(model):
        problems.append("the model's weights are stored in fp8 (Settings > Optimizations > FP8 weight): training "
                        "needs fp16/fp32 weights; set FP8 weight to Disable and reload the model")
    return problems


def _fp8_weights(model: Any) -> bool:
    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    return any(p.dtype in fp8 for p in model.model.diffusion_model.parameters())


class HostGuard:
    def __init__(self, model: Any):
        self.m = model
        self._params: list[tuple[nn.Parameter, torch.device, torch.dtype, bool]] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._forwards: set[int] = set()
        self._hooks = 0
        self._rng: tuple[Any, Any] | None = None
        self._parallel = True

    def __enter__(self) -> HostGuard:
        self._snapshot()
        self._clear_lora_state()
        self._neutralise_toggles()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    # ----------------------------------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        self._params = [(p, p.device, p.dtype, p.requires_grad) for p in self.m.parameters()]
        modules = list(self.m.modules())
        self._modes = [(m, m.training) for m in modules]
        self._forwards = {id(m) for m in modules if "forward" in m.__dict__}
        self._hooks = _hook_count(modules)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._rng = (torch.get_rng_state(), cuda)
        self._parallel = host.shared().parallel_processing_allowed

    def _clear_lora_state(self) -> None:
        """Undo any network the built-in Lora extension merged into the weights for the last generation."""
        networks = host.lora_networks()
        mapping = getattr(self.m, "network_layer_mapping", None)
        if networks is None or mapping is None:
            return
        networks.loaded_networks.clear()
        with torch.no_grad():
            for module in mapping.values():
                if getattr(module, "network_current_names", ()) != ():
                    networks.network_restore_weights_from_backup(module)
                    module.network_current_names = ()

    def _neutralise_toggles(self) -> None:
        try:
            host.mod("sd_unet").apply_unet("None")  # a TensorRT/ONNX UNet would bypass the real one
        except (ImportError, AttributeError) as e:
            log.debug("sd_unet not available: %s", e)
        try:
            host.mod("sd_hijack").model_hijack.apply_circular(False)  # left on by a Tiling generation
        except (ImportError, AttributeError) as e:
            log.debug("sd_hijack not available: %s", e)

    def _restore(self) -> None:
        self._clear_lora_state()  # the end-of-run check loaded our file through the Lora extension
        cpu, cuda = self._rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        host.shared().parallel_processing_allowed = self._parallel
        with torch.no_grad():
            for p, device, dtype, flag in self._params:
                if p.device != device or p.dtype != dtype:
                    p.data = p.data.to(device, dtype)
                p.requires_grad_(flag)
        for m, training in self._modes:
            m.training = training
        try:
            host.mod("sd_unet").apply_unet()
        except (ImportError, AttributeError) as e:
            log.debug("sd_unet not available: %s", e)
        self._verify()

    def _verify(self) -> None:
        modules = list(self.m.modules())
        leftover = [type(m).__name__ for m in modules if "forward" in m.__dict__ and id(m) not in self._forwards]
        if leftover:
            log.error("%d module(s) still have an instance forward after training (%s); reload the checkpoint",
                      len(leftover), ", ".join(sorted(set(leftover))[:5]))
        if _hook_count(modules) != self._hooks:
            log.error("the number of module hooks changed during training (%d -> %d)", self._hooks,
                      _hook_count(modules))


def _hook_count(modules: list[nn.Module]) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in modules)


def check(model: Any, cfg: TrainConfig) -> None:
    problems = refusals(model, cfg)
    if problems:
        raise UserError("cannot train on the loaded model: " + "; ".join(problems))
