"""modules/images.py: save_image (PNG with the infotext in the `parameters` chunk)."""

import os

from PIL import PngImagePlugin


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    os.makedirs(path, exist_ok=True)
    name = forced_filename or f"{basename}-{seed}"
    fullfn = os.path.join(path, f"{name}{suffix}.{extension}")
    meta = PngImagePlugin.PngInfo()
    if info:
        meta.add_text(pnginfo_section_name, info)
    image.save(fullfn, pnginfo=meta)
    return fullfn, None
