"""Error types shared by the engine, the CLI and the WebUI.

A `UserError` is something the user can fix (a bad value, a missing folder, a file that is not an image). The CLI
prints its message without a traceback and exits with status 2; the WebUI shows it in the status box; the HTTP API
answers 4xx with it. Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, with a message that names what to fix."""


class ConfigError(UserError):
    """One or more invalid config values; `problems` holds one line per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid training config ({len(self.problems)} problem(s)):\n{lines}")


class TrainingStopped(Exception):
    """Raised inside the loop when a stop was requested; the loop turns it into a clean end."""
