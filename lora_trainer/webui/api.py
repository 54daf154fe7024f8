"""HTTP API: `/lora-trainer/v1/*` on the WebUI's FastAPI app.

The routes take and return the same JSON as the config files and the CLI. With `--api-auth`, every route asks for
the same HTTP Basic credentials as the WebUI's own API (A1111 does not protect extension routes by itself). User
errors answer 4xx with `{"error": ...}`: 409 when a run is already in progress, 422 for invalid options.
"""

import logging
import secrets
from typing import Any, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import config as cfgmod
from .. import presets
from ..errors import ConfigError, UserError
from . import host
from .job import MANAGER, BusyError

log = logging.getLogger(__name__)
PREFIX = "/lora-trainer/v1"


def _credentials() -> list[tuple[str, str]]:
    raw = getattr(host.cmd_opts(), "api_auth", None) or ""
    return [tuple(x.split(":", 1)) for x in raw.split(",") if ":" in x]  # type: ignore[misc]


def check_auth(username: Optional[str], password: Optional[str]) -> bool:
    creds = _credentials()
    if not creds:
        return True
    return any(username is not None and password is not None and secrets.compare_digest(username, u)
               and secrets.compare_digest(password, p) for u, p in creds)


def error_response(status: int, message: str, problems: Optional[list[str]] = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = problems
    return JSONResponse(status_code=status, content=body)


def options_schema() -> list[dict[str, Any]]:
    return [{"name": f.name, "type": getattr(f.base_type, "__name__", str(f.base_type)), "optional": f.optional,
             "default": f.default, "help": f.help, "group": f.group, "choices": f.choices, "min": f.min,
             "max": f.max, "applies_when": f.when_text or None} for f in cfgmod.fields()]


def register_routes(app: Any) -> None:
    basic = HTTPBasic(auto_error=False)

    def auth(credentials: Optional[HTTPBasicCredentials] = Depends(basic)):
        user = credentials.username if credentials else None
        password = credentials.password if credentials else None
        if not check_auth(user, password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    deps = [Depends(auth)]

    async def train(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error_response(422, "the body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(422, "the body must be a JSON object of options")
        try:
            cfg = cfgmod.from_dict(body, base=None)
            job = MANAGER.start(cfg)
        except BusyError as e:
            return error_response(409, str(e))
        except ConfigError as e:
            return error_response(422, "invalid options", e.problems)
        except UserError as e:
            return error_response(400, str(e))
        return {"id_task": job.status.id_task, "state": job.status.state}

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

    routes = [("/train", train, ["POST"]), ("/status", status, ["GET"]), ("/cancel", cancel, ["POST"]),
              ("/pause", pause, ["POST"]), ("/resume", resume, ["POST"]), ("/sample", sample, ["POST"]),
              ("/options", options, ["GET"]), ("/presets", preset_list, ["GET"])]
    for path, fn, methods in routes:
        app.add_api_route(PREFIX + path, fn, methods=methods, dependencies=deps)
