"""Checking that a completion callback came from chronos-queue (see GET /v1/callbacks/secret)."""

from __future__ import annotations

import hashlib
import hmac
import time


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """True when `header` (X-Chronos-Signature: `t=<unix>,v1=<hex>`) signs `body` (the raw bytes
    received) with `secret`, and its timestamp is within `tolerance_s` of now (replays are refused)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        at = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - at) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))
