"""Bad input gets a clear answer and loses nothing: a generated dataset with every kind of broken or unusual file,
configs and paths that cannot work, a full disk and an internal error, each checked for its message, the exit
status, the summary counts and the absence of half-written files."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image, features
from safetensors.torch import load_file

from lora_trainer import cli
from lora_trainer.data.buckets import BucketPlanner
from lora_trainer.data.dataset import build_dataset
from lora_trainer.data.images import load_image

RES = ["--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "64"]


def _rgb(w=64, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, shown rotated by 90 degrees: 48x64
    return _save(_rgb(64, 48), "JPEG", exif=exif)


def _deep_png() -> bytes:
    return _save(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), "PNG")


def _palette_alpha() -> bytes:
    img = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(img, "PNG", transparency=0)


# file name -> (bytes, expected: a reason fragment for skipped files, or None for files that must train)
CASES = {
    "empty.png": (b"", "file is empty (0 bytes)"),
    "truncated.jpg": (_save(_rgb(seed=1), "JPEG", quality=95)[:900], "truncated"),
    "text.png": (b"this is not an image\n", "not an image Pillow can read"),
    "unsupported.jxl": (b"\xff\x0a" + bytes(200), "not an image Pillow can read"),
    "wide.png": (_save(_rgb(640, 40), "PNG"), "would lose"),
    "gray.png": (_save(_rgb().convert("L"), "PNG"), None),
    "binary.png": (_save(_rgb().convert("1"), "PNG"), None),
    "palette.png": (_save(_rgb().convert("P"), "PNG"), None),
    "palette_alpha.png": (_palette_alpha(), None),
    "rgba.png": (_save(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG"), None),
    "la.png": (_save(_rgb().convert("LA"), "PNG"), None),
    "cmyk.jpg": (_save(_rgb().convert("CMYK"), "JPEG"), None),
    "deep.png": (_deep_png(), None),
    "rotated.jpg": (_rotated_jpeg(), None),
    "small.png": (_save(_rgb(24, 24), "PNG"), None),  # enlarged with a warning (bucket_no_upscale is off)
}
if features.check_module("webp"):
    CASES["photo.webp"] = (_save(_rgb(seed=2), "WEBP"), None)
if "avif" in features.modules and features.check_module("avif"):  # Pillow 11.2+ built with libavif
    CASES["photo.avif"] = (_save(_rgb(seed=3), "AVIF"), None)

CAPTIONS = {  # caption file -> bytes; the images for the first three are good PNGs
    "bom.txt": "\ufeffbom caption, red".encode(),
    "latin.txt": "café au lait".encode("cp1252"),
    "blank.txt": b"",
    "orphan.txt": b"a caption without its image",
}
SKIPPED = {n: why for n, (_, why) in CASES.items() if why}


def make_bad_dataset(root) -> str:
    folder = root / "train" / "2_shapetok"
    folder.mkdir(parents=True)
    for name, (data, _) in CASES.items():
        (folder / name).write_bytes(data)
    for name, data in CAPTIONS.items():
        (folder / name).write_bytes(data)
        if name != "orphan.txt":
            (folder / f"{name[:-4]}.png").write_bytes(_save(_rgb(seed=len(name)), "PNG"))
    (root / "train" / "not_a_repeat_folder").mkdir()
    return str(root / "train")


def test_every_bad_or_unusual_file_is_skipped_or_used_as_documented(tmp_path, caplog):
    root = make_bad_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(root, "", BucketPlanner((64, 64), True, 64, 128, 64), ".txt")
    report = ds.report
    skipped = {os.path.basename(p): why for p, why in report.skipped}
    assert set(skipped) == set(SKIPPED)
    for name, fragment in SKIPPED.items():
        assert fragment in skipped[name] and name in skipped[name]
        assert sum(name in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records) == 1, name
    used = {os.path.basename(i.path): i for i in ds.items}
    assert set(used) == {n for n, (_, why) in CASES.items() if not why} | {"bom.png", "latin.png", "blank.png"}
    assert used["rotated.jpg"].size == (48, 64)  # EXIF orientation honoured
    assert used["bom.png"].caption == "bom caption, red"
    assert used["latin.png"].caption == "café au lait"
    assert used["blank.png"].caption == "shapetok" and report.empty_captions  # folder's class tokens
    assert [os.path.basename(p) for p in report.orphan_captions] == ["orphan.txt"]
    assert [os.path.basename(p) for p, _ in report.upscaled] == ["small.png"]
    assert report.ignored_folders and report.ignored_folders[0].endswith("not_a_repeat_folder")
    messages = " ".join(r.getMessage() for r in caplog.records)
    for fragment in ("latin.txt is not UTF-8", "blank.txt is empty", "orphan.txt has no image", "small.png: 24x24"
                     " is enlarged", "not_a_repeat_folder"):
        assert fragment in messages


@pytest.mark.parametrize("name", [n for n, (_, why) in CASES.items() if not why])
def test_usable_files_decode_to_8bit_rgb(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(CASES[name][0])
    rgb, alpha = load_image(str(path), background=(0, 0, 255), keep_alpha=True)
    assert rgb.mode == "RGB"
    if name == "rgba.png":  # fully transparent red: the background shows, the alpha becomes the mask
        assert rgb.getpixel((5, 5)) == (0, 0, 255) and alpha is not None and alpha.getextrema() == (0, 0)
    if name == "deep.png":
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # 16-bit white is white, not clipped noise
    if name in ("gray.png", "cmyk.jpg", "rotated.jpg"):
        assert alpha is None


def test_bucket_no_upscale_skips_images_smaller_than_a_bucket(tmp_path):
    root = make_bad_dataset(tmp_path)
    ds = build_dataset(root, "", BucketPlanner((64, 64), True, 64, 128, 64, no_upscale=True), ".txt")
    skipped = {os.path.basename(p): why for p, why in ds.report.skipped}
    assert "small.png" in skipped and "bucket_no_upscale" in skipped["small.png"]
    assert not ds.report.upscaled


def test_a_bad_dataset_trains_with_a_summary_of_what_was_skipped(tmp_path, capsys):
    root = make_bad_dataset(tmp_path)
    out = tmp_path / "out"
    code = cli.main(["train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", root,
                     "--output_dir", str(out), "--output_name", "bad", "--max_train_steps", "1",
                     "--train_batch_size", "2", "--network_dim", "2", "--seed", "1", *RES, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    data = summary["dataset"]
    assert data["skipped_images"] == len(SKIPPED) and data["upscaled_images"] == 1
    assert data["empty_caption_files"] == 1 and data["caption_files_without_image"] == 1
    assert {os.path.basename(s["path"]) for s in data["skipped"]} == set(SKIPPED)
    assert os.path.isfile(summary["final_file"])
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_no_usable_image_refuses_to_start_and_names_the_folder(tmp_path, capsys):
    folder = tmp_path / "train" / "3_broken"
    folder.mkdir(parents=True)
    for name in ("empty.png", "text.png", "truncated.jpg"):
        (folder / name).write_bytes(CASES[name][0])
    out = tmp_path / "out"
    code = cli.main(["train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir",
                     str(tmp_path / "train"), "--output_dir", str(out), *RES])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"no usable image in {tmp_path / 'train'}" in err and "3 skipped" in err
    assert not out.exists() or not [n for n in os.listdir(out) if n.endswith(".safetensors")]


@pytest.mark.parametrize("args,fragments", [
    (["--network_dim", "abc"], ["network_dim", "'abc'"]),
    (["--network_dim", "0"], ["network_dim: 0 is out of range"]),
    (["--learning_rate", "-1"], ["learning_rate: -1", "out of range"]),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], ["both true"]),
    (["--output_name", "a/b"], ["output_name: 'a/b' contains '/'"]),
    (["--output_name", ".."], ["output_name: '..' is not a usable file name"]),
    (["--output_name", "CON"], ["output_name: 'CON' is not a usable file name"]),
    (["--output_name", "x:y"], ["output_name: 'x:y' contains ':'"]),
    (["--alpha_background", "plaid"], ["alpha_background: 'plaid' is not a colour"]),
    (["--mixed_precision", "fp8"], ["mixed_precision: 'fp8' is not one of"]),
])
def test_config_errors_name_the_field_and_value(tmp_path, capsys, args, fragments):
    code = cli.main(["train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path),
                     "--output_dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_unknown_json_keys_are_listed_with_the_nearest_name(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"netwrok_dim": 4, "learning_rat": 1e-4}))
    assert cli.main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "netwrok_dim" in err and "network_dim" in err and "learning_rat" in err and "learning_rate" in err


@pytest.mark.parametrize("args,warning", [
    (["--network_module", "ia3", "--conv_dim", "4"], "conv_dim/conv_alpha have no effect with IA3"),
    (["--optimizer_type", "Prodigy", "--learning_rate", "1e-4"], "expects learning rates around 1.0"),
])
def test_questionable_settings_warn_but_run(tmp_path, dataset_dir, caplog, args, warning):
    with caplog.at_level(logging.WARNING):
        code = cli.main(["train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", dataset_dir,
                         "--output_dir", str(tmp_path), "--save_json_only", *RES, *args])
    assert code == 0
    assert warning in caplog.text


def _train_args(dataset_dir, out, *more):
    return ["train", "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", dataset_dir, "--output_dir",
            str(out), "--output_name", "run", "--max_train_steps", "3", "--network_dim", "2", "--seed", "2", *RES,
            *more]


def test_an_output_dir_that_cannot_be_created_is_refused(tmp_path, dataset_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(_train_args(dataset_dir, blocker / "sub")) == 2
    assert f"output_dir: cannot create {blocker / 'sub'}" in capsys.readouterr().err


def test_too_little_free_space_is_refused_before_training(tmp_path, dataset_dir, capsys, monkeypatch):
    from lora_trainer import diskspace

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 10 * 2**20, 10 * 2**20))
    assert cli.main(_train_args(dataset_dir, tmp_path / "o", "--save_every_n_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "3 network file(s)" in err and "only 10 MB is free" in err
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith(".safetensors")]


def test_a_full_disk_mid_run_keeps_the_earlier_saves(tmp_path, dataset_dir, capsys, monkeypatch):
    from lora_trainer import fileio
    from lora_trainer.networks import export

    real, calls = export.atomic_write_bytes, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second save runs out of space half-way through
            with fileio.atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(export, "atomic_write_bytes", full_disk)
    out = tmp_path / "o"
    assert cli.main(_train_args(dataset_dir, out, "--save_every_n_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run-step00000001.safetensors" in err and "Traceback" not in err
    files = sorted(os.listdir(out))
    assert "run-step00000001.safetensors" in files and "run-step00000002.safetensors" not in files
    assert not [n for n in files if n.startswith(".tmp-")]
    assert load_file(str(out / "run-step00000001.safetensors"))  # the earlier save is whole


def test_an_internal_error_shows_the_traceback_and_where_the_log_is(tmp_path, dataset_dir, capsys, monkeypatch,
                                                                     caplog):
    from lora_trainer.train import Trainer

    def broken(self, pos):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(Trainer, "_train_loop", broken)
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        assert cli.main(_train_args(dataset_dir, out)) == 1
    log_file = out / "logs" / "run.log"
    assert f"the full log is in {log_file}" in caplog.text and "injected bug" in caplog.text
    assert "Traceback" in log_file.read_text() and "injected bug" in log_file.read_text()
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]
