"""Buckets, step arithmetic, captions, images and dataset scanning: pure maths as properties, files as tables."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_trainer.data.buckets import BucketPlanner, ExtremeAspect, ImageTooSmall, make_bucket_resolutions
from lora_trainer.data.captions import (
    CaptionOptions,
    find_caption,
    format_tag_file,
    process_caption,
    read_caption_file,
    tag_frequency,
)
from lora_trainer.data.dataset import balance_reg, build_dataset
from lora_trainer.data.images import UnreadableImage, image_size, load_rgb
from lora_trainer.errors import UserError
from lora_trainer.steps import plan_steps

sides = st.sampled_from([256, 320, 384, 448, 512, 576, 640, 768, 832, 896, 1024])
images = st.tuples(st.integers(16, 4000), st.integers(16, 4000))


@settings(max_examples=200, deadline=None)
@given(res=sides, steps=st.sampled_from([8, 16, 32, 64]), size=images)
def test_bucket_placement_properties(res, steps, size):
    min_reso, max_reso = 256, 2048
    assume(min_reso % steps == 0)
    planner = BucketPlanner((res, res), True, min_reso, max_reso, steps, False)
    ratio = size[0] / size[1]
    try:
        p = planner.place(*size)
    except ExtremeAspect:  # only when even the closest bucket would crop away more than half of the image
        w, h = min(planner.buckets, key=lambda b: abs(b[0] / b[1] - ratio))
        assert min(w / h, ratio) / max(w / h, ratio) < 0.5 + 1e-6
        return
    assert p.kept_fraction >= 0.5
    bw, bh = p.bucket
    assert p.bucket in planner.buckets  # each image lands in exactly one of the predefined buckets
    assert bw % steps == 0 and bh % steps == 0
    assert min_reso <= bw <= max_reso and min_reso <= bh <= max_reso
    assert bw * bh <= res * res
    assert p.resized[0] >= bw and p.resized[1] >= bh  # covers the bucket, then is cropped
    assert p.resized[0] == bw or p.resized[1] == bh  # one side fits exactly
    left, top, right, bottom = p.crop_box(random.Random(0))
    assert left >= 0 and top >= 0 and right <= p.resized[0] and bottom <= p.resized[1]
    # no bucket has a closer aspect ratio than the chosen one
    best = min(abs(w / h - ratio) for w, h in planner.buckets)
    assert abs(bw / bh - ratio) == pytest.approx(best)


@settings(max_examples=200, deadline=None)
@given(res=sides, steps=st.sampled_from([32, 64]), size=images)
def test_no_upscale_never_enlarges(res, steps, size):
    planner = BucketPlanner((res, res), True, 256, 2048, steps, True)
    try:
        p = planner.place(*size)
    except ImageTooSmall:
        assert min(size) < steps * 2 or min(size) * res < steps * max(size)
        return
    assert p.resized[0] <= size[0] + 1 and p.resized[1] <= size[1] + 1
    assert p.bucket[0] % steps == 0 and p.bucket[1] % steps == 0
    assert p.bucket[0] * p.bucket[1] <= res * res + 1
    assert p.bucket[0] <= p.resized[0] and p.bucket[1] <= p.resized[1]


def test_bucket_resolutions_match_kohyas_table_for_512():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (640, 384) in buckets and (384, 640) in buckets
    assert all(w * h <= 512 * 512 for w, h in buckets)


def test_without_buckets_every_image_is_cropped_to_the_resolution():
    planner = BucketPlanner((512, 768), False)
    for size in [(100, 100), (1000, 1000), (512, 768), (900, 1000)]:
        p = planner.place(*size)
        assert p.bucket == (512, 768) and p.resized[0] >= 512 and p.resized[1] >= 768
    with pytest.raises(ExtremeAspect, match="3000x1000.*enable_bucket"):
        planner.place(3000, 1000)  # a 3:1 image cropped to 2:3 would keep a fifth of itself


@given(images=st.integers(1, 500), repeats=st.integers(1, 50), batch=st.integers(1, 32), accum=st.integers(1, 8),
       epochs=st.one_of(st.none(), st.integers(1, 50)), max_steps=st.integers(1, 5000), buckets=st.integers(1, 6))
def test_step_arithmetic_properties(images, repeats, batch, accum, epochs, max_steps, buckets):
    samples = images * repeats
    buckets = min(buckets, samples)
    per_bucket = [samples // buckets + (1 if i < samples % buckets else 0) for i in range(buckets)]
    batches = sum(math.ceil(n / batch) for n in per_bucket)
    plan = plan_steps(num_images=images, num_train_images=samples, num_reg_images=0, batches_per_epoch=batches,
                      batch_size=batch, gradient_accumulation_steps=accum, max_train_epochs=epochs,
                      max_train_steps=max_steps, num_buckets=buckets)
    assert plan.steps_per_epoch == math.ceil(batches / accum)
    assert math.ceil(samples / batch) <= batches <= math.ceil(samples / batch) + buckets - 1
    if epochs is not None:
        assert plan.total_steps == epochs * plan.steps_per_epoch and plan.epochs == epochs
    else:
        assert plan.total_steps == max_steps
        assert (plan.epochs - 1) * plan.steps_per_epoch < max_steps <= plan.epochs * plan.steps_per_epoch
    assert f"= {plan.total_steps} steps" in plan.explain()


# -- captions ------------------------------------------------------------------------------------------------


@given(tags=st.lists(st.text("abcdefgh ", min_size=1, max_size=8).map(str.strip).filter(bool), min_size=1,
                     max_size=12, unique=True), keep=st.integers(0, 4), seed=st.integers(0, 1000))
def test_shuffle_keeps_the_first_tags_and_permutes_the_rest(tags, keep, seed):
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=keep)
    out = process_caption(", ".join(tags), opts, random.Random(seed), epoch=1).split(", ")
    assert out[:keep] == tags[:keep]
    assert sorted(out) == sorted(tags)


def test_tag_dropout_never_drops_kept_tags_and_caption_dropout_empties():
    rng = random.Random(0)
    opts = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("trigger, a, b, c", opts, rng, 1) == "trigger"
    assert process_caption("x, y", CaptionOptions(caption_dropout_rate=1.0), rng, 1) == ""
    every3 = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert [process_caption("x", every3, rng, e) for e in (1, 2, 3, 6)] == ["x", "x", "", ""]


def test_keep_tokens_separator_fixes_head_and_tail():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    for seed in range(5):
        out = process_caption("a, b ||| c, d, e ||| f", opts, random.Random(seed), 1).split(", ")
        assert out[:2] == ["a", "b"] and out[-1] == "f" and sorted(out[2:-1]) == ["c", "d", "e"]


def test_caption_files_encodings_and_fallback_order(tmp_path, caplog):
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    assert find_caption(str(img), ".txt") == (None, None)
    (tmp_path / "x.caption").write_bytes("\ufeffcaption file, ü".encode())
    assert find_caption(str(img), ".txt")[0] == "caption file, ü"  # falls back to .caption, BOM stripped
    (tmp_path / "x.txt").write_bytes("caf\xe9".encode("cp1252"))
    assert find_caption(str(img), ".txt")[0] == "café"
    assert "not UTF-8" in caplog.text
    (tmp_path / "x.tags").write_text("tagged")
    assert find_caption(str(img), ".tags")[0] == "tagged"
    (tmp_path / "y.txt").write_text("  \r\nsecond line\r\n")
    assert read_caption_file(str(tmp_path / "y.txt")) == "second line"


def test_tag_frequency_counts_lowercased_tags():
    assert tag_frequency(["A, b", "a, c, ", "B"]) == {"a": 2, "b": 2, "c": 1}
    text = format_tag_file({"x": {"b": 1, "a": 3}, "y": {"b": 4}}, alphabetical=False)
    assert text.splitlines()[1:] == ["5\tb", "3\ta"]
    assert format_tag_file({"x": {"b": 1, "a": 3}}, alphabetical=True).splitlines()[1:] == ["3\ta", "1\tb"]


# -- images --------------------------------------------------------------------------------------------------


def _save(path, img, **kw):
    img.save(path, **kw)
    return str(path)


def test_every_mode_becomes_rgb(tmp_path):
    cases = {
        "gray.png": Image.new("L", (10, 6), 128),
        "bw.png": Image.new("1", (10, 6), 1),
        "pal.png": Image.new("P", (10, 6), 3),
        "rgba.png": Image.new("RGBA", (10, 6), (255, 0, 0, 0)),
        "la.png": Image.new("LA", (10, 6), (0, 255)),
        "cmyk.jpg": Image.new("CMYK", (10, 6), (0, 255, 255, 0)),
        "i16.png": Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16)),
        "x.webp": Image.new("RGB", (10, 6), (1, 2, 3)),
    }
    for name, img in cases.items():
        out = load_rgb(_save(tmp_path / name, img))
        assert out.mode == "RGB" and out.size == (10, 6), name
    assert load_rgb(str(tmp_path / "rgba.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> background
    assert load_rgb(str(tmp_path / "i16.png")).getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white


def test_exif_rotation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    path = _save(tmp_path / "rot.jpg", img, exif=exif)
    assert image_size(path) == (20, 40)
    assert load_rgb(path).size == (20, 40)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
])
def test_unreadable_images_raise_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        image_size(str(path))


def test_truncated_image_is_reported(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(str(path))


# -- dataset -------------------------------------------------------------------------------------------------


def _folder(root, name, n, size=(64, 64), caption=None):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20 % 255, 0, 0)).save(os.path.join(d, f"{i}.png"))
        if caption is not None:
            with open(os.path.join(d, f"{i}.txt"), "w") as f:
                f.write(caption)
    return d


def test_kohya_folders_repeats_captions_and_skips(tmp_path, caplog):
    train = tmp_path / "train"
    _folder(train, "3_mychar", 4, caption="mychar, smiling")
    _folder(train, "1_other thing", 2)  # no captions: the folder's class name is the caption
    _folder(train, "notrepeats", 2)
    (train / "3_mychar" / "broken.jpg").write_bytes(b"nope")
    (train / "3_mychar" / "orphan.txt").write_text("lonely")
    planner = BucketPlanner((64, 64), True, 64, 128, 64)
    ds = build_dataset(str(train), "", planner, ".txt")
    assert len(ds.train_items) == 6 and ds.num_train_images == 4 * 3 + 2
    assert {i.caption for i in ds.items} == {"mychar, smiling", "other thing"}
    assert ds.report.captions_from_folder == 2 and len(ds.report.skipped) == 1
    assert "broken.jpg" in ds.report.skipped[0][0] and ds.report.ignored_folders[0].endswith("notrepeats")
    assert ds.report.orphan_captions[0].endswith("orphan.txt")
    assert "N_name" in caplog.text


def test_regularisation_images_are_balanced_to_the_training_count(tmp_path):
    _folder(tmp_path / "train", "5_a", 4)
    _folder(tmp_path / "reg", "1_person", 3)
    ds = build_dataset(str(tmp_path / "train"), str(tmp_path / "reg"), BucketPlanner((64, 64)), ".txt")
    assert ds.num_train_images == 20 and ds.num_reg_images == 20


@given(repeats=st.lists(st.integers(1, 5), min_size=1, max_size=6), reg=st.lists(st.integers(1, 5), min_size=1,
                                                                                     max_size=6))
def test_balance_reg_property(repeats, reg):
    class S:
        def __init__(self, n): self.num_repeats = n

    class It:
        def __init__(self, n): self.subset, self.repeats = S(n), n

    train, regs = [It(n) for n in repeats], [It(n) for n in reg]
    balance_reg(train, regs)
    total = sum(t.repeats for t in train)
    got = sum(r.repeats for r in regs)
    assert total <= got < total + max(reg)  # only the first pass (whole repeats) can overshoot


def test_epoch_batches_are_single_bucket_deterministic_and_cover_every_repeat(tmp_path):
    train = tmp_path / "train"
    _folder(train, "2_wide", 3, size=(128, 64))
    _folder(train, "3_square", 5, size=(64, 64))
    ds = build_dataset(str(train), "", BucketPlanner((64, 64), True, 64, 128, 64), ".txt")
    batches = ds.epoch_batches(0, 2, seed=1)
    assert batches == ds.epoch_batches(0, 2, seed=1) and batches != ds.epoch_batches(1, 2, seed=1)
    assert all(len({ds.items[i].placement.bucket for i in b}) == 1 for b in batches)
    counts = {}
    for b in batches:
        for i in b:
            counts[i] = counts.get(i, 0) + 1
    assert all(counts[i] == it.repeats for i, it in enumerate(ds.items))
    assert len(batches) == ds.batches_per_epoch(2)


def test_no_usable_image_is_an_error_naming_the_folder(tmp_path):
    d = tmp_path / "train" / "2_x"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no usable image"):
        build_dataset(str(tmp_path / "train"), "", BucketPlanner((64, 64)), ".txt")
    with pytest.raises(UserError, match="folder not found"):
        build_dataset(str(tmp_path / "nope"), "", BucketPlanner((64, 64)), ".txt")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="N_name"):
        build_dataset(str(tmp_path / "flat"), "", BucketPlanner((64, 64)), ".txt")
