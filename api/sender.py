"""Sending jobs' messages to their model's queue: async jobs that arrive together share one.

A flood of one-series jobs costs a worker one Celery delivery (fetch, unacked bookkeeping, ack,
a task thread's claim and finish round trips) per message, and a message per job caps the flood
well below what the model does. So each API process holds the async jobs of a model for a short
window, or until SEND_MAX_JOBS are waiting, and sends their ids as one message; the worker claims,
runs and finishes them together (workers/executor.py).

How long a message stays open depends on how busy the model is in this process. A job that comes
alone (a client sending one job after another, a quiet hour) waits SEND_WINDOW_MS (2 ms). While
jobs of the model keep arriving at least two per SEND_BUSY_WINDOW_MS (a smoothed gap between
arrivals of half that window or less), a message stays open SEND_BUSY_WINDOW_MS (20 ms): under a
flood, a job waits for the model's pass in progress anyway, and a message of 20 to 60 jobs costs a
worker, the API and Redis far less per job than one of a few (bench/README.md).

How often jobs arrive at this process says little about how busy the model is when they arrive
steadily rather than in bursts (many independent clients, several API processes): 250 jobs/s
spread over two processes made messages of 3 jobs in 20 ms, and per job the worker then spent 4
times and the API 1.5 times what they spend on messages of 30. So while every worker of the model
reports in its heartbeat that its model was busy in passes most of the time (`Fleet.saturated`), a
message opens with the busy window even for a job that comes alone, and once a second job joins it
stays open SEND_SATURATED_WINDOW_MS (80 ms) from its opening: its jobs wait for passes in progress
anyway, and the saved CPU goes to the model. A client that sends one job after another, each once
the last was accepted, is held the busy window (20 ms), not 80 ms a job. A saturated window no
longer than the busy window turns this off.

Each job keeps its own id, record, cancel and result. The jobs are not even written before their
message goes: their create scripts are held with it and run together (one pipeline) when it is
sent, and the message names the jobs they created. So what a create answers instead of creating
(a result-cache hit, a join, an idempotent replay, a refusal) also waits for the window: at most
2 ms for a lone job, 80 ms while the model is saturated. A request is answered only once its message
is sent: if the send fails, every job of the message whose request still waits is answered 503 and
ended `failed` (api/service.py), so nothing accepted is ever without a message. (The job of a
request that went away meanwhile stays `queued`: the reaper sends it again after
LOST_MESSAGE_GRACE_S, workers/reaper.py.)

Only small forecasts are held (up to SHARED_MAX_SERIES series): a message's jobs are claimed by
one worker, so a large job would take its neighbours along (and large work is better spread over
workers anyway). Sync jobs are never held: a /v1/predict is sent at once, on its lane, its message
pushed by the script that creates the job (`Sender.alone`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.catalog import ModelSpec
from shared.celery_app import task_message
from shared.store import Lane, bounded, keys


@dataclass
class _Held:
    """A job in a message being filled, and, when the job is not created yet, its create: held
    creates run together when the message is sent, so that they share one round trip (the job
    store's gathering, shared/store/store.py) instead of one each."""

    job_id: str
    create: Callable[[], Awaitable[str | None]] | None = None
    # The create's outcome, for its request (unused for a job created already).
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Open:
    """A message being filled."""

    spec: ModelSpec
    held: list[_Held] = field(default_factory=list)
    sent: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    timer: asyncio.TimerHandle | None = None
    opened: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    extended: bool = False  # held the saturated window: a second job came while the model was saturated


# Jobs of more series than this go in a message of their own.
SHARED_MAX_SERIES = 16
# Weight of the newest gap between two arrivals in a model's smoothed gap.
_SMOOTHING = 0.2
# No job of a model for this long is a quiet spell: its smoothed gap starts again.
_QUIET_S = 1.0


@dataclass
class _Arrivals:
    """When a model's last small async job reached this process, and the smoothed gap between them.
    A gap counts as at most `longest`, so the pauses between a flood's bursts (its clients wait for a
    pass) do not hide the flood; after a quiet spell (`_QUIET_S`) the average starts again from
    `longest`, so the first job goes alone, and a new flood is recognised within a few jobs."""

    longest: float
    last: float = -math.inf
    gap: float = math.inf

    def note(self, now: float) -> float:
        gap, self.last = now - self.last, now
        if gap >= _QUIET_S:
            self.gap = self.longest
        else:
            self.gap += _SMOOTHING * (min(gap, self.longest) - self.gap)
        return self.gap


async def publish(client, spec: ModelSpec, job_ids: list[str]) -> None:
    """Put one message for these small async jobs on their model's queue: the message Celery's
    `send_task` would send (shared/celery_app.py), pushed from the event loop."""
    name = keys.queue(spec)
    await bounded(client.lpush(name, task_message(job_ids, name)))


class Sender:
    def __init__(
        self, client, window_s: float, max_jobs: int, busy_window_s: float = 0.0, saturated_window_s: float = 0.0
    ):
        """`client`: the API's asyncio Redis client (the broker is the job store's Redis)."""
        self.client, self.window_s, self.max_jobs = client, window_s, max_jobs
        self.busy_window_s = max(window_s, busy_window_s)
        self.saturated_window_s = max(self.busy_window_s, saturated_window_s)
        self._open: dict[str, _Open] = {}  # model id -> the message being filled
        self._arrivals: dict[str, _Arrivals] = {}  # model id -> its recent small async jobs
        self._sending: set[asyncio.Task] = set()

    def alone(self, spec: ModelSpec, lane: Lane, small: bool = True, queue: str | None = None) -> str | None:
        """The queue a job's message of its own goes to when the job shares none (a sync job, a large
        one, one for `queue`, no window), or None when `send` may hold it for a shared message. A job
        sent alone has its message pushed by the script that creates it (`JobStore.create`): one round
        trip for both, and never a job without its message."""
        if lane is Lane.SYNC or not small or not self.window_s or self.max_jobs == 1 or queue:
            return queue or keys.lane_queue(spec, lane)
        return None

    async def send(self, spec: ModelSpec, job_id: str) -> None:
        """Return once the small async job's message, shared with the model's other jobs arriving
        meanwhile, is on its queue (raises what sending raised)."""
        # Shielded: a request that goes away (client disconnect) must not cancel its neighbours' send.
        await asyncio.shield(self._hold(spec, _Held(job_id)).sent)

    async def create(
        self, spec: ModelSpec, job_id: str, create: Callable[[], Awaitable[str | None]], saturated: bool = False
    ) -> tuple[str | None, asyncio.Future | None]:
        """Hold a small async job's create with its model's message: the creates of a message run
        together when it is sent (one round trip for all), then the message goes with the ids of the
        jobs they created. A created job's answer waits for its message anyway; what the create
        answers instead (a cache hit, a join, a replay, a refusal) now comes when the message is
        sent, at most the message's window later.

        Returns the create's outcome (`JobStore.create`: None when the job was created) and, when
        created, the message's `sent` future to await (shielded) before answering. A request that
        goes away before its create has run has nothing created. `saturated`: every worker of the
        model is busy in passes (`Fleet.saturated`), so the message may stay open longest."""
        held = _Held(job_id, create)
        message = self._hold(spec, held, saturated)
        outcome = await held.outcome
        return outcome, (message.sent if outcome is None else None)

    def _hold(self, spec: ModelSpec, held: _Held, saturated: bool = False) -> _Open:
        loop = asyncio.get_running_loop()
        arrivals = self._arrivals.get(spec.id) or self._arrivals.setdefault(spec.id, _Arrivals(2 * self.busy_window_s))
        gap = arrivals.note(loop.time())
        message = self._open.get(spec.id)
        if message is None:
            window = self.busy_window_s if 2 * gap <= self.busy_window_s or saturated else self.window_s
            message = self._open[spec.id] = _Open(spec)
            message.timer = loop.call_later(window, self._flush, spec.id)
        elif saturated and not message.extended and message.timer is not None:
            # Company while the model is saturated: the message stays open the saturated window.
            message.timer.cancel()
            message.timer = loop.call_at(message.opened + self.saturated_window_s, self._flush, spec.id)
            message.extended = True
        message.held.append(held)
        if len(message.held) >= self.max_jobs:
            self._flush(spec.id)
        return message

    def _flush(self, model_id: str) -> None:
        message = self._open.pop(model_id, None)
        if message is None:
            return
        if message.timer is not None:
            message.timer.cancel()
        task = asyncio.create_task(self._send(message))
        self._sending.add(task)  # held, so the loop does not drop it mid-send
        task.add_done_callback(self._sending.discard)

    async def _send(self, message: _Open) -> None:
        try:
            job_ids = await self._create(message)
            if job_ids:
                await publish(self.client, message.spec, job_ids)
        except BaseException as exc:  # a failed send, or this task cancelled (shutdown): no request hangs
            for held in message.held:
                if not held.outcome.done():
                    held.outcome.set_exception(exc)
                    held.outcome.exception()  # its request handles it, or has gone
            message.sent.set_exception(exc)
            message.sent.exception()  # each waiting request handles it; none left is no error to log
            if not isinstance(exc, Exception):
                raise
        else:
            message.sent.set_result(None)

    @staticmethod
    async def _create(message: _Open) -> list[str]:
        """Run the message's held creates and give each request its outcome; the ids to send."""
        # Every create is started in this one turn of the event loop: the job store sends them in one
        # pipeline. A create whose request went away is not run.
        creating = [(held, held.create) for held in message.held if held.create and not held.outcome.done()]
        outcomes = await asyncio.gather(*(create() for _, create in creating), return_exceptions=True)
        created = set()
        for (held, _), outcome in zip(creating, outcomes, strict=True):
            if outcome is None:
                created.add(held.job_id)
            if held.outcome.done():  # its request went away meanwhile; a job it created still runs
                continue
            if isinstance(outcome, BaseException):
                held.outcome.set_exception(outcome)
                held.outcome.exception()  # its request handles it, or is cancelled before it can
            else:
                held.outcome.set_result(outcome)
        return [held.job_id for held in message.held if held.create is None or held.job_id in created]

    async def close(self) -> None:
        """Send what is held (at shutdown), and wait for the sends under way."""
        for model_id in list(self._open):
            self._flush(model_id)
        if self._sending:
            await asyncio.wait(self._sending, timeout=10)
