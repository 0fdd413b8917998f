"""The job store's Lua scripts (shared/store/lua/*.lua), loaded once per process.

Each script states its KEYS and ARGV at its top and declares every key it writes. Scripts that
end a job call `ended` (lua/ended.lua, prepended here): the terminal-state write exists once.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

NAMES = ("create", "create_done", "start", "finish", "cancel", "progress", "take_token", "promote_callbacks", "read",
         "unsent", "probe", "read_pass")  # fmt: skip


@cache
def source(name: str) -> str:
    """A script's text, with the terminal-state function in front when the script ends jobs."""
    text = files(__package__).joinpath("lua", f"{name}.lua").read_text()
    if "ended(" in text:
        text = files(__package__).joinpath("lua", "ended.lua").read_text() + text
    return text


def register(client: Any) -> dict[str, Any]:
    """Every script registered on one client (blocking or asyncio), by name."""
    return {name: client.register_script(source(name)) for name in NAMES}
