"""API safety and "the WebUI always starts" (issue 6), on the host double.

- With --api-auth, every /lora-trainer/v1 route (found by walking the app's routes) refuses missing and wrong
  credentials and answers normally to each configured user.
- Path options of an API request must resolve (realpath: no `..` or symlink escape) under the WebUI's data/model
  folders or the folders of the `lora_trainer_allowed_dirs` setting; the run gets the resolved path.
- Bodies that are not a JSON object, invalid and unknown options: 422 naming the position or the option; a second
  run: 409.
- A required package that is missing or raises on import never stops the WebUI: the script loads, the tab says what
  is broken, the routes stay off.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import os
import sys

import pytest

from lora_trainer import config as cfgmod
from lora_trainer import presets
from lora_trainer.config import TrainConfig
from lora_trainer.webui import ALLOWED_DIRS_KEY, TAB_ID
from lora_trainer.webui.api import PREFIX, RequestError, check_auth, confine_paths

from .webui_double.host import skip_unless_webui_gradio, webui, webui_host

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "lora_trainer_tab.py")
PATH_FIELDS = {"pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "network_weights",
               "output_dir", "work_dir", "resume", "sample_prompts", "log_dir", "concepts_list",
               "multi_run_folder"}


def _real(*parts) -> str:
    return os.path.realpath(os.path.join(*[str(p) for p in parts]))


def _refused(cfg: TrainConfig) -> RequestError:
    with pytest.raises(RequestError) as info:
        confine_paths(cfg)
    assert info.value.status == 403
    return info.value


# ------------------------------------------------------------------------------------------------------------
# Allowed folders


def test_every_path_option_is_marked_in_the_config():
    marked = {f.name for f in cfgmod.fields() if f.path}
    assert marked == PATH_FIELDS
    by_name = {f.name for f in cfgmod.fields() if f.base_type is str and f.name.endswith(("_dir", "_path", "weights"))}
    assert by_name <= marked
    assert set(presets.USER_PATHS) - {"output_name"} <= marked  # the options that describe the user's files
    assert {f.path for f in cfgmod.fields()} == {"", "file", "dir", "model", "file_or_json"}


def test_paths_inside_the_webui_folders_pass_and_run_resolved(tmp_path):
    root = tmp_path / "webui"
    (root / "train").mkdir(parents=True)
    with webui_host(str(root)) as host:
        lora = host.lora_dir
        cfg = TrainConfig(train_data_dir="train", work_dir="outputs/./w/../w", sample_prompts=str(root / "p.txt"),
                          network_weights=os.path.join(lora, "start.safetensors"), output_dir="sub",
                          pretrained_model_name_or_path="tiny-sd1")
        out = confine_paths(cfg)
    assert out.train_data_dir == _real(root, "train")  # relative: from the WebUI's data folder
    assert out.work_dir == _real(root, "outputs", "w")
    assert out.sample_prompts == _real(root, "p.txt")
    assert out.network_weights == _real(lora, "start.safetensors")
    assert out.output_dir == "sub"  # relative to the Lora folder, which the job joins itself
    assert out.pretrained_model_name_or_path == "tiny-sd1"  # the WebUI trains its loaded checkpoint instead
    assert out.reg_data_dir == "" and out.resume == ""  # empty means unset


@pytest.mark.parametrize("name", sorted(PATH_FIELDS))
def test_each_path_option_outside_the_roots_is_refused_naming_it(tmp_path, name):
    outside = tmp_path / "outside" / "thing"
    with webui_host(str(tmp_path / "webui")):
        err = _refused(TrainConfig(**{name: str(outside)}))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert problem.startswith(f"{name}: ") and _real(outside) in problem and ALLOWED_DIRS_KEY in problem


def test_dot_dot_symlinks_and_look_alike_prefixes_cannot_escape(tmp_path):
    root = tmp_path / "webui"
    root.mkdir()
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "prompts.txt").write_text("x\n")
    os.symlink(secret, root / "link")
    (tmp_path / "webui2").mkdir()
    with webui_host(str(root)):
        assert _real(secret) in _refused(TrainConfig(train_data_dir="../secret")).problems[0]
        assert _real(secret, "prompts.txt") in _refused(TrainConfig(sample_prompts="link/prompts.txt")).problems[0]
        assert _refused(TrainConfig(train_data_dir=str(root) + "2")).problems[0].startswith("train_data_dir:")
        assert _real(secret) in _refused(TrainConfig(output_dir="../../../secret")).problems[0]  # from models/Lora
        assert _refused(TrainConfig(log_dir=str(root / "outputs" / ".." / ".." / "secret")))
        err = _refused(TrainConfig(train_data_dir="../secret", vae="link/v.safetensors", output_dir="fine"))
        assert [p.split(":")[0] for p in err.problems] == ["vae", "train_data_dir"]  # all of them at once


def test_the_webuis_other_folders_and_the_setting_widen_the_roots(tmp_path):
    lora, ckpt, extra1, extra2 = (tmp_path / n for n in ("my-loras", "ckpts", "extra one", "extra2"))
    with webui_host(str(tmp_path / "webui")) as host:
        cmd = host.shared.cmd_opts
        cmd.lora_dir, cmd.ckpt_dir = str(lora), str(ckpt)  # --lora-dir / --ckpt-dir elsewhere
        out = confine_paths(TrainConfig(network_weights=str(lora / "a.safetensors"), vae=str(ckpt / "v.pt"),
                                        output_dir=""))
        assert out.network_weights == _real(lora, "a.safetensors") and out.vae == _real(ckpt, "v.pt")
        cfg = TrainConfig(train_data_dir=str(extra1 / "data"), reg_data_dir=str(extra2 / "reg"))
        assert [p.split(":")[0] for p in _refused(cfg).problems] == ["train_data_dir", "reg_data_dir"]
        host.shared.opts.data[ALLOWED_DIRS_KEY] = f"{extra1}\n"
        assert [p.split(":")[0] for p in _refused(cfg).problems] == ["reg_data_dir"]
        host.shared.opts.data[ALLOWED_DIRS_KEY] = f" {extra1} ,\n{extra2}"  # comma- or newline-separated
        out = confine_paths(cfg)
    assert out.train_data_dir == _real(extra1, "data") and out.reg_data_dir == _real(extra2, "reg")


def test_the_setting_is_in_its_section_and_the_webuis_api_cannot_change_it(tmp_path):
    from lora_trainer import webui as ext

    with webui_host(str(tmp_path)) as host:
        opts = host.shared.opts
        ext._on_ui_settings()
        info = opts.data_labels[ALLOWED_DIRS_KEY]
        assert info.section == ("lora_trainer", "Train LoRA") and info.default == "" and info.restrict_api
        assert info.component_args == {"lines": 3, "visible": True} and "one per line" in info.comment_after
        assert opts.data[ALLOWED_DIRS_KEY] == ""
        assert not opts.set(ALLOWED_DIRS_KEY, "/", is_api=True)  # POST /sdapi/v1/options cannot widen the roots
        assert opts.set(ALLOWED_DIRS_KEY, str(tmp_path / "x")) and opts.data[ALLOWED_DIRS_KEY] == str(tmp_path / "x")
        host.shared.hide_dirs = {"visible": False}  # --hide-ui-dir-config, as modules/shared.py:21 computes it
        ext._on_ui_settings()
        assert not opts.set(ALLOWED_DIRS_KEY, "/")


# ------------------------------------------------------------------------------------------------------------
# Authentication (the function; the routes are below)


def test_credentials_are_checked_like_the_webuis_and_a_bad_api_auth_refuses_everyone(tmp_path):
    with webui_host(str(tmp_path)) as host:
        cmd = host.shared.cmd_opts
        assert check_auth(None, None)  # no --api-auth: open, like the WebUI's own API
        cmd.api_auth = "alice:pw1,bob:pw2"
        assert check_auth("alice", "pw1") and check_auth("bob", "pw2")
        assert not check_auth("alice", "pw2") and not check_auth("bob", "pw1") and not check_auth("alice", "")
        assert not check_auth(None, None) and not check_auth("älice", "pw1") and not check_auth("alice", "pw1é")
        cmd.api_auth = "alice"  # no user:password pair at all: closed, not open
        assert not check_auth("alice", "") and not check_auth(None, None)


# ------------------------------------------------------------------------------------------------------------
# The HTTP routes (FastAPI is the WebUI's: .venv-host)


@pytest.fixture
def api(tmp_path):
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from lora_trainer.webui.api import register_routes

    app = fastapi.FastAPI()
    register_routes(app)
    return app, TestClient(app)


def _routes(app) -> list[tuple[str, str]]:
    found = [(r.path, m) for r in app.routes if r.path.startswith(PREFIX) for m in sorted(r.methods)]
    assert {(PREFIX + "/train", "POST"), (PREFIX + "/status", "GET")} <= set(found)
    return found


def _call(client, path: str, method: str, auth=None):
    starts = path.endswith(("/train", "/queue"))
    content = b"{" if starts else None  # never start a run here: a broken body answers 422
    return client.request(method, path, content=content, auth=auth)


def _normal(path: str) -> int:
    return 422 if path.endswith(("/train", "/queue")) else 200


def test_every_route_refuses_missing_and_wrong_credentials_and_accepts_each_user(tmp_path, api):
    from lora_trainer.webui.job import MANAGER

    app, client = api
    routes = _routes(app)
    job_before = MANAGER.job
    with webui_host(str(tmp_path)) as host:
        for path, method in routes:
            assert _call(client, path, method).status_code == _normal(path), path  # no --api-auth: open
        options = client.get(PREFIX + "/options").json()
        assert {o["name"] for o in options if o["path"]} == PATH_FIELDS  # clients can tell which are checked
        host.shared.cmd_opts.api_auth = "alice:pw1,bob:pw2"
        for path, method in routes:
            for bad in (None, ("alice", "wrong"), ("bob", "pw1"), ("mallory", "pw1"), ("älice", "pw1"), ("", "")):
                r = _call(client, path, method, bad)
                assert r.status_code == 401, (path, bad, r.text)
                assert r.headers["www-authenticate"] == "Basic"
            for good in (("alice", "pw1"), ("bob", "pw2")):
                assert _call(client, path, method, good).status_code == _normal(path), (path, good)
        r = client.get(PREFIX + "/status", headers={"Authorization": "Basic !!not-base64!!"})
        assert r.status_code == 401
        host.shared.cmd_opts.api_auth = "alice"  # malformed: every route closed
        for path, method in routes:
            assert _call(client, path, method, ("alice", "")).status_code == 401, path
    assert MANAGER.job is job_before


BODIES = [
    (b'{\n  "network_dim": 4,\n  "network_alpha": \n}', ["line 4, column 1"]),
    (b'{"network_dim": 4,, "x": 1}', ["line 1, column 19"]),
    (b"", ["empty"]),
    (b"[1, 2]", ["JSON object", "array"]),
    (b"null", ["JSON object", "null"]),
    (b'\xff{"network_dim": 4}', ["UTF-8", "byte 0"]),
    (b'{"network_dimm": 4}', ["network_dimm", "did you mean 'network_dim'"]),
    (b'{"network_dim": "big", "learning_rate": "fast"}', ["network_dim: 'big'", "learning_rate: 'fast'"]),
    (b'{"network_dim": 0, "learning_rate": 20}', ["network_dim: 0 is out of range", "learning_rate: 20"]),
    (b'{"train_data_dir": "a\\u0000b"}', ["train_data_dir", "NUL"]),
]


@pytest.mark.parametrize(("body", "expected"), BODIES)
def test_a_bad_body_is_422_saying_where(tmp_path, api, body, expected):
    from lora_trainer.webui.job import MANAGER

    _, client = api
    job_before = MANAGER.job
    with webui_host(str(tmp_path)):
        r = client.post(PREFIX + "/train", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    text = json.dumps(r.json(), ensure_ascii=False)
    assert all(e in text for e in expected), text
    assert MANAGER.job is job_before


def test_the_json_position_is_the_decoders():
    body = '{\n  "network_dim": 4,\n  "network_alpha": \n}'
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(body)
    assert (info.value.lineno, info.value.colno) == (4, 1)  # what BODIES expects for it


def test_outside_paths_are_403_the_setting_admits_them_and_a_second_run_is_409(tmp_path, api):
    pytest.importorskip("tests.webui_double.models")
    from lora_trainer.synthetic import make_dataset
    from lora_trainer.webui.job import MANAGER

    _, client = api
    elsewhere = tmp_path / "elsewhere"
    data = make_dataset(str(elsewhere / "data"), images=2, repeats=1, size=64, aspect_variety=False)
    body = dict(train_data_dir=data, output_name="api_safety", resolution="64", min_bucket_reso=64,
                max_bucket_reso=64, network_dim=2, network_alpha=1.0, train_batch_size=1, max_train_steps=50,
                save_precision="float", config_version=1)
    with webui("sd1", str(tmp_path / "webui")) as host:
        job_before = MANAGER.job
        r = client.post(PREFIX + "/train", json=body)
        assert r.status_code == 403, r.text
        assert r.json()["problems"][0].startswith("train_data_dir:") and _real(data) in r.json()["problems"][0]
        assert ALLOWED_DIRS_KEY in r.json()["problems"][0] and MANAGER.job is job_before

        host.shared.opts.data[ALLOWED_DIRS_KEY] = str(elsewhere)
        from modules import call_queue

        with call_queue.queue_lock:  # a generation is running: the run waits in the queue, deterministically busy
            r = client.post(PREFIX + "/train", json=body)
            assert r.status_code == 200, r.text
            job = MANAGER.job
            try:
                assert job is not job_before and job.cfg.train_data_dir == _real(data)
                second = client.post(PREFIX + "/train", json={**body, "output_name": "second"})
                assert second.status_code == 409 and "already in progress" in second.json()["error"]
                assert MANAGER.job is job
            finally:
                assert client.post(PREFIX + "/cancel").json()["state"] == "running"
        job.thread.join(300)
        assert not job.thread.is_alive() and job.status.state == "cancelled", job.status


# ------------------------------------------------------------------------------------------------------------
# The WebUI always starts


def _load_script():
    """As the WebUI loads an extension's script (`modules/script_loading.py:10-13`)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(SCRIPT), SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide(monkeypatch, name: str) -> None:
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, mod)


