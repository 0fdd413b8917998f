"""The job store's Lua scripts (shared/store/lua/*.lua), loaded once per process.

Each script states its KEYS and ARGV at its top and declares every key it writes. Scripts that
end a job call `ended` (lua/ended.lua, prepended here): the terminal-state write exists once; so
does a waiter's answer (`answer`, lua/answer.lua), which a read returns and a finish publishes.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

NAMES = ("create", "create_done", "start", "finish", "cancel", "progress", "take_token", "promote_callbacks", "read",
         "unsent", "probe", "read_pass", "append", "register")  # fmt: skip


# Functions some scripts share, each in a file of its own, put in front of the scripts that call them.
_SHARED = ("ended", "answer")


@cache
def source(name: str) -> str:
    """A script's text, with the shared functions it calls (`_SHARED`) in front."""
    text = _text(name)
    return "".join(_text(shared) for shared in _SHARED if f"{shared}(" in text) + text


def _text(name: str) -> str:
    return files(__package__).joinpath("lua", f"{name}.lua").read_text()


def register(client: Any) -> dict[str, Any]:
    """Every script registered on one client (blocking or asyncio), by name."""
    return {name: client.register_script(source(name)) for name in NAMES}
