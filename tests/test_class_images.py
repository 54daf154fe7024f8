"""Class images generated for prior preservation: on the standalone tiny backend and on the WebUI double, matched to
the instance images' buckets, reused on the next run, an interrupted generation keeps whole images only, and the
prior-preservation part of the loss is logged."""

from __future__ import annotations

import json
import os

from PIL import Image

from lora_trainer.train import Progress, TrainCallbacks, train

from .conftest import base_config, tiny_bundle
from .test_concepts import _images

SIZES = [(64, 64), (64, 64), (128, 64)]  # at resolution 96 (buckets 64x64, 64x128, 128x64): two buckets


def _concepts(tmp_path, per=1, sizes=SIZES) -> str:
    folder = _images(tmp_path / "data" / "ohwx", sizes, ["ohwx man, red", "ohwx man, blue", "ohwx man, wide"])
    path = tmp_path / "data" / "concepts.json"
    path.write_text(json.dumps([{
        "instance_data_dir": os.path.basename(folder), "class_data_dir": "class", "instance_prompt": "[filewords]",
        "class_prompt": "[filewords]", "instance_token": "ohwx", "class_token": "man", "num_class_images_per": per,
        "class_infer_steps": 2, "class_guidance_scale": 5.0, "class_negative_prompt": "blurry",
        "save_sample_prompt": "[filewords]", "n_save_sample": 2, "sample_seed": 9, "save_infer_steps": 2}]))
    return str(path)


def _config(tmp_path, concepts, **kw):
    values = dict(concepts_list=concepts, resolution="96", max_train_steps=4, overwrite=True,
                  sample_every_n_steps=4)
    values.update(kw)
    return base_config("", str(tmp_path / "out"), **values)


def _class_files(folder) -> dict[str, float]:
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def _run(cfg, stop_after=None):
    phases: list[Progress] = []

    def should_stop() -> bool:
        done = [p for p in phases if p.phase == "generating"]
        return stop_after is not None and bool(done) and done[-1].class_images_done >= stop_after
    result = train(cfg, tiny_bundle(), TrainCallbacks(on_progress=phases.append, should_stop=should_stop))
    return result, phases


