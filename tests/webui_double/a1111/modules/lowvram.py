"""modules/lowvram.py."""


def is_enabled(sd_model):
    return bool(getattr(sd_model, "lowvram", False))
