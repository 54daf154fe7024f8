"""Dreambooth-extension concepts lists: the extension's own example file, inline JSON, relative paths, every kind of
invalid concept (named by number, prompt and field), and the [filewords]/token rules of
`FilenameTextGetter.create_text` (d8ahazard/sd_dreambooth_extension, dreambooth/utils/image_utils.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest
from PIL import Image

from lora_trainer.config import TrainConfig, validate
from lora_trainer.data.buckets import BucketPlanner
from lora_trainer.data.concepts import create_text, file_text, load_concepts
from lora_trainer.data.dataset import build_dataset
from lora_trainer.errors import ConfigError, UserError


def _images(folder, sizes, captions=None) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(os.path.join(folder, f"{i:03d}.png"))
        if captions is not None:
            with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(captions[i])
    return str(folder)


def _example(root) -> list[dict]:
    """dreambooth/concepts_list.json of the extension (two concepts, every field but is_valid), its Windows
    folders made relative so that they can exist here."""
    common = {"save_sample_template": "", "instance_token": "", "class_token": "", "class_negative_prompt": "",
              "class_guidance_scale": 7.5, "class_infer_steps": 40, "save_sample_negative_prompt": "",
              "n_save_sample": 1, "sample_seed": -1, "save_guidance_scale": 7.5, "save_infer_steps": 40}
    _images(root / "clothes_samples" / "bossdyn", [(64, 64)] * 2)
    _images(root / "clothes_samples" / "capocor", [(64, 64)])
    return [
        {"instance_data_dir": "clothes_samples/bossdyn", "class_data_dir": "pants",
         "instance_prompt": "a man wearing bossdyn pants", "class_prompt": "a man wearing pants",
         "save_sample_prompt": "a man wearing bossdyn pants", **common, "num_class_images_per": 5},
        {"instance_data_dir": "clothes_samples/capocor", "class_data_dir": "jacket",
         "instance_prompt": "a person wearing copocor jacket", "class_prompt": "a person wearing a jacket",
         "save_sample_prompt": "a man wearing capocor jacket", **common, "num_class_images_per": 0},
    ]


def test_the_extensions_example_file_loads_with_every_field(tmp_path):
    path = tmp_path / "concepts_list.json"
    path.write_text(json.dumps(_example(tmp_path), indent=2))
    first, second = load_concepts(str(path))
    assert first.instance_data_dir == str(tmp_path / "clothes_samples" / "bossdyn")  # from the file's folder
    assert first.class_data_dir == str(tmp_path / "pants")
    assert (first.instance_prompt, first.class_prompt) == ("a man wearing bossdyn pants", "a man wearing pants")
    assert (first.num_class_images_per, first.class_infer_steps, first.save_infer_steps) == (5, 40, 40)
    assert (first.class_guidance_scale, first.n_save_sample, first.sample_seed) == (7.5, 1, -1)
    assert second.num_class_images_per == 0 and second.save_sample_prompt == "a man wearing capocor jacket"
    assert first.num_repeats == 1

    ds = build_dataset("", "", BucketPlanner((64, 64), min_reso=64, max_reso=128), ".txt",
                       [first, second], str(tmp_path / "work"))
    # both concepts train; only the first asks for class images (the second's class folder is not used, as there)
    assert [(s.name, s.is_reg, s.class_per) for s in ds.subsets] == [("bossdyn", False, 0), ("pants", True, 5),
                                                                     ("capocor", False, 0)]
    assert {i.caption for i in ds.train_items} == {"a man wearing bossdyn pants", "a person wearing copocor jacket"}


def test_inline_json_with_relative_paths_from_the_working_folder(tmp_path, monkeypatch):
    data = _example(tmp_path)
    monkeypatch.chdir(tmp_path)
    concepts = load_concepts("  " + json.dumps(data))
    assert [c.instance_data_dir for c in concepts] == [str(tmp_path / "clothes_samples" / n)
                                                      for n in ("bossdyn", "capocor")]
    one = load_concepts(json.dumps(data[1]))  # a single object without the brackets
    assert len(one) == 1 and one[0].index == 1


def test_relative_paths_start_at_the_files_folder_not_the_working_folder(tmp_path, monkeypatch):
    sub = tmp_path / "project"
    _images(sub / "10_ohwx", [(64, 64)])
    (sub / "c.json").write_text(json.dumps([{"instance_data_dir": "10_ohwx", "instance_prompt": "ohwx",
                                             "save_sample_template": "tmpl.txt"}]))
    (sub / "tmpl.txt").write_text("ohwx dog\n\nohwx cat\n")
    monkeypatch.chdir(tmp_path)
    (c,) = load_concepts("project/c.json")
    assert c.instance_data_dir == str(sub / "10_ohwx") and c.save_sample_template == str(sub / "tmpl.txt")
    assert c.num_repeats == 10  # the kohya N_ prefix, when num_repeats is not given


def _problems(value: str) -> str:
    with pytest.raises(UserError) as info:
        load_concepts(value)
    err = info.value
    return "\n".join(err.problems) if isinstance(err, ConfigError) else str(err)


@pytest.mark.parametrize("second, expected", [
    ({"instance_prompt": "ohwx dog"}, "concept 2 ('ohwx dog'): instance_data_dir: missing"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "nope"},
     "concept 2 ('ohwx dog'): instance_data_dir: folder not found: {root}"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "class_infer_steps": "forty"},
     "concept 2 ('ohwx dog'): class_infer_steps: 'forty' is not a number"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "n_save_sample": 1.5},
     "concept 2 ('ohwx dog'): n_save_sample: 1.5 is not a whole number"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "num_class_images_per": -2},
     "concept 2 ('ohwx dog'): num_class_images_per: -2 is below the minimum 0"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "sample_seed": -5},
     "concept 2 ('ohwx dog'): sample_seed: -5 is below the minimum -1 (-1 = random)"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "class_guidance_scale": True},
     "concept 2 ('ohwx dog'): class_guidance_scale: True is not a number"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": 7}, "concept 2 ('ohwx dog'): instance_data_dir: 7 is not "
                                                              "text"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "num_class_image_per": 3},
     "concept 2 ('ohwx dog'): num_class_image_per: unknown key (did you mean 'num_class_images_per'?)"),
    ({"instance_prompt": "ohwx dog", "instance_data_dir": "a", "save_sample_template": "none.txt"},
     "concept 2 ('ohwx dog'): save_sample_template: file not found"),
    ("a string", "concept 2: expected an object {...}, got str"),
])
def test_each_invalid_concept_is_an_error_naming_number_prompt_and_field(tmp_path, second, expected):
    _images(tmp_path / "a", [(64, 64)])
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"instance_data_dir": "a", "instance_prompt": "fine"}, second]))
    message = _problems(str(path))
    assert expected.replace("{root}", str(tmp_path)) in message, message
    assert "concept 1" not in message  # the valid one is not blamed


@pytest.mark.parametrize("value, expected", [
    ('{"instance_data_dir": ', "concepts_list: the pasted JSON is not valid JSON (Expecting value at line 1"),
    ("[1, 2", "not valid JSON"),
    ("42", "is neither a file nor JSON"),
    ("no/such/file.json", "'no/such/file.json' is neither a file nor JSON"),
    ("[]", "the array is empty"),
])
def test_not_json_not_an_array_and_empty_are_clear_errors(value, expected):
    assert expected in _problems(value)


def test_a_file_that_holds_no_array_says_so(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("3")
    assert "expected a JSON array of concepts, got int" in _problems(str(path))
    path.write_text("{not json")
    assert f"concepts_list: {path} is not valid JSON" in _problems(str(path))


def test_legacy_keys_are_understood(tmp_path, caplog):
    _images(tmp_path / "a", [(64, 64)] * 4)
    data = [{"instance_data_dir": str(tmp_path / "a"), "instance_prompt": "x", "num_class_images": 10,
             "max_steps": 500}]
    with caplog.at_level(logging.WARNING):
        (c,) = load_concepts(json.dumps(data))
    assert c.num_class_images_per == 3  # 10 in all for 4 images, rounded up
    assert "legacy max_steps 500" in caplog.text
    (c,) = load_concepts(json.dumps([{**data[0], "num_class_images_per": 1, "max_steps": -1}]))
    assert c.num_class_images_per == 1  # the new key wins


# ------------------------------------------------------------------------------------------------------------
# [filewords] and the tokens: create_text(prompt, file text, instance_token, class_token, is_class)

FILEWORDS_TABLE = [
    # prompt, file text, instance token, class token, class prompt?, caption
    ("[filewords]", "a photo of a man", "ohwx", "man", False, "a photo of ohwx"),  # "a man" -> "man" -> token
    ("[filewords]", "photo of the man", "ohwx", "man", False, "photo of ohwx"),
    ("[filewords]", "ohwx man smiling", "ohwx", "man", False, "ohwx man smiling"),  # both there: kept
    ("[filewords]", "OHWX smiling", "ohwx", "man", False, "ohwx smiling"),  # case of the token normalised
    ("[filewords]", "smiling at the camera", "ohwx", "man", False, "ohwx, smiling at the camera"),
    ("[filewords]", "ohwxy smiling", "ohwx", "man", False, "ohwx, ohwxy smiling"),  # whole words only
    ("[filewords]", "ohwx man smiling", "ohwx", "man", True, "man smiling"),  # class prompt: token removed
    ("[filewords]", "ohwx smiling", "ohwx", "man", True, "man smiling"),  # token swapped for the class
    ("[filewords]", "a man smiling", "ohwx", "man", True, "a man smiling"),
    ("[filewords]", "smiling", "ohwx", "man", True, "man, smiling"),  # class word put in front
    ("[filewords]", "ohwx smiling", "ohwx", "", False, "ohwx, ohwx smiling"),  # only an instance token: always
    ("[filewords]", "ohwx smiling", "ohwx", "", True, "ohwx smiling"),
    ("[filewords]", "smiling", "", "man", True, "man, smiling"),  # only a class token: class prompts get it
    ("[filewords]", "smiling", "", "man", False, "smiling"),
    ("photo of [filewords], high quality", "red circle", "", "", False, "photo of red circle, high quality"),
    ("a man wearing bossdyn pants", "ignored", "", "", False, "a man wearing bossdyn pants"),  # no [filewords]
    ("[filewords]", "a  \\(hat\\)\n blue", "", "", False, "a (hat) blue"),  # whitespace runs, backslashes
]


@pytest.mark.parametrize("prompt, text, inst, cls, is_class, expected", FILEWORDS_TABLE)
def test_filewords_and_token_rules(prompt, text, inst, cls, is_class, expected):
    assert create_text(prompt, text, inst, cls, is_class) == expected


@pytest.mark.parametrize("name, caption, expected", [
    ("001.png", "ohwx, red hat", "ohwx, red hat"),  # the caption file
    ("0012-ohwx dog.png", None, "ohwx dog"),  # no caption file: the name without leading digits
    ("12-3 cat.jpg", None, "cat"),
    ("12 - 3 cat.jpg", None, "- 3 cat"),  # as there: digits and dashes, then spaces
    ("", "", ""),
])
def test_filewords_is_the_caption_or_the_file_name(name, caption, expected):
    assert file_text(f"/x/{name}", caption) == expected


def test_captions_of_concept_images_follow_the_rules(tmp_path):
    folder = _images(tmp_path / "img", [(64, 64), (64, 64)], ["a photo of a man, smiling", "ohwx man"])
    os.rename(os.path.join(folder, "001.txt"), os.path.join(folder, "unrelated.txt"))
    os.rename(os.path.join(folder, "001.png"), os.path.join(folder, "07-a man walking.png"))
    concepts = load_concepts(json.dumps([{"instance_data_dir": folder, "instance_prompt": "[filewords], photo",
                                          "instance_token": "ohwx", "class_token": "man"}]))
    ds = build_dataset("", "", BucketPlanner((64, 64), min_reso=64, max_reso=128), ".txt", concepts, "")
    assert sorted(i.caption for i in ds.train_items) == ["a photo of ohwx, smiling, photo", "ohwx walking, photo"]


def test_without_data_the_message_names_both_options(tmp_path):
    with pytest.raises(UserError, match="train_data_dir or concepts_list: neither is set"):
        build_dataset("", "", BucketPlanner((64, 64)), ".txt", [], "")


def test_the_config_fields(tmp_path):
    cfg = validate(TrainConfig(concepts_list='[{"instance_data_dir": "x"}]'))  # inline JSON is a valid value
    assert cfg.num_class_images_per == 0
    with pytest.raises(ConfigError, match="num_class_images_per: 2 needs reg_data_dir"):
        validate(TrainConfig(num_class_images_per=2))


def test_the_api_confines_the_folders_a_concepts_list_names(tmp_path):
    from lora_trainer.webui.api import RequestError, confine_paths

    from .webui_double.host import webui_host

    root = tmp_path / "webui"
    inside = _images(root / "data" / "a", [(64, 64)])
    outside = tmp_path / "outside"
    with webui_host(str(root)):
        ok = [{"instance_data_dir": inside, "instance_prompt": "x"}]
        assert confine_paths(TrainConfig(concepts_list=json.dumps(ok))).concepts_list == json.dumps(ok)
        bad = [{"instance_data_dir": inside, "class_data_dir": str(outside), "instance_prompt": "x"}]
        with pytest.raises(RequestError) as info:
            confine_paths(TrainConfig(concepts_list=json.dumps(bad)))
        (root / "c.json").write_text(json.dumps(bad))
        with pytest.raises(RequestError) as from_file:
            confine_paths(TrainConfig(concepts_list="c.json"))
    for err in (info.value, from_file.value):
        assert err.status == 403 and len(err.problems) == 1
        assert err.problems[0].startswith(f"concepts_list concept 1 class_data_dir: {os.path.realpath(outside)}, "
                                          f"outside the folders the API may use")
