"""Job completion events: one Redis subscription per API process wakes every waiter it concerns.

Long-waits and sync predicts never hold a thread or a Redis connection each: they await an
`Announcement` that the single listener sets when a worker publishes the job's id, or its answer
(its record and results) on this process's own answers channel (`channel`: a job a request of
this process waits on names it, `JobRecord.awaited`), which the waiter then needs no read for.
Waiters also re-read the record at a short interval, so a missed message (a Redis reconnect)
costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from shared.store import answers, keys

log = logging.getLogger(__name__)


class Announcement(asyncio.Event):
    """Set when the job is announced; `answer` holds its answer when one came with it (`store.answered`)."""

    answer: Any = None


async def woken(event: asyncio.Event, timeout_s: float) -> None:
    """Return once `event` is set, or after `timeout_s`. `asyncio.timeout`, not `wait_for`, which
    would run the wait as a task of its own: a waited job's request pays for one wait or two."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


class JobEvents:
    def __init__(self, client: aioredis.Redis):
        self._client = client
        self.channel = keys.answers_channel(uuid.uuid4().hex)  # this process's: its answers only
        self._answers = self.channel.encode()
        self._waiters: dict[str, set[Announcement]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job-events")

    async def stop(self) -> None:
        """End the listener; bounded, whatever redis-py does with the cancel."""
        self._stopping = True
        if self._task is None:
            return
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=0.1)
        deadline = asyncio.get_running_loop().time() + 5
        while not done and asyncio.get_running_loop().time() < deadline:
            # redis-py (8.1, seen here) can lose a cancel that lands inside SUBSCRIBE: it returns, and
            # the listen after it waits for ever, so an API's shutdown hung (a CI run did, in a test's
            # TestClient exit). The flag ends the loop once SUBSCRIBE returns; closing the connection
            # ends a read already waiting.
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
            done, _ = await asyncio.wait({self._task}, timeout=0.1)
        if not done:
            log.error("job event listener did not stop; left behind")

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Announcement]:
        """An event set whenever `job_id` is announced, for as long as the block runs."""
        event = Announcement()
        self._waiters[job_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL, self.channel)
                if self._stopping:  # stop() came during SUBSCRIBE, and its cancel may have been lost there
                    return
                async for message in pubsub.listen():
                    if message["channel"] == self._answers:
                        self._answered(message["data"])
                        continue
                    for job_id in message["data"].decode().split():  # one id, or the jobs finished together
                        for event in self._waiters.get(job_id, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to polling until we are back
                if self._stopping:  # or stop() closed the connection
                    return
                log.warning("job event subscription lost (%s); retrying", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _answered(self, message: bytes) -> None:
        try:
            announced = answers(message)
        except Exception as exc:  # never lose the subscription to one message: its waiters re-read
            log.error("unreadable answers message (%s): %r", exc, message[:200])
            return
        for answer in announced:
            for event in self._waiters.get(answer[0], ()):
                event.answer = answer
                event.set()
