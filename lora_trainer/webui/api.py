"""HTTP API: `/lora-trainer/v1/*` on the WebUI's FastAPI app.

The routes take and return the same JSON as the config files and the CLI. With `--api-auth`, every route asks for
the same HTTP Basic credentials as the WebUI's own API (A1111 does not protect extension routes by itself); a
`--api-auth` without any `user:password` entry refuses every request. User errors answer 4xx with
`{"error": ..., "problems": [...]}`: 422 for a body that is not a JSON object (with the line and column) or for
invalid options (each problem starts with the option's name), 403 for a path outside the allowed folders, 409 when
a run is already in progress.

Allowed folders: every path option of a request (the fields marked `path` in `config.py`) is resolved with
`os.path.realpath`, so `..` and symlinks cannot lead out, and must lie under the WebUI's data or model folders
(`host.webui_folders()`) or a folder listed in the `lora_trainer_allowed_dirs` setting. A relative path is taken
from the WebUI's data folder (output_dir: from the Lora folder, as in the tab) and the run gets the resolved
absolute path, so what was checked is what is used. concepts_list (a file, or pasted JSON): the file and every
folder its concepts name (instance/class folders, sample templates) must lie there too; generated class images are
written into those folders. The tab is the local user's and is not restricted.

fastapi is imported where the routes are built, so that the checks below work (and are tested) without it.
"""

import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from typing import Any, Optional

from .. import config as cfgmod
from .. import presets
from ..config import TrainConfig
from ..data import concepts
from ..errors import ConfigError, UserError
from . import ALLOWED_DIRS_KEY, ALLOWED_DIRS_LABEL, host
from .job import MANAGER, BusyError

log = logging.getLogger(__name__)
PREFIX = "/lora-trainer/v1"