@pytest.fixture
def broken_lycoris(tmp_path, monkeypatch):
    """A real package named lycoris, first on sys.path, whose import raises like lycoris 3.x on an old torch."""
    pkg = tmp_path / "site" / "lycoris"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import torch\n\nraise AttributeError(\"module 'torch' has no attribute "
                                     "'float8_e4m3fn'\")\n")
    _hide(monkeypatch, "lycoris")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_broken_missing_and_half_installed_packages_are_told_apart(tmp_path, monkeypatch, broken_lycoris):
    from lora_trainer.webui import missing_packages, package_problems, problems_html

    problems = package_problems()
    assert [(p.module, p.error) for p in problems] == [
        ("lycoris", "AttributeError: module 'torch' has no attribute 'float8_e4m3fn'")]
    assert missing_packages() == ["lycoris-lora"]
    text = problems_html(problems)
    assert "lycoris-lora" in text and "float8_e4m3fn" in text and "importing <code>lycoris</code> fails" in text

    pkg = tmp_path / "site" / "safetensors"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    _hide(monkeypatch, "safetensors")
    assert [(p.pip, p.error) for p in package_problems()][1] == (
        "safetensors", "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'")

    monkeypatch.setitem(sys.modules, "lycoris", None)  # Python's own "not importable" marker: as if not installed
    assert package_problems()[0].error == ""
    text = problems_html(package_problems())
    assert "<b>lycoris-lora</b> is not installed: <code>pip install lycoris-lora</code>" in text


