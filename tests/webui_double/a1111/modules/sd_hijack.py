"""modules/sd_hijack.py: model_hijack.apply_circular (padding mode of every Conv2d)."""

import torch


class _Hijack:
    circular_enabled = False

    def apply_circular(self, enable):
        from modules import shared

        if self.circular_enabled == enable:
            return
        self.circular_enabled = enable
        model = shared.sd_model
        for layer in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]:
            layer.padding_mode = "circular" if enable else "zeros"


model_hijack = _Hijack()