def test_class_images_match_the_buckets_are_reused_and_the_prior_loss_is_logged(tmp_path):
    concepts = _concepts(tmp_path)
    class_dir = tmp_path / "data" / "class"
    result, phases = _run(_config(tmp_path, concepts))
    assert not result.stopped and result.final_file
    pngs = sorted(n for n in os.listdir(class_dir) if n.endswith(".png"))
    sizes = sorted(Image.open(class_dir / n).size for n in pngs)
    assert sizes == sorted(SIZES)  # one per instance image, each at its instance's bucket resolution
    for n in pngs:
        caption = (class_dir / n).with_suffix(".txt").read_text().strip()
        assert caption.startswith("man") and "ohwx" not in caption  # class prompt: the token swapped for the class
        assert "Negative prompt: blurry" in Image.open(class_dir / n).info["parameters"]
    generating = [p for p in phases if p.phase == "generating"]
    assert generating[-1].class_images_done == generating[-1].class_images_total == 3
    assert not any(n.startswith(".tmp-") for n in os.listdir(class_dir))
    assert result.plan.num_reg_images == 3

    lines = (tmp_path / "out" / "logs" / "t_metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any(r["loss/prior"] > 0 for r in records)
    assert all(abs(r["loss"] - r["loss/instance"] - r["loss/prior"]) < 1e-6 for r in records)
    samples = [os.path.basename(p) for p in result.samples]
    assert sum("_c1-0" in n for n in samples) == 2 and all(n.endswith("_9.png") for n in samples if "_c1-" in n)

    before = _class_files(class_dir)
    result2, phases2 = _run(_config(tmp_path, concepts, max_train_steps=1, sample_every_n_steps=None))
    assert not any(p.phase == "generating" for p in phases2)  # nothing missing: nothing generated
    assert _class_files(class_dir) == before and result2.plan.num_reg_images == 3


def test_an_interrupted_generation_keeps_whole_images_and_the_next_run_makes_the_rest(tmp_path):
    concepts = _concepts(tmp_path, per=2)
    class_dir = tmp_path / "data" / "class"
    result, _ = _run(_config(tmp_path, concepts), stop_after=2)
    assert result.stopped and result.final_file is None and result.steps == 0
    kept = _class_files(class_dir)
    assert len(kept) == 4 and all(n.endswith((".png", ".txt")) for n in kept)  # 2 images + 2 captions, no temp
    for n in kept:
        if n.endswith(".png"):
            Image.open(class_dir / n).load()  # whole, decodable files

    result, phases = _run(_config(tmp_path, concepts, max_train_steps=1, sample_every_n_steps=None))
    generating = [p for p in phases if p.phase == "generating"]
    assert generating[-1].class_images_total == 4  # only the rest: 6 wanted (3 images x 2), 2 already there
    after = _class_files(class_dir)
    assert len([n for n in after if n.endswith(".png")]) == 6 and all(after[n] == kept[n] for n in kept)
    assert not result.stopped and result.final_file  # (kohya balances the 6 class images to the 3 trained)


def test_a_kohya_reg_folder_is_filled_with_its_class_tokens(tmp_path):
    train_dir = tmp_path / "train"
    _images(train_dir / "2_ohwx", [(64, 64), (128, 64)], ["ohwx, a", "ohwx, b"])
    reg = tmp_path / "reg" / "1_a red square"
    reg.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(reg / "mine.png")  # one of the user's own: counted, kept
    cfg = base_config(str(train_dir), str(tmp_path / "out"), reg_data_dir=str(tmp_path / "reg"), resolution="96",
                      num_class_images_per=2, class_infer_steps=2, max_train_steps=2)
    result, phases = _run(cfg)
    assert not result.stopped
    made = sorted(n for n in os.listdir(reg) if n.startswith("class-"))
    assert made == ["class-128x64-00000.png", "class-128x64-00000.txt", "class-128x64-00001.png",
                    "class-128x64-00001.txt", "class-64x64-00001.png", "class-64x64-00001.txt"]
    assert (reg / "class-64x64-00001.txt").read_text().strip() == "a red square"
    assert result.plan.num_reg_images == 4


def test_dry_run_reports_the_class_images_it_would_make(tmp_path):
    cfg = _config(tmp_path, _concepts(tmp_path), save_json_only=True)
    result = train(cfg, tiny_bundle())
    with open(next(p for p in result.files if p.endswith("_steps.json"))) as f:
        info = json.load(f)
    assert info["class_images_to_generate"] == 3 and info["plan"]["num_reg_images"] == 3
    assert not os.path.exists(tmp_path / "data" / "class")


def test_on_the_webui_the_host_generates_them_with_a_forward_only_progress_bar(tmp_path):
    import pytest

    pytest.importorskip("tests.webui_double.models")
    from lora_trainer.webui.job import MANAGER

    from .webui_double.host import recording_state, webui

    concepts = _concepts(tmp_path, sizes=[(64, 64), (64, 64)])  # the double's UNet takes square latents only
    seen = []

    def progress(state, name, value):
        if name in ("job_no", "job_count") and state.job_count > 0 and MANAGER.job is not None:
            seen.append((min(state.job_no / state.job_count, 1.0), MANAGER.job.status.phase))
        if name == "textinfo" and MANAGER.job is not None and "class images" in str(value):
            seen.append((None, value))

    with webui("sd1", str(tmp_path / "webui")) as host, recording_state(host, progress):
        cfg = _config(tmp_path, concepts, output_dir="", output_name="webui_concepts", resolution="64")
        job = MANAGER.start(cfg)
        job.thread.join(600)
    status = job.status
    assert status.state == "finished", status.error
    class_dir = tmp_path / "data" / "class"
    sizes = sorted(Image.open(class_dir / n).size for n in os.listdir(class_dir) if n.endswith(".png"))
    assert sizes == [(64, 64), (64, 64)]
    assert "Steps: 2" in Image.open(next(class_dir.glob("*.png"))).info["parameters"]  # the WebUI's infotext
    fractions = [f for f, _ in seen if f is not None]
    assert fractions == sorted(fractions), seen
    assert any(phase == "generating" for f, phase in seen if f is not None)
    assert any(f is None and text.startswith("generating: class images") for f, text in seen)
