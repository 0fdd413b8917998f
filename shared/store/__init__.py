"""The job store: the only code that knows Redis key layouts (`keys`), a job's hash fields
(`record`) and the Lua scripts' arguments (`scripts`, `lua/`). Everything else calls the typed
methods of `JobStore` (blocking client) or `AsyncJobStore` (asyncio client)."""

from shared.store.record import TERMINAL, JobKind, JobRecord, JobStatus, Lane
from shared.store.store import (
    POOL_WAIT_S,
    REDIS_TIMEOUT_S,
    SUPERSEDED,
    Appended,
    AsyncJobStore,
    CircuitState,
    JobStore,
    ModelState,
    Outcome,
    PassRead,
    answered,
    answers,
    bounded,
    live,
)

__all__ = ["POOL_WAIT_S", "REDIS_TIMEOUT_S", "SUPERSEDED", "TERMINAL", "Appended", "AsyncJobStore", "CircuitState",
           "JobKind", "JobRecord", "JobStatus", "JobStore", "Lane", "ModelState", "Outcome", "PassRead", "answered",
           "answers", "bounded", "live"]  # fmt: skip
