"""Typed errors of the client, each carrying the server's problem+json details."""

from __future__ import annotations

from typing import Any


class ChronosQueueError(Exception):
    """An error answer from the service. `problem` is the full problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.code: str = problem.get("code", "http-error")
        self.detail: str = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        self.field: str | None = problem.get("field")
        self.job_id: str | None = problem.get("job_id")
        self.retry_after = retry_after
        super().__init__(f"{status} {self.code}: {self.detail}")


class InvalidRequest(ChronosQueueError):
    """400, 413 or 422: the request is wrong; `field` names what."""


class Unauthorized(ChronosQueueError):
    """401: missing or wrong API key."""


class NotFound(ChronosQueueError):
    """404: unknown model, or a job that is not (or no longer, or not your) job."""


class Conflict(ChronosQueueError):
    """409: e.g. a model that is not served synchronously, or a job that already finished."""


class RateLimited(ChronosQueueError):
    """429: over this key's quota (retried automatically, honouring Retry-After)."""


class Unavailable(ChronosQueueError):
    """503: no worker, a full queue or Redis away (retried automatically, honouring Retry-After)."""


class ServerError(ChronosQueueError):
    """Another 5xx answer, e.g. a forecast that failed in the model (`job_id` says which)."""


class WaitTimeout(Exception):
    """The job did not finish within the client-side wait; it keeps running on the server."""

    def __init__(self, job_id: str, status: str):
        self.job_id, self.status = job_id, status
        super().__init__(f"job {job_id} still {status}; it continues on the server")


_BY_STATUS = {400: InvalidRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: InvalidRequest,
              422: InvalidRequest, 429: RateLimited, 503: Unavailable}  # fmt: skip


def error_for(status: int, problem: dict[str, Any], retry_after: float | None) -> ChronosQueueError:
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ChronosQueueError)
    return cls(status, problem, retry_after)
