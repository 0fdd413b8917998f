"""The Python client (blocking and asyncio) and the `chronos-queue forecast` command, against the
API as deployed and real workers."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import time

import httpx
import pytest

from client import AsyncClient, Client, InvalidRequest, NotFound, RateLimited, Unauthorized
from shared.store import JobStatus

from conftest import API_KEY, BOLT, ROOT, T5

pytestmark = pytest.mark.integration


def history(n: int, k: int = 0) -> list[float]:
    return [10.0 + ((t + k) % 12) + 0.1 * k for t in range(n)]


def test_blocking_client_submits_waits_predicts_cancels_and_lists(live_api, workers):
    with Client(live_api, api_key=API_KEY) as cq:
        job = cq.submit(T5, [history(40), {"target": history(30, 1), "item_id": "b"}], 4, num_samples=4)
        done = cq.wait(job.id, timeout=120)
        fast = cq.predict(BOLT, [history(64)], 6, quantile_levels=[0.5])
        queued = cq.submit("amazon/chronos-bolt-mini", [history(20)], 2)  # no worker: stays queued
        cancelled = cq.cancel(queued.id)
        models = {m.id: m for m in cq.models()}

    assert done.status is JobStatus.SUCCEEDED and [p["item_id"] for p in done.predictions] == [None, "b"]
    assert fast.status is JobStatus.SUCCEEDED and len(fast.predictions[0]["0.5"]) == 6
    assert cancelled.status is JobStatus.CANCELLED
    assert models[BOLT].workers_online >= 1 and models[BOLT].weights == "synthetic"


def test_errors_are_typed_and_carry_the_problem_details(live_api):
    with Client(live_api, api_key=API_KEY) as cq:
        with pytest.raises(NotFound) as unknown:
            cq.submit("amazon/chronos-nope", [history(10)], 2)
        with pytest.raises(InvalidRequest) as invalid:
            cq.submit(BOLT, [history(10)], 0)
    with Client(live_api, api_key="wrong") as stranger, pytest.raises(Unauthorized):
        stranger.models()

    assert unknown.value.status == 404 and unknown.value.code == "unknown-model" and unknown.value.field == "model"
    assert invalid.value.status == 422 and invalid.value.field == "parameters.prediction_length"


def test_async_client_runs_many_forecasts_concurrently(live_api, workers):
    async def main():
        async with AsyncClient(live_api, api_key=API_KEY) as cq:
            jobs = await asyncio.gather(*(cq.predict(BOLT, [history(50, k)], 3) for k in range(8)))
            submitted = await cq.submit(BOLT, [history(50)], 3)
            return jobs, await cq.wait(submitted.id, timeout=60)

    jobs, waited = asyncio.run(main())

    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 8
    assert waited.status is JobStatus.SUCCEEDED


def test_429_and_503_are_retried_after_the_servers_retry_after_then_raised_when_retries_run_out():
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "0.2"}, json={"code": "rate-limited"}),
         httpx.Response(503, headers={"Retry-After": "0.2"}, json={"code": "no-worker"}),
         httpx.Response(200, json=[])]
    )  # fmt: skip
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        return next(answers)

    with Client("http://cq.test", transport=httpx.MockTransport(handler)) as cq:
        assert cq.models() == []
    with Client("http://cq.test", max_retries=1, transport=httpx.MockTransport(
        lambda r: httpx.Response(429, headers={"Retry-After": "0"}, json={"code": "rate-limited", "detail": "slow down"})
    )) as cq, pytest.raises(RateLimited) as limited:  # fmt: skip
        cq.models()

    assert len(seen) == 3 and seen[1] - seen[0] >= 0.2 and seen[2] - seen[1] >= 0.2
    assert limited.value.detail == "slow down" and limited.value.retry_after == 0


def cli(*args: str, live_api: str, command: str = "forecast", progress: bool = False) -> subprocess.CompletedProcess:
    quiet = [] if progress else ["--no-progress"]
    return subprocess.run(
        [sys.executable, "-m", "cli.main", command, *args, "--url", live_api, "--api-key", API_KEY, *quiet],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_cli_forecasts_a_long_csv_with_future_timestamps_and_draws_a_plot(live_api, workers, tmp_path):
    source = tmp_path / "sales.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "timestamp", "target"])
        for item in ("north", "south", "east"):
            for day in range(40):
                writer.writerow([item, f"2025-01-{1 + day % 31:02d}" if day < 31 else f"2025-02-{day - 30:02d}",
                                 10 + (day % 7) + len(item)])  # fmt: skip
    out, png = tmp_path / "forecast.csv", tmp_path / "forecast.png"

    done = cli(str(source), "--model", BOLT, "--horizon", "5", "--out", str(out), "--plot", str(png),
               "--series-per-job", "2", live_api=live_api)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "SYNTHETIC weights" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["item_id"] for r in rows] == ["north"] * 5 + ["south"] * 5 + ["east"] * 5
    assert [r["timestamp"][:10] for r in rows[:5]] == [
        "2025-02-10",
        "2025-02-11",
        "2025-02-12",
        "2025-02-13",
        "2025-02-14",
    ]
    assert set(rows[0]) >= {"step", "mean", "0.1", "0.5", "0.9"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_reads_wide_csv_and_json_and_writes_json(live_api, workers, tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text("a,b\n" + "\n".join(f"{1 + i % 5},{2 + i % 3}" for i in range(30)) + "\n")
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"x": history(30), "y": history(30, 2)}))

    from_wide = cli(str(wide), "--model", BOLT, "--horizon", "3", "--format", "json", live_api=live_api)
    from_json = cli(str(named), "--model", BOLT, "--horizon", "2", "--format", "json", live_api=live_api)

    assert from_wide.returncode == 0, from_wide.stderr
    assert [(r["item_id"], r["step"]) for r in json.loads(from_wide.stdout)] == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)
    ]  # fmt: skip
    assert "timestamp" not in json.loads(from_wide.stdout)[0]
    assert [r["item_id"] for r in json.loads(from_json.stdout)] == ["x", "x", "y", "y"]


def test_cli_reports_a_bad_request_with_its_field_and_fails(live_api, tmp_path):
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"x": history(30)}))

    done = cli(str(named), "--model", BOLT, "--horizon", "0", live_api=live_api)

    assert done.returncode == 1
    assert "422" in done.stderr and "parameters.prediction_length" in done.stderr


def test_client_and_cli_run_a_backtest_with_progress_and_scores(live_api, workers, tmp_path):
    with Client(live_api, api_key=API_KEY) as cq:
        job = cq.wait(cq.submit_backtest(BOLT, history(80), 60, 70, 3, step=5, context_length=40).id)
    named = tmp_path / "spy.json"
    named.write_text(json.dumps({"SPY": history(120), "QQQ": history(120, 3)}))
    out = tmp_path / "origins.csv"

    done = cli(str(named), "--item", "QQQ", "--model", BOLT, "--horizon", "4", "--first", "100", "--step", "2",
               "--context", "64", "--out", str(out), live_api=live_api, command="backtest", progress=True)  # fmt: skip

    assert job.status.value == "succeeded" and [f["origin"] for f in job.backtest["forecasts"]] == [60, 65, 70]
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert scores["item_id"] == "QQQ" and scores["origins_scored"] == 10 and scores["mase"] > 0
    assert "11/11" in done.stderr  # the progress bar counted every origin (100, 102, … 120)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 11 * 4 and rows[0]["origin"] == "100" and rows[0]["actual"] == str(history(120, 3)[100])


def test_a_large_job_goes_as_arrow_and_its_results_come_back_as_a_table(live_api, workers):
    series = [{"item_id": f"store-{k}", "target": [float((t * (k + 3)) % 17) for t in range(24)]} for k in range(300)]
    unnamed = [[float(t % 5) for t in range(24)]] * 256

    with Client(live_api, api_key=API_KEY) as cq:
        done = cq.wait(cq.submit(BOLT, series, 4, quantile_levels=[0.5]).id, timeout=120)
        table = cq.results_table(done.id)
        positional = cq.wait(cq.submit(BOLT, unnamed, 2).id, timeout=120)

    assert done.status.value == "succeeded" and [p["item_id"] for p in done.predictions] == [
        s["item_id"] for s in series
    ]
    assert table.num_rows == 300 * 4 and table.column_names == ["item_id", "step", "mean", "0.5"]
    assert table["0.5"].to_pylist()[-4:] == pytest.approx(done.predictions[-1]["0.5"], rel=1e-6)
    assert [p["item_id"] for p in positional.predictions][:3] == ["0", "1", "2"]  # no ids: named by position


def test_a_large_job_whose_series_carry_a_start_goes_as_json_and_gets_its_starts_back(live_api, workers):
    series = [
        {"item_id": f"s{k}", "start": "2026-01-05", "target": [float(t % 7) for t in range(20)]} for k in range(256)
    ]

    with Client(live_api, api_key=API_KEY) as cq:
        done = cq.wait(cq.submit(BOLT, series, 2).id, timeout=120)

    assert done.status.value == "succeeded"
    assert {p["start"] for p in done.predictions} == {"2026-01-05"}


def test_submit_with_wait_answers_with_the_finished_job_in_one_request(live_api, workers):
    with Client(live_api, api_key=API_KEY) as cq:
        done = cq.submit(BOLT, [[float(t % 6) for t in range(30)]], 3, wait=30)

    async def submit_async():
        async with AsyncClient(live_api, api_key=API_KEY) as cq:
            return await cq.submit(BOLT, [[float(t % 4) for t in range(31)]], 3, wait=30)

    done_async = asyncio.run(submit_async())

    assert done.status.value == done_async.status.value == "succeeded"
    assert len(done.predictions) == len(done_async.predictions) == 1


def test_client_and_cli_flag_anomalies_and_draw_them(live_api, workers, tmp_path):
    spiky = history(90)
    spiky[70] = 1e5
    many = [{"item_id": f"m{k}", "target": history(34, k)} for k in range(260)]  # enough to go as Arrow
    with Client(live_api, api_key=API_KEY) as cq:
        job = cq.wait(cq.submit_anomalies(BOLT, [spiky], level=0.8, context_length=32).id)
        bulk = cq.wait(cq.submit_anomalies(BOLT, many, context_length=32).id, timeout=120)
    source = tmp_path / "meters.json"
    source.write_text(json.dumps({"meter": spiky}))
    out, png = tmp_path / "flags.csv", tmp_path / "flags.png"

    done = cli(str(source), "--model", BOLT, "--context", "32", "--out", str(out), "--plot", str(png),
               live_api=live_api, command="anomalies", progress=True)  # fmt: skip

    (found,) = job.anomalies
    assert found["start"] == 32 and found["anomaly"][70 - 32] is True
    assert bulk.status.value == "succeeded" and [a["item_id"] for a in bulk.anomalies] == [s["item_id"] for s in many]
    assert all(len(a["score"]) == 2 for a in bulk.anomalies)
    assert done.returncode == 0, done.stderr
    assert "58/58" in done.stderr and "SYNTHETIC weights" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 58 and rows[0]["index"] == "32" and rows[0]["item_id"] == "meter"
    assert [r["anomaly"] for r in rows if r["index"] == "70"] == ["True"]
    assert [r["anomaly"] == "True" for r in rows] == found["anomaly"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
