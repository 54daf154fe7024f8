"""modules/sd_unet.py: apply_unet("None") turns a custom UNet off; apply_unet() re-applies the setting."""

current_unet_option = None
calls = []


def apply_unet(option=None):
    calls.append(option)
