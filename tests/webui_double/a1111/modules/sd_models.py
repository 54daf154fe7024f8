"""modules/sd_models.py: model_data, checkpoint aliases and reload_model_weights (a no-op here)."""

import types

model_data = types.SimpleNamespace(sd_model=None)
checkpoint_aliases = {}
reloads = []  # every reload request, for tests


def reload_model_weights(sd_model=None, info=None):
    reloads.append(info)
    return model_data.sd_model
