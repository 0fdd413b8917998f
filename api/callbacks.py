"""Completion callbacks: when a job with a `callback_url` ends, POST its final status there, signed.

Nothing is lost between the job's end and the delivery: the script that writes a job's
terminal state also adds it to a Redis stream (shared/store/lua/ended.lua). Every
API process runs a `Dispatcher` in one consumer group on that stream, so each callback is
delivered by one of them; an entry a dead process held is claimed by another after
`_CLAIM_IDLE_MS`. A failed delivery (transport error or non-2xx) is retried after
CALLBACK_BACKOFF_S, doubling each time, up to CALLBACK_MAX_ATTEMPTS; the job's `callback`
shows pending / delivered / failed, the attempts, and the last error.

Only URLs under an operator-allowed prefix (CALLBACK_ALLOWED_URLS) are accepted, redirects
are not followed, and the body holds the job's status, never its results (fetched with GET
and the API key).

Signature (one secret per API key, from GET /v1/callbacks/secret):
    X-Chronos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
`client.verify_signature` checks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from urllib.parse import unquote, urlsplit

import httpx

from shared.settings import Settings
from shared.store import AsyncJobStore, JobRecord

from api.problems import Problem

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Chronos-Signature"
_CLAIM_IDLE_MS = 60_000  # an entry held this long by a consumer that did not ack it is taken over
_CONCURRENCY = 32


def check_url(url: str | None, settings: Settings) -> None:
    """422 unless `url` is an http(s) URL under one of the operator's allowed prefixes.

    Paths are compared as the receiver will see them: percent-decoded, dot segments removed
    (RFC 3986 5.2.4, as HTTP clients normalize before sending), and matched segment by segment,
    so `/hooks/../admin` and `/hooksevil` are not under `/hooks`.
    """
    if url is None:
        return
    prefixes = settings.callback_prefixes()
    if not prefixes:
        raise _refused("callbacks are off: the operator allows no callback URL (CALLBACK_ALLOWED_URLS)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise _refused("not an http(s) URL without credentials")
    path = _segments(parts.path)
    for prefix in map(urlsplit, prefixes):
        allowed = _segments(prefix.path)
        if (parts.scheme, parts.netloc.lower()) == (prefix.scheme, prefix.netloc.lower()) and path[
            : len(allowed)
        ] == allowed:
            return
    raise _refused(f"not under an allowed prefix ({', '.join(prefixes)})")


def _segments(path: str) -> list[str]:
    """A URL path as the segments a server resolves: percent-decoded, `.` and `..` applied, empty ones dropped."""
    out: list[str] = []
    for segment in unquote(path).split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return out


def _refused(detail: str) -> Problem:
    return Problem(422, "callback-not-allowed", f"callback_url: {detail}", field="callback_url")


async def master_secret(store: AsyncJobStore, settings: Settings) -> str:
    """CALLBACK_SECRET, or one generated once and shared by every API process through Redis."""
    if settings.callback_secret:
        return settings.callback_secret
    return await store.callback_secret(secrets.token_hex(32))


def key_secret(master: str, owner: str) -> str:
    """The secret that signs one API key's callbacks (owner: the key's id)."""
    return hmac.new(master.encode(), f"callbacks:{owner}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, at: int) -> str:
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def body_of(record: JobRecord) -> bytes:
    """What a callback says: the job's final status and where to read its results."""
    return json.dumps(
        {
            "id": record.id,
            "kind": record.kind.value,
            "status": record.status.value,
            "model": record.model,
            "error": record.error,
            "cached": record.cached,
            "created_at": record.created_at,
            "finished_at": record.finished_at,
            "url": f"/v1/{record.kind.collection}/{record.id}",
        },
        separators=(",", ":"),
    ).encode()


class Dispatcher:
    """Delivers the callbacks of ended jobs (one per API process, all in one consumer group)."""

    def __init__(self, store: AsyncJobStore, settings: Settings):
        self.store, self.settings = store, settings
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._deliveries: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self._http = httpx.AsyncClient(follow_redirects=False, timeout=settings.callback_timeout_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="callbacks")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # A cancel that lands inside a Redis call can come out as a connection error, which the
            # loop survives by design; the flag ends it then, and the wait is bounded either way.
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        for task in list(self._deliveries):  # unacked entries are claimed by another process later
            task.cancel()
        await self._http.aclose()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                master = await master_secret(self.store, self.settings)
                while not self._stopping:
                    # The block stays well under a round trip's bound (REDIS_TIMEOUT_S, shared/store).
                    entries = await self.store.callback_entries(self.name, _CONCURRENCY, _CLAIM_IDLE_MS, block_ms=500)
                    for entry_id, job_id in entries:
                        await self._slots.acquire()
                        task = asyncio.create_task(self._deliver(master, entry_id, job_id))
                        self._deliveries.add(task)
                        task.add_done_callback(self._done)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: try again shortly; the stream keeps every entry
                if self._stopping:
                    return
                log.warning("callback dispatcher: %s; retrying", exc)
                await asyncio.sleep(1)

    def _done(self, task: asyncio.Task) -> None:
        self._deliveries.discard(task)
        self._slots.release()

    async def _deliver(self, master: str, entry_id: str, job_id: str) -> None:
        record = await self.store.get(job_id)
        if record is None or not record.callback_url or record.callback_status in ("delivered", "failed"):
            await self.store.callback_done(entry_id, job_id, {})  # expired, or done already
            return
        body = body_of(record)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(key_secret(master, record.owner), body, int(time.time())),
            "X-Chronos-Job-Id": record.id,
            "X-Chronos-Event": f"job.{record.status.value}",
            "User-Agent": "chronos-queue-callbacks",
        }
        try:
            answer = await self._http.post(record.callback_url, content=body, headers=headers)
            error = None if answer.is_success else f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempts = record.callback_attempts + 1
        retry_at = None
        if error is None:
            update = {"callback_status": "delivered", "callback_attempts": attempts, "callback_error": ""}
        elif attempts >= self.settings.callback_max_attempts:
            update = {"callback_status": "failed", "callback_attempts": attempts, "callback_error": error}
            log.warning("callback of job %s failed for good after %d attempts: %s", job_id, attempts, error)
        else:
            update = {"callback_attempts": attempts, "callback_error": error}
            retry_at = time.time() + self.settings.callback_backoff_s * 2 ** (attempts - 1)
        await self.store.callback_done(entry_id, job_id, update, retry_at)
