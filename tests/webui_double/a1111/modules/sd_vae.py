"""modules/sd_vae.py: the loaded VAE's name (None = the checkpoint's own)."""

loaded_vae_file = None


def get_loaded_vae_name():
    import os

    return os.path.basename(loaded_vae_file) if loaded_vae_file else None


def reload_vae_weights(sd_model=None, vae_file=None):
    pass
