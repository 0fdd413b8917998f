"""Every Redis key, channel and Celery queue name the project uses, built in one place."""

from __future__ import annotations

from shared.catalog import ModelSpec
from shared.store.record import Lane

PREFIX = "cq"

# Workers publish a job id here when the job reaches a terminal state or makes progress (the ids of
# the jobs a worker finishes together go as one message, separated by spaces); API processes keep
# one subscription each and wake the requests waiting on those ids.
EVENTS_CHANNEL = f"{PREFIX}:events"

FORECAST_TASK = "chronos_queue.forecast"

# Completion callbacks (api/callbacks.py): the job-state scripts add a job that has a callback_url
# to this stream when it ends; API processes deliver them as one consumer group. Failed deliveries
# wait in the retry set (score: when to try again). The master secret signs every key's callbacks.
CALLBACKS = f"{PREFIX}:callbacks"
CALLBACK_GROUP = "dispatchers"
CALLBACK_RETRIES = f"{PREFIX}:callbacks:retry"
CALLBACK_MASTER = f"{PREFIX}:callbacks:master"


def job(job_id: str) -> str:
    """Hash holding one job's record and, once it succeeded, its result."""
    return f"{PREFIX}:job:{job_id}"


def job_input(job_id: str) -> str:
    """List of a job's series, one binary element each (`shared.series`), kept until the job ends:
    a worker reads the series of each forward pass from it, and a lost message only needs the id."""
    return f"{PREFIX}:job:{job_id}:in"


def job_input_staged(job_id: str) -> str:
    """A job's series as its create's round trip writes them, renamed to `job_input` by the create
    script once the job is recorded (lua/create.lua): a round trip redis-py sends again after a
    dropped connection rewrites this list, never the job's."""
    return f"{PREFIX}:job:{job_id}:in:staged"


def job_output(job_id: str) -> str:
    """List of a job's results, one float32 element per series (or backtest origin), appended pass by pass."""
    return f"{PREFIX}:job:{job_id}:out"


def job_items(job_id: str) -> str:
    """A job's item ids, start timestamps and input shapes (msgpack), read only to render its results."""
    return f"{PREFIX}:job:{job_id}:items"


def queued(spec: ModelSpec) -> str:
    """Sorted set of a model's jobs accepted and not yet claimed by a worker (score: acceptance time, whole seconds)."""
    return f"{PREFIX}:queued:{spec.slug}"


def sweep_lock(spec: ModelSpec) -> str:
    """Held by the one worker of a model that looks for lost messages (workers/reaper.py)."""
    return f"{PREFIX}:sweep:{spec.slug}"


# kombu's own keys (its Redis transport's defaults): messages handed to a worker and not yet
# acked, and when each was handed out. Read by the reaper, written only by kombu.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


def answers_channel(listener: str) -> str:
    """Pub/sub channel of one API process's job events listener (`listener`: its random id): the
    answers (record and results) of the jobs its requests wait on (`JobRecord.awaited`), published
    by the worker that finishes them, so the waiters read nothing more (store.answers, lua/finish.lua)."""
    return f"{PREFIX}:answers:{listener}"


def in_flight(owner: str) -> str:
    """Sorted set of an owner's jobs not yet finished (score: acceptance time, whole seconds), for the in-flight cap."""
    return f"{PREFIX}:inflight:{owner}"


def rate_bucket(owner: str) -> str:
    """Hash holding an owner's token bucket (tokens, last refill), for the submission rate limit."""
    return f"{PREFIX}:rate:{owner}"


def idempotency(owner: str, key_digest: str) -> str:
    """The job an owner's Idempotency-Key named: '<job id> <request digest>'."""
    return f"{PREFIX}:idem:{owner}:{key_digest}"


def flight(owner: str, digest: str) -> str:
    """The job serving an owner's request (by digest) while it is queued or running (single-flight: api/service.py)."""
    return f"{PREFIX}:flight:{owner}:{digest}"


def cache(digest: str) -> str:
    """A cached result's record fields (JSON), by `shared.cache.digest` of model, weights revision and request."""
    return f"{PREFIX}:cache:{digest}"


def cache_output(digest: str) -> str:
    """A cached result's output list (a copy of the job's `job_output`)."""
    return f"{PREFIX}:cache:{digest}:out"


def workers(spec: ModelSpec, train: bool = False) -> str:
    """Hash of the workers serving a model (with `train`: fine-tuning it): worker name -> JSON heartbeat."""
    return f"{PREFIX}:{'trainers' if train else 'workers'}:{spec.slug}"


# Hash of the fine-tuned models: model id -> JSON manifest (owner, base model, where its weights are).
FINETUNED = f"{PREFIX}:finetuned"


def circuit(spec: ModelSpec) -> str:
    """Hash of a model's circuit breaker while it is not closed (state, opened_at, probes); absent: closed."""
    return f"{PREFIX}:circuit:{spec.slug}"


def outcomes(spec: ModelSpec, bucket: int) -> str:
    """Hash counting a model's jobs that ended `ok` or `failed` in one time bucket (the breaker's window)."""
    return f"{PREFIX}:outcomes:{spec.slug}:{bucket}"


def revisions(spec: ModelSpec) -> str:
    """Hash of the weights revisions a model's workers served: '<revision>:first' / '<revision>:last' -> time."""
    return f"{PREFIX}:revisions:{spec.slug}"


def queue(spec: ModelSpec) -> str:
    """The model's bulk queue, named by its slug (also the Redis list Celery keeps it in)."""
    return spec.slug


def sync_queue(spec: ModelSpec) -> str:
    """The model's synchronous lane; its workers drain it before the bulk queue."""
    return f"{spec.slug}.sync"


def train_queue(spec: ModelSpec) -> str:
    """The model's fine-tuning queue, consumed by its training workers only."""
    return f"{spec.slug}.train"


def lane_queue(spec: ModelSpec, lane: Lane) -> str:
    """The queue a job of `lane` is sent to."""
    return {Lane.SYNC: sync_queue, Lane.ASYNC: queue, Lane.TRAIN: train_queue}[lane](spec)


def revision_queue(spec: ModelSpec, revision: str) -> str:
    """The queue of jobs pinned to one weights revision (both lanes): only workers serving it consume it.
    A hub commit is shortened to 12 hex digits, as git does."""
    short = revision[: len("hub-") + 12] if revision.startswith("hub-") else revision
    return f"{spec.slug}.rev-{short}"


def worker_queues(spec: ModelSpec, revision: str | None = None, train: bool = False) -> tuple[str, ...]:
    """A worker's queues in the order it must poll them: sync lane first, then the jobs pinned to its
    revision, then the bulk queue. A training worker's: its model's fine-tuning queue alone."""
    if train:
        return (train_queue(spec),)
    if revision is None:
        return (sync_queue(spec), queue(spec))
    return (sync_queue(spec), revision_queue(spec, revision), queue(spec))


def model_queues(spec: ModelSpec) -> tuple[str, ...]:
    """The model's fixed queues, whoever consumes them (a pinned revision's queue comes and goes)."""
    return (*worker_queues(spec), train_queue(spec))
