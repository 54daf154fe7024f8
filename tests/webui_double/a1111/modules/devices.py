"""modules/devices.py: the device and dtype globals (a CPU run with --no-half)."""

import contextlib

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
force_fp16 = False


def autocast(disable=False):
    if disable or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
