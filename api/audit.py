"""The audit log: one JSON line per HTTP request, to stdout or the file AUDIT_LOG names.

A line says who did what and how it went: `time` (UTC, ISO 8601), `request_id` (as in the
`X-Request-Id` answered), `key_id` (the caller's owner id, api/auth.py: a digest's prefix, never the
key; null when no valid key was sent), `method`, `route` (the template, `/v1/forecasts/{job_id}`;
null when no route matched), `model` and `job_id` where known, `status`, `duration_s`, `bytes_in`
and `bytes_out`. Routes put `model` and `job_id` on `request.state` as they learn them; the line
never holds a series value, a prediction, a header or a body.

A line is one `os.write` on a file opened with O_APPEND, so the lines of several API processes
appending to one file stay whole, and nothing is buffered that a crash could lose.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime

import orjson

from api.security import request_id

log = logging.getLogger(__name__)

STDOUT, OFF = "-", "off"


class AuditSink:
    """Where audit lines go: stdout (`-`) or a file, opened on the first line."""

    def __init__(self, target: str):
        self.target = target
        self._fd: int | None = None
        self._failing = False

    def write(self, line: bytes) -> None:
        try:
            if self._fd is None:
                self._fd = 1 if self.target == STDOUT else os.open(self.target, _FLAGS, 0o640)
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            self._failing = False
        except OSError as exc:
            # A full disk must not fail the requests themselves; say so once, not once per request.
            if not self._failing:
                log.error("audit log %s not written: %s", self.target, exc)
            self._failing = True

    def close(self) -> None:
        if self._fd is not None and self.target != STDOUT:
            os.close(self._fd)
        self._fd = None


_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class AuditLog:
    """ASGI middleware: count the bytes each way, note the status, and write the request's line once
    it is answered (or failed)."""

    def __init__(self, app, sink: AuditSink):
        self.app, self.sink = app, sink

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        at, started = time.time(), time.perf_counter()
        # The dict behind `request.state`: what the routes note there is read back below.
        state = scope.setdefault("state", {})
        status, received, sent = 500, 0, 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counted_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            params = scope.get("path_params") or {}
            route = scope.get("route")
            model = state.get("model") or params.get("model_id") or params.get("slug")
            job_id = state.get("job_id") or params.get("job_id")
            line = {
                "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
                "request_id": request_id.get(),
                "key_id": state.get("key_id"),
                "method": scope["method"],
                "route": getattr(route, "path", None),
                "model": model[:128] if model else None,
                "job_id": job_id[:64] if job_id else None,
                "status": status,
                "duration_s": round(time.perf_counter() - started, 6),
                "bytes_in": received,
                "bytes_out": sent,
            }
            self.sink.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


def install(app, target: str) -> AuditSink | None:
    """Add the audit middleware writing to `target` (`-`: stdout, `off`: none, else a file path)."""
    if target.strip().lower() == OFF:
        return None
    sink = AuditSink(target)
    app.add_middleware(AuditLog, sink=sink)
    return sink
