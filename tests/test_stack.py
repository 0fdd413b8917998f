"""The local stack as a user starts it (`make run`'s runner), and scaling out on one queue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from shared import catalog

from conftest import ROOT, forecast_body, free_port, process_table, start_worker, wait_for

pytestmark = pytest.mark.integration


def command_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (honcho starts each of its processes in a session of its own)."""
    parents = {child: parent for child, (parent, _) in process_table().items()}
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "(zombie)" not in Path(f"/proc/{pid}/status").read_text(errors="replace")


def tail(log: Path, n: int = 60) -> str:
    """The run's last lines but the announcer's polls of /v1/models (two a second while it waits),
    which would hide why a worker is not online."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if '"route":"/v1/models"' not in line]
    return "\n".join(lines[-n:])


def session_members(sid: int) -> list[int]:
    """Processes still in session `sid`."""
    return [pid for pid, (_, session) in process_table().items() if session == sid]


def test_run_starts_the_whole_stack_serves_forecasts_and_ctrl_c_leaves_nothing_behind(synthetic_dir, tmp_path):
    api_port, flower_port, redis_port = free_port(), free_port(), free_port()
    metrics_port = free_port(span=2)  # one a worker
    env = {
        **os.environ,
        "API_PORT": str(api_port),
        "FLOWER_PORT": str(flower_port),
        "REDIS_PORT": str(redis_port),
        "WORKER_METRICS_PORT": str(metrics_port),
        "SYNTHETIC_DIR": str(synthetic_dir),
        "CHRONOS_MODELS": "amazon/chronos-bolt-tiny,amazon/chronos-t5-tiny",
    }
    env.pop("REDIS_URL", None)
    log = tmp_path / "run.log"
    runner = subprocess.Popen(
        [sys.executable, "-m", "cli.stack", "run"], cwd=ROOT, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops everything" not in log.read_text():
            assert runner.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.5)
        output = log.read_text()
        assert f"http://127.0.0.1:{api_port}" in output and f"http://127.0.0.1:{flower_port}" in output
        assert "SYNTHETIC weights" in output
        curl = re.search(r"curl -s -X POST '([^']+)' .* -H 'X-API-Key: (\S+)' -d '(.+)'", output)
        assert curl, output[-2000:]
        key = curl.group(2)
        assert f"API key   {key}" in output

        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60, headers={"X-API-Key": key}) as api:
            assert httpx.get(f"http://127.0.0.1:{api_port}/v1/models").status_code == 401  # no key, no service
            sync = api.post("/v1/predict", content=curl.group(3), headers={"content-type": "application/json"})
            assert sync.status_code == 200 and sync.json()["status"] == "succeeded"
            # The stack's Redis keeps its data between runs, so the curl may be a cache hit: also send
            # a request no earlier run sent, which a worker must run.
            fresh = forecast_body("amazon/chronos-bolt-tiny", length=40)
            fresh["inputs"][0]["item_id"] = uuid.uuid4().hex
            assert api.post("/v1/predict", json=fresh).json()["cached"] is False
            job = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-t5-tiny", num_samples=4))
            assert job.status_code == 202
            done = api.get(f"/v1/forecasts/{job.json()['id']}", params={"wait": 60}).json()
            assert done["status"] == "succeeded"
        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert (
            'chronos_queue_worker_jobs_total{model="amazon/chronos-bolt-tiny",outcome="succeeded"}'
            in worker_metrics.text
        )
        flower = httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=10)
        assert flower.status_code == 200
        # Task events are off by default (TASK_EVENTS): Flower's worker list still fills from the
        # workers' heartbeat events.
        seen: set[str] = set()
        listed_by = time.monotonic() + 90
        while not {"chronos-bolt-tiny", "chronos-t5-tiny"} <= seen:
            assert time.monotonic() < listed_by, seen
            listed = httpx.get(f"http://127.0.0.1:{flower_port}/workers", params={"json": 1}, timeout=10).json()
            seen = {w["hostname"].rsplit("-", 1)[0] for w in listed["data"]}
            time.sleep(0.5)
        assert len(descendants(runner.pid)) >= 6  # redis, api, 2 workers, flower, announcer (+ wrappers)

        # A crashed process is started again; the rest of the stack stays up meanwhile.
        crashed = next(pid for pid in descendants(runner.pid) if command_of(pid)[1:] == ["-m", "workers"])
        os.kill(crashed, signal.SIGKILL)
        while output.count("exited with code") == log.read_text().count("exited with code"):
            assert time.monotonic() < deadline + 120, tail(log)
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
        while len([p for p in descendants(runner.pid) if command_of(p)[1:] == ["-m", "workers"]]) < 2:
            assert runner.poll() is None and time.monotonic() < deadline + 240, tail(log)
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120, headers={"X-API-Key": key}) as api:
            again = forecast_body("amazon/chronos-bolt-tiny", length=41)
            again["inputs"][0]["item_id"] = uuid.uuid4().hex
            assert api.post("/v1/predict", json=again, params={"timeout": 60}).json()["status"] == "succeeded"
    finally:
        started = descendants(runner.pid) + session_members(runner.pid)
        runner.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground runner
        try:
            runner.wait(60)
        finally:
            time.sleep(1)  # children the runner did not wait for get a moment to go
            survivors = [pid for pid in started if alive(pid)]
            for pid in survivors:
                os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"processes left behind: {survivors}\n{log.read_text()[-2000:]}"


def test_two_workers_on_one_queue_share_its_jobs(api, redis_server, synthetic_dir, tmp_path):
    model = "amazon/chronos-bolt-small"  # served by nobody else in this session
    from workers import synthetic

    spec = catalog.get(model)
    synthetic.build(spec, synthetic_dir / spec.slug, seed=0)
    # Two slots each: one worker cannot reserve the whole backlog before the other starts.
    pair = [start_worker(redis_server, synthetic_dir, model, tmp_path, WORKER_SLOTS="2") for _ in range(2)]
    try:
        # Distinct bodies: identical ones would be answered from the result cache, not by a worker.
        bodies = [forecast_body(model, n_series=8, length=300 + i) for i in range(30)]
        jobs = [api.post("/v1/forecasts", json=body).json() for body in bodies]
        finished = [wait_for(api, job["id"]) for job in jobs]
        assert [job["status"] for job in finished] == ["succeeded"] * 30
        client = redis_server.client()
        nodes = {client.hget(f"cq:job:{job['id']}", "worker").split("/")[0] for job in finished}
        assert len(nodes) == 2, nodes
        assert api.get(f"/v1/models/{model}").json()["workers_online"] == 2
    finally:
        for worker in pair:
            worker.stop()


def test_chronos_models_all_starts_a_worker_for_every_catalog_model(monkeypatch):
    from cli.stack import models_from_env, procfile

    monkeypatch.setenv("CHRONOS_MODELS", "all")
    specs = models_from_env()
    lines = procfile(specs, 8000, 5555, None, 0).splitlines()

    assert specs == list(catalog.CATALOG)
    assert {line.split(":")[0] for line in lines if line.startswith("worker-")} == {
        f"worker-{m.slug}" for m in catalog.CATALOG
    }