def test_the_script_loads_and_the_webui_starts_with_a_broken_package(tmp_path, broken_lycoris):
    from lora_trainer.webui import ui

    with webui_host(str(tmp_path)) as host:
        from modules import script_callbacks

        _load_script()  # raises nothing
        assert len(script_callbacks.callbacks_ui_tabs) == len(script_callbacks.callbacks_app_started) == 1
        for settings in script_callbacks.callbacks_ui_settings:
            settings()
        assert ALLOWED_DIRS_KEY in host.shared.opts.data_labels
        host.shared.cmd_opts.api = True
        routes = []
        if importlib.util.find_spec("fastapi") is not None:
            import fastapi

            app = fastapi.FastAPI()
            script_callbacks.callbacks_app_started[0](None, app)
            routes = [r.path for r in app.routes if r.path.startswith(PREFIX)]
        tabs = script_callbacks.callbacks_ui_tabs[0]()  # raises nothing, with or without Gradio
    assert routes == []  # no routes over a broken package
    assert TAB_ID == ui.TAB_ID  # the fallback tab takes the real tab's place
    gr = skip_unless_webui_gradio()
    [(tab, title, tab_id)] = tabs
    assert title == "Train LoRA" and tab_id == ui.TAB_ID
    shown = html.unescape(" ".join(str(b.value) for b in tab.blocks.values() if isinstance(b, gr.HTML)))
    assert "lycoris-lora" in shown and "AttributeError: module 'torch' has no attribute 'float8_e4m3fn'" in shown


def test_the_script_loads_outside_the_webui_and_says_why_it_did_nothing(caplog):
    if importlib.util.find_spec("modules") is not None:
        pytest.skip("a `modules` package is importable here")
    with caplog.at_level(logging.ERROR, logger="lora_trainer"):
        _load_script()  # raises nothing
    assert "Train LoRA could not load" in caplog.text and "modules" in caplog.text