class RequestError(UserError):
    """A request the API refuses: the HTTP status, a message and the problems (one per field)."""

    def __init__(self, status: int, message: str, problems: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems or []


# ----------------------------------------------------------------------------------------------------------------
# Authentication


def _credentials() -> Optional[list[tuple[str, str]]]:
    """The `user:password` pairs of --api-auth (split like `modules/api/api.py:201-205`); None without it."""
    raw = getattr(host.cmd_opts(), "api_auth", None)
    if not raw:
        return None
    return [(user, password) for user, _, password in (x.partition(":") for x in raw.split(",") if ":" in x)]


def check_auth(username: Optional[str], password: Optional[str]) -> bool:
    creds = _credentials()
    if creds is None:
        return True
    if username is None or password is None:
        return False
    user_b, password_b = username.encode("utf-8"), password.encode("utf-8")
    matches = [secrets.compare_digest(user_b, u.encode("utf-8")) & secrets.compare_digest(password_b, p.encode("utf-8"))
               for u, p in creds]
    return any(matches)


# ----------------------------------------------------------------------------------------------------------------
# The request body


def parse_body(raw: bytes, arrays: bool = False) -> Any:
    """The JSON object of options in a request body (or, with `arrays`, a JSON array of such objects: a queue), or
    RequestError(422) saying where it is broken."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(422, f"the body is not UTF-8 text (byte {e.start}); send a JSON object of options") from None
    if not text.strip():
        raise RequestError(422, "the body is empty; send a JSON object of options, e.g. {\"train_data_dir\": ...}")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(422, f"the body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                           [f"body: line {e.lineno}, column {e.colno}: {e.msg}"]) from None
    if arrays and isinstance(body, list) and body and all(isinstance(x, dict) for x in body):
        return body
    if not isinstance(body, dict):
        what = "a JSON object of options" + (" or an array of them (a queue)" if arrays else "")
        raise RequestError(422, f"the body must be {what}, not {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------------------------
# Allowed folders


def split_folders(value: Any) -> list[str]:
    """The folders of the setting: one per line or comma-separated (a list, if config.json was edited by hand);
    blanks are ignored."""
    text = "\n".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value or "")
    return [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]


def allowed_roots() -> list[str]:
    """Resolved folders API paths may lie under: the WebUI's data/model folders and those of the setting."""
    base = host.data_path()
    listed = [folder for _, folder in host.webui_folders()]
    listed += [os.path.expanduser(p) for p in split_folders(host.setting(ALLOWED_DIRS_KEY, ""))]
    roots: list[str] = []
    for folder in listed:
        real = os.path.realpath(os.path.join(base, folder))
        if real not in roots:
            roots.append(real)
    return roots


def is_under(path: str, root: str) -> bool:
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive on Windows
        return False


def _relative_base(name: str) -> str:
    """Where a relative path of this option starts: the Lora folder for output_dir (as `job.host_config` does),
    the WebUI's data folder for the rest."""
    return host.lora_dir() if name == "output_dir" else host.data_path()


def confine_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its path options resolved; RequestError(403) naming each one that lies outside the roots.

    pretrained_model_name_or_path (the WebUI trains its loaded checkpoint instead) and a relative output_dir (the job
    joins it to the Lora folder itself) are checked but keep their value.
    """
    roots = allowed_roots()
    changes: dict[str, str] = {}
    problems = []
    for spec in cfgmod.fields():
        value = getattr(cfg, spec.name)
        if not spec.path or not value:
            continue
        if "\0" in value:  # realpath would raise
            raise RequestError(422, "invalid options", [f"{spec.name}: {value!r} contains a NUL character"])
        if spec.path == "file_or_json" and value.lstrip().startswith(("[", "{")):  # inline JSON: its folders
            problems.extend(_outside(roots, concepts.referenced_paths(value)))
            continue
        resolved = os.path.realpath(os.path.join(_relative_base(spec.name), value))
        if not any(is_under(resolved, root) for root in roots):
            problems.extend(_outside(roots, [(spec.name, resolved)], value))
        elif spec.path != "model" and not (spec.name == "output_dir" and not os.path.isabs(value)):
            changes[spec.name] = resolved
        if spec.path == "file_or_json" and not problems:  # the folders the file names
            problems.extend(_outside(roots, concepts.referenced_paths(resolved)[1:]))
    if problems:
        raise RequestError(403, f"paths outside the allowed folders ({', '.join(roots)})", problems)
    return cfg.replace(**changes) if changes else cfg


def _outside(roots: list[str], paths: list[tuple[str, str]], value: Optional[str] = None) -> list[str]:
    """A problem for each (label, path) outside the roots."""
    out = []
    for label, path in paths:
        resolved = os.path.realpath(path)
        if not any(is_under(resolved, root) for root in roots):
            shown = f"{value!r} resolves to {resolved}" if value is not None else f"{resolved}"
            out.append(f"{label}: {shown}, outside the folders the API may use; add its folder to Settings > "
                       f"Train LoRA > '{ALLOWED_DIRS_LABEL}' ({ALLOWED_DIRS_KEY})")
    return out


def config_from_body(raw: bytes) -> TrainConfig:
    """Body -> validated config with its paths confined; RequestError for anything the API refuses."""
    return _config_from_dict(parse_body(raw))


def configs_from_body(raw: bytes) -> list[TrainConfig]:
    """A JSON object (one run) or an array of them (a queue) -> validated configs with their paths confined."""
    body = parse_body(raw, arrays=True)
    if isinstance(body, dict):
        return [_config_from_dict(body)]
    configs = []
    for i, item in enumerate(body, 1):
        try:
            configs.append(_config_from_dict(item))
        except RequestError as e:
            raise RequestError(e.status, f"queue run {i}: {e}", [f"run {i}: {p}" for p in e.problems]) from None
    return configs


def _config_from_dict(body: dict[str, Any]) -> TrainConfig:
    try:
        cfg = cfgmod.from_dict(body, base=None)
    except ConfigError as e:
        raise RequestError(422, "invalid options", e.problems) from None
    except UserError as e:
        raise RequestError(422, str(e)) from None
    return confine_paths(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Routes


def error_response(status: int, message: str, problems: Optional[list[str]] = None) -> Any:
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = problems
    return JSONResponse(status_code=status, content=body)


def answer(action: Callable[[], dict[str, Any]]) -> Any:
    """The action's result, or the 4xx answer for what the user got wrong (409 busy, 422 invalid, 400 other)."""
    try:
        return action()
    except RequestError as e:
        return error_response(e.status, str(e), e.problems)
    except BusyError as e:
        return error_response(409, str(e))
    except ConfigError as e:
        return error_response(422, "invalid options", e.problems)
    except UserError as e:
        return error_response(400, str(e))


def options_schema() -> list[dict[str, Any]]:
    return [{"name": f.name, "type": getattr(f.base_type, "__name__", str(f.base_type)), "optional": f.optional,
             "default": f.default, "help": f.help, "group": f.group, "choices": f.choices, "min": f.min,
             "max": f.max, "applies_when": f.when_text or None, "path": f.path or None} for f in cfgmod.fields()]


def register_routes(app: Any) -> None:
    from fastapi import Depends, HTTPException, Request
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    basic = HTTPBasic(auto_error=False)

    def auth(credentials: Optional[HTTPBasicCredentials] = Depends(basic)):
        user = credentials.username if credentials else None
        password = credentials.password if credentials else None
        if not check_auth(user, password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    deps = [Depends(auth)]

    async def train(request: Request):
        raw = await request.body()

        def start() -> dict[str, Any]:
            configs = configs_from_body(raw)
            if len(configs) > 1:  # a queue: answered at once, its runs show in /status's "queue"
                return {"queue": MANAGER.start_queue(configs).as_list(), "state": "running"}
            job = MANAGER.start(configs[0])
            return {"id_task": job.status.id_task, "state": job.status.state}
        return answer(start)

    async def queue(request: Request):
        """Add runs behind the running ones (or start a queue when nothing runs)."""
        raw = await request.body()

        def add() -> dict[str, Any]:
            current = None
            for cfg in configs_from_body(raw):
                current = MANAGER.enqueue(cfg)
            return {"queue": current.as_list() if current is not None else []}
        return answer(add)

    def status():
        return MANAGER.status()

    def cancel():
        MANAGER.stop()
        return MANAGER.status()

    def pause():
        MANAGER.pause(True)
        return MANAGER.status()

    def resume():
        MANAGER.pause(False)
        return MANAGER.status()

    def sample():
        MANAGER.sample()
        return MANAGER.status()

    def options():
        return options_schema()

    def preset_list():
        return [{"name": p.name, "title": p.title, "description": p.description, "values": p.values,
                 "fields": list(p.fields)} for p in presets.PRESETS.values()]

    routes = [("/train", train, ["POST"]), ("/queue", queue, ["POST"]), ("/status", status, ["GET"]),
              ("/cancel", cancel, ["POST"]), ("/pause", pause, ["POST"]), ("/resume", resume, ["POST"]),
              ("/sample", sample, ["POST"]), ("/options", options, ["GET"]), ("/presets", preset_list, ["GET"])]
    for path, fn, methods in routes:
        app.add_api_route(PREFIX + path, fn, methods=methods, dependencies=deps)
