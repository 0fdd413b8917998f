"""How long the API holds a model's small async jobs before their shared message is sent
(api/sender.py): the short window for a job that comes alone, the busy window under a stream."""

from __future__ import annotations

import asyncio

from shared import catalog
from shared.settings import Settings
from shared.store import CircuitState, Lane, keys

from api import sender
from api.sender import Sender, _Arrivals

BOLT = catalog.get("amazon/chronos-bolt-tiny")


def busy(arrivals: _Arrivals, window: float, times: list[float]) -> list[bool]:
    """For each arrival time, whether a message opened then would take the busy window."""
    return [2 * arrivals.note(t) <= window for t in times]


def test_jobs_one_after_another_never_count_as_busy():
    # A client sending its next job once the last has come back: 300 ms apart, busy window 20 ms.
    assert busy(_Arrivals(0.04), 0.02, [0.3 * i for i in range(50)]) == [False] * 50


def test_a_flood_after_a_quiet_hour_is_recognised_within_a_few_jobs():
    arrivals = _Arrivals(0.04)
    busy(arrivals, 0.02, [0.0, 3600.0])  # one job an hour ago, one now
    flood = busy(arrivals, 0.02, [3600 + 0.001 * i for i in range(1, 40)])
    assert not flood[0] and flood.index(True) <= 10 and all(flood[flood.index(True) :])


def test_a_flood_in_bursts_stays_busy_through_the_pauses_between_them():
    # Closed-loop clients answered together after each pass come back together: 40 jobs 1 ms
    # apart, then 120 ms of nothing, again and again.
    times = [burst * 0.16 + 0.001 * i for burst in range(5) for i in range(40)]
    flags = busy(_Arrivals(0.04), 0.02, times)
    assert all(flags[40:])  # after the first burst, every job is sent in a long-open message


def test_the_first_job_after_a_flood_and_a_quiet_spell_goes_alone():
    arrivals = _Arrivals(0.04)
    flood = busy(arrivals, 0.02, [0.001 * i for i in range(50)])
    assert flood[-1]
    assert busy(arrivals, 0.02, [3600.0]) == [False]


def test_a_lone_job_waits_the_short_window_and_jobs_of_a_stream_the_busy_one(monkeypatch):
    sent: list[list[str]] = []

    async def publish(client, spec, ids):
        sent.append(list(ids))

    monkeypatch.setattr(sender, "publish", publish)

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        s = Sender(None, window_s=0.002, max_jobs=64, busy_window_s=5.0)  # type: ignore[arg-type]
        lone = asyncio.create_task(s.send(BOLT, "lone"))
        await asyncio.sleep(0)
        lone_window = s._open[BOLT.id].timer.when() - loop.time()
        await lone
        # A stream: jobs a few microseconds apart. They fill the message open now, and the next
        # message opened for them stays open the busy window.
        stream = [asyncio.create_task(s.send(BOLT, f"job-{i}")) for i in range(10)]
        await asyncio.sleep(0)
        await s.close()  # sends what is held
        await asyncio.gather(*stream)
        more = asyncio.create_task(s.send(BOLT, "next"))
        await asyncio.sleep(0)
        busy_window = s._open[BOLT.id].timer.when() - loop.time()
        await s.close()
        await more
        return lone_window, busy_window

    lone_window, busy_window = asyncio.run(scenario())
    assert lone_window <= 0.002 and busy_window > 4.0
    assert sent == [["lone"], [f"job-{i}" for i in range(10)], ["next"]]


def test_only_small_async_jobs_wait_for_a_shared_message():
    s = Sender(None, window_s=0.002, max_jobs=64)  # type: ignore[arg-type]
    assert s.alone(BOLT, Lane.ASYNC) is None
    assert s.alone(BOLT, Lane.SYNC) == keys.sync_queue(BOLT)
    assert s.alone(BOLT, Lane.ASYNC, small=False) == keys.queue(BOLT)
    assert s.alone(BOLT, Lane.ASYNC, queue="bolt.rev-1") == "bolt.rev-1"
    assert Sender(None, window_s=0.0, max_jobs=64).alone(BOLT, Lane.ASYNC) == keys.queue(BOLT)  # type: ignore[arg-type]


