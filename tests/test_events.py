"""Server-Sent Events: a job's status and progress as they change, ending with its result."""

from __future__ import annotations

import json

from conftest import BOLT, T5, forecast_body


def events(api, path: str) -> list[tuple[str, dict]]:
    out = []
    with api.stream("GET", path, timeout=120) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.append((name, json.loads(line.removeprefix("data: "))))
    return out


def test_a_backtest_stream_shows_progress_then_ends_with_the_result(api, workers):
    body = {
        "model": T5,
        "series": {"target": [float(t % 9) for t in range(200)]},
        "origins": {"first": 40, "last": 200, "step": 2},
        "context_length": 40,
        "parameters": {"prediction_length": 6, "quantile_levels": [0.5]},
    }
    job = api.post("/v1/backtests", json=body).json()

    seen = events(api, f"/v1/backtests/{job['id']}/events")

    names = [name for name, _ in seen]
    assert names[-1] == "done" and set(names[:-1]) == {"status"}
    final = seen[-1][1]
    assert final["status"] == "succeeded" and len(final["backtest"]["forecasts"]) == 81
    progress = [data["progress"]["done"] for _, data in seen]
    assert progress == sorted(progress) and progress[-1] == 81
    assert any(0 < done < 81 for done in progress), progress  # progress arrived while it ran
    assert all("backtest" not in data for _, data in seen[:-1])  # updates stay small


def test_a_finished_job_streams_its_end_at_once_and_an_unknown_one_is_404(api, workers):
    job = api.post("/v1/predict", json=forecast_body(BOLT, length=30, horizon=2)).json()

    seen = events(api, f"/v1/forecasts/{job['id']}/events")
    missing = api.get("/v1/forecasts/nope/events")

    assert [name for name, _ in seen] == ["done"] and seen[0][1]["predictions"]
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
