"""A small synthetic captioned dataset (coloured shapes), for the demo, the benchmark and the tests."""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(size: tuple[int, int], shape: str, color: str, background: str, rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, COLORS[background])
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLORS[color])
    return img


def make_dataset(root: str, *, images: int = 8, repeats: int = 4, size: int = 64, seed: int = 0,
                 trigger: str = "shapetok", aspect_variety: bool = True, reg_images: int = 0) -> str:
    """Write `root/<repeats>_<trigger>/NNN.png` + `.txt` captions (and `root_reg/1_shape/` when reg_images > 0).

    Returns the train_data_dir. Captions look like "shapetok, red circle, blue background".
    """
    rng = random.Random(seed)
    folder = os.path.join(root, f"{repeats}_{trigger}")
    os.makedirs(folder, exist_ok=True)
    colors = list(COLORS)
    for i in range(images):
        shape = SHAPES[i % len(SHAPES)]
        color, background = rng.sample(colors, 2)
        wh = (size, size)
        if aspect_variety and i % 4 == 3:
            wh = (size * 2, size) if i % 8 == 3 else (size, size * 2)
        draw_shape(wh, shape, color, background, rng).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"{trigger}, {color} {shape}, {background} background")
    if reg_images:
        reg = os.path.join(root + "_reg", "1_shape")
        os.makedirs(reg, exist_ok=True)
        for i in range(reg_images):
            color, background = rng.sample(colors, 2)
            draw_shape((size, size), SHAPES[i % len(SHAPES)], color, background, rng).save(
                os.path.join(reg, f"{i:03d}.png"))
    return root