def test_held_creates_run_together_when_the_message_is_sent_and_only_created_jobs_go_in_it(monkeypatch):
    sent: list[list[str]] = []
    events: list[tuple[str, str]] = []

    async def publish(client, spec, ids):
        sent.append(list(ids))

    monkeypatch.setattr(sender, "publish", publish)

    def create(job_id: str, outcome: str | None = None, error: Exception | None = None):
        async def run() -> str | None:
            events.append(("start", job_id))
            await asyncio.sleep(0)  # the store's round trip
            events.append(("end", job_id))
            if error:
                raise error
            return outcome

        return run

    async def scenario():
        s = Sender(None, window_s=5.0, max_jobs=64)  # type: ignore[arg-type]
        requests = {
            "new": asyncio.create_task(s.create(BOLT, "new", create("new"))),
            "joined": asyncio.create_task(s.create(BOLT, "joined", create("joined", outcome="joined:new"))),
            "failed": asyncio.create_task(s.create(BOLT, "failed", create("failed", error=ConnectionError("down")))),
            "gone": asyncio.create_task(s.create(BOLT, "gone", create("gone"))),
            "also new": asyncio.create_task(s.create(BOLT, "also new", create("also new"))),
        }
        await asyncio.sleep(0)
        assert events == [] and len(s._open[BOLT.id].held) == 5  # held until the message is sent
        requests["gone"].cancel()  # its client went away before the send: nothing is created for it
        await s.close()
        outcomes = await asyncio.gather(*requests.values(), return_exceptions=True)
        return dict(zip(requests, outcomes, strict=True))

    outcomes = asyncio.run(scenario())
    # Every create started before any ended: one turn of the event loop, one pipeline in the store.
    assert events[:4] == [("start", job) for job in ("new", "joined", "failed", "also new")]
    assert sorted(job for kind, job in events[4:] if kind == "end") == sorted(["new", "joined", "failed", "also new"])
    assert outcomes["new"][0] is None and outcomes["new"][1].done() and outcomes["new"][1].exception() is None
    assert outcomes["joined"] == ("joined:new", None)
    assert isinstance(outcomes["failed"], ConnectionError)
    assert isinstance(outcomes["gone"], asyncio.CancelledError)
    assert sent == [["new", "also new"]]


def test_a_request_gone_while_its_create_runs_still_has_its_job_sent(monkeypatch):
    sent: list[list[str]] = []

    async def publish(client, spec, ids):
        sent.append(list(ids))

    monkeypatch.setattr(sender, "publish", publish)

    async def scenario():
        creating = asyncio.Event()
        release = asyncio.Event()

        async def create() -> None:
            creating.set()
            await release.wait()  # the store's round trip, under way when the client goes away

        s = Sender(None, window_s=5.0, max_jobs=64)  # type: ignore[arg-type]
        request = asyncio.create_task(s.create(BOLT, "orphan", create))
        await asyncio.sleep(0)
        closing = asyncio.create_task(s.close())
        await creating.wait()
        request.cancel()
        release.set()
        await closing
        assert request.cancelled()

    asyncio.run(scenario())
    assert sent == [["orphan"]]  # created, so sent: never a job without its message


def test_a_message_of_creates_none_of_which_created_a_job_is_not_sent(monkeypatch):
    sent: list[list[str]] = []

    async def publish(client, spec, ids):
        sent.append(list(ids))

    monkeypatch.setattr(sender, "publish", publish)

    async def joined() -> str:
        return "joined:earlier"

    async def scenario():
        s = Sender(None, window_s=5.0, max_jobs=64)  # type: ignore[arg-type]
        request = asyncio.create_task(s.create(BOLT, "late", joined))
        await asyncio.sleep(0)
        await s.close()
        return await request

    assert asyncio.run(scenario()) == ("joined:earlier", None)
    assert sent == []


def test_while_the_model_is_saturated_a_message_with_company_stays_open_the_saturated_window(monkeypatch):
    async def publish(client, spec, ids):
        pass

    monkeypatch.setattr(sender, "publish", publish)

    async def done() -> None:
        return None

    async def windows() -> tuple[float, float, float]:
        s = Sender(None, window_s=0.002, max_jobs=64, busy_window_s=5.0, saturated_window_s=50.0)  # type: ignore[arg-type]
        first = asyncio.create_task(s.create(BOLT, "first", done, True))
        await asyncio.sleep(0)
        message = s._open[BOLT.id]
        alone = message.timer.when() - message.opened  # one client's job after another: the busy window
        second = asyncio.create_task(s.create(BOLT, "second", done, True))
        await asyncio.sleep(0)
        company = message.timer.when() - message.opened
        await s.close()
        await asyncio.gather(first, second)
        await asyncio.sleep(1.1)  # a quiet spell
        idle = asyncio.create_task(s.create(BOLT, "idle", done, False))
        await asyncio.sleep(0)
        quiet = s._open[BOLT.id].timer.when() - s._open[BOLT.id].opened
        await s.close()
        await idle
        return alone, company, quiet

    alone, company, quiet = asyncio.run(windows())
    assert 4.9 < alone < 5.01 and 49.9 < company < 50.01 and quiet <= 0.003


def test_a_model_is_saturated_only_while_every_live_worker_reports_its_model_busy():
    from api.fleet import SATURATED_BUSY, Fleet

    class Heartbeats:
        live: list[dict] = []

        async def health(self, spec):
            return self.live, CircuitState()

    store = Heartbeats()
    fleet = Fleet(Settings(_env_file=None, heartbeat_s=0.001), store)  # type: ignore[arg-type]

    async def saturated(live: list[dict]) -> bool:
        store.live = live
        await asyncio.sleep(0.002)  # past the fleet's cache of heartbeats
        return await fleet.saturated(BOLT)

    async def cases() -> list[bool]:
        return [
            await saturated([]),  # no worker: nothing to wait for
            await saturated([{"name": "a"}]),  # a worker from before heartbeats said how busy it is
            await saturated([{"busy": 0.95}, {"busy": SATURATED_BUSY - 0.01}]),  # one has room
            await saturated([{"busy": 0.95}, {"busy": SATURATED_BUSY}]),
        ]

    assert asyncio.run(cases()) == [False, False, False, True]
