"""The API server as every launcher starts it (`python -m api`): several processes that behave as
one, and connections that must deliver their request headers in time."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from conftest import API_KEY, process_table, start_api


def children(pid: int) -> list[int]:
    return [child for child, (parent, _) in process_table().items() if parent == pid]


def test_two_api_processes_serve_and_metrics_count_the_requests_of_both(redis_server, tmp_path):
    base, proc = start_api(redis_server, tmp_path)
    try:
        processes = [p for p in children(proc.pid) if Path(f"/proc/{p}/cmdline").read_bytes().count(b"spawn_main")]
        answers = [httpx.get(f"{base}/healthz", headers={"Connection": "close"}).status_code for _ in range(30)]
        text = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(20)

    assert len(processes) == 2
    assert answers == [200] * 30
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chronos_queue_http_request_duration_seconds_count") and 'route="/healthz"' in line
    )
    assert counted >= 30  # every process's requests, whichever process answered /metrics (+ the start-up probes)


def test_a_connection_that_trickles_its_headers_is_closed_and_others_are_served(redis_server, tmp_path):
    base, proc = start_api(redis_server, tmp_path, HEADER_TIMEOUT_S="1")
    host, port = base.removeprefix("http://").split(":")
    try:
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ...and never the blank line that ends the headers
        started = time.monotonic()
        slow.settimeout(10)
        closed = slow.recv(1024) == b""
        waited = time.monotonic() - started
        served = httpx.get(f"{base}/healthz").status_code
    finally:
        proc.terminate()
        proc.wait(20)

    assert closed and 0.5 < waited < 5
    assert served == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_others_are_served(redis_server, tmp_path):
    base, proc = start_api(redis_server, tmp_path, BODY_TIMEOUT_S="1")
    host, port = base.removeprefix("http://").split(":")
    try:
        slow = socket.create_connection((host, int(port)))
        slow.sendall(
            b"POST /v1/forecasts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
            + f"X-API-Key: {API_KEY}\r\n\r\n{{".encode()
        )  # ...and never the rest of the body it announced
        slow.settimeout(10)
        answer = b""
        while b"body-timeout" not in answer:  # the status line and the body may come in separate packets
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
        served = httpx.get(f"{base}/healthz").status_code
    finally:
        proc.terminate()
        proc.wait(20)

    text = answer.decode()
    assert text.startswith("HTTP/1.1 408") and "application/problem+json" in text and "body-timeout" in text
    assert served == 200
