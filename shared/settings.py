"""Settings from the environment (and an optional `.env`), shared by the API and the workers."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import catalog


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections one API process may open to Redis (requests beyond wait for one).
    redis_max_connections: int = Field(200, ge=4)

    # Job lifetime. A record and its result live result_ttl_s after the job ends.
    result_ttl_s: int = Field(86_400, ge=60)
    # The longest a single job may run; also sets the broker's visibility timeout (see below).
    max_job_s: int = Field(3_600, ge=10)

    # Request limits (HTTP 413 / 422 when exceeded). JSON bodies cost ~6 ns per byte to parse, so
    # their cap bounds how long one request holds its API process; Arrow and Parquet bodies cost
    # next to nothing to read and have a cap of their own. A body must arrive within
    # BODY_TIMEOUT_S (408 otherwise), so slow senders cannot hold connections open.
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_columnar_body_bytes: int = Field(1024 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(60.0, gt=0)
    # A request's headers must arrive within this (api/protocol.py): slow senders cannot hold connections.
    header_timeout_s: float = Field(10.0, gt=0)
    max_series: int = Field(100_000, ge=1)
    # Values in one answer: series x variates x horizon x (mean + quantile levels + samples).
    max_output_values: int = Field(20_000_000, ge=1)
    max_points: int = Field(8_192, ge=1)
    max_prediction_length: int = Field(1_024, ge=1)
    max_num_samples: int = Field(100, ge=1)
    max_quantile_levels: int = Field(21, ge=1)
    # Chronos-2: target variates plus covariates in one series.
    max_variates: int = Field(64, ge=1)
    # Forecast origins in one backtest job.
    max_backtest_origins: int = Field(10_000, ge=1)
    # Forecasts (one per scored point, or per `horizon` points) in one anomaly job, over all its series.
    max_anomaly_windows: int = Field(50_000, ge=1)
    # Series of one cross-learning request (Chronos-2): they run as one group in one forward pass,
    # whose attention across series grows with the square of its size.
    cross_learning_max_series: int = Field(256, ge=1)

    # Admission, per API key: job submissions per second (token bucket; 0: no limit) and burst,
    # and jobs not yet finished (0: no cap), both answered 429; per model, messages waiting in its
    # queue (0: no cap), answered 503. All with Retry-After.
    rate_limit_per_s: float = Field(200.0, ge=0)
    rate_limit_burst: int = Field(400, ge=1)
    max_in_flight: int = Field(10_000, ge=0)
    max_queue_depth: int = Field(100_000, ge=0)
    # Async jobs that arrive at one API process within SEND_WINDOW_MS of each other go to their model's
    # queue as one message, up to SEND_MAX_JOBS (api/sender.py): a flood of one-series jobs costs a
    # worker one Celery delivery per batch, not per job. 0 sends each job on its own. While a model's
    # jobs keep coming (two or more per SEND_BUSY_WINDOW_MS), a message stays open that long instead.
    # While every worker of the model is saturated (busy in passes), a message opens with the busy
    # window even for a lone job and stays open SEND_SATURATED_WINDOW_MS once a second job joins.
    send_window_ms: float = Field(2.0, ge=0, le=1000)
    send_busy_window_ms: float = Field(20.0, ge=0, le=1000)
    send_saturated_window_ms: float = Field(80.0, ge=0, le=1000)
    send_max_jobs: int = Field(64, ge=1, le=1024)
    # The same limits for the keyless callers of the legacy routes (COMPAT_REQUIRE_KEY=false), who
    # share one owner: at most one key's rate, and far fewer unfinished jobs (the evaluation client
    # holds 4 in flight), since anyone who can reach the port counts against them.
    legacy_rate_limit_per_s: float = Field(200.0, ge=0)
    legacy_rate_limit_burst: int = Field(400, ge=1)
    legacy_max_in_flight: int = Field(256, ge=0)

    # How long a deterministic request's result is kept to answer identical requests (0: no cache),
    # and who shares it: `key` (default) answers only the API key that sent the request first;
    # `global` answers any key, which tells one key that another sent the same series.
    cache_ttl_s: int = Field(3_600, ge=0)
    cache_scope: str = Field("key", pattern="^(key|global)$")

    # Synchronous lane. SYNC_MODELS (comma-separated ids or slugs) overrides the catalog's defaults.
    sync_models: str | None = None
    sync_timeout_default_s: float = Field(10.0, gt=0)
    sync_timeout_max_s: float = Field(60.0, gt=0)
    wait_max_s: float = Field(60.0, gt=0)

    # Routing of requests between models (api/routing.py), parsed once at start. FALLBACKS: chains
    # `a>b>c` (ids or slugs), several separated by ';' or ','; a sync call for a model with no live
    # worker or an open circuit is served by the next model of its chain. AB_SPLITS:
    # `requested=90,candidate=10` (shares in percent), several separated by ';'. ENSEMBLES:
    # `name=median(a,b)` or `name=mean(a,b,c)`, several separated by ';'.
    fallbacks: str | None = None
    ab_splits: str | None = None
    ensembles: str | None = None
    # Circuit breaker per model (api/breaker.py): when at least BREAKER_MIN_JOBS jobs of a model ended
    # within BREAKER_WINDOW_S and at least BREAKER_FAILURE_RATIO of them failed, its circuit opens:
    # sync calls are refused (or fall back) for BREAKER_COOLOFF_S, then BREAKER_PROBES calls at a
    # time go through, and the first success closes it (a failure opens it again).
    breaker_window_s: float = Field(60.0, gt=0)
    breaker_min_jobs: int = Field(20, ge=1)
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1)
    breaker_cooloff_s: float = Field(30.0, gt=0)
    breaker_probes: int = Field(3, ge=1)

    # Access. Keys come from API_KEYS (comma-separated) and/or API_KEYS_FILE (one per line, `#` comments,
    # each line `KEY` or `KEY models=PATTERN,... scopes=SCOPE,...`: api/auth.py).
    # With neither, the API refuses to start unless AUTH_DISABLED=true says so explicitly.
    api_keys: str | None = None
    api_keys_file: str | None = None
    auth_disabled: bool = False

    # Completion callbacks: URL prefixes a job's callback_url may start with (comma-separated, each
    # `scheme://host[:port][/path]`); none by default, which refuses every callback_url. Deliveries are
    # HMAC-signed with a per-key secret derived from CALLBACK_SECRET (generated and kept in Redis when
    # unset), tried at most CALLBACK_MAX_ATTEMPTS times, waiting CALLBACK_BACKOFF_S, doubling, between.
    callback_allowed_urls: str | None = None
    callback_secret: str | None = None
    callback_max_attempts: int = Field(5, ge=1)
    callback_backoff_s: float = Field(2.0, gt=0)
    callback_timeout_s: float = Field(5.0, gt=0)

    # The audit log (api/audit.py), one JSON line per request: `-` writes it to stdout, a path
    # appends it to that file (several API processes may share one), `off` writes none.
    audit_log: str = "-"

    # Browser origins allowed to call the API (comma-separated); none by default, so no CORS headers.
    cors_origins: str | None = None

    # Compatibility routes (docs/api.md, compat routes): the model behind un-prefixed /forecast/v1/chronos/*, how long
    # a compat call waits for its forecast (the evaluation client gives up after 300 s), and how long
    # /initialization waits for a worker to come online.
    compat_model: str = "amazon/chronos-t5-tiny"
    compat_timeout_s: float = Field(290.0, gt=0)
    compat_init_wait_s: float = Field(30.0, ge=0)
    # false: the legacy routes (/health, /v1/timeseries/forecast, /forecast/v1/chronos/*, and their
    # /models/{slug} forms) take calls without a key, as the old server did, as the one owner
    # "legacy". A key that is sent must still be valid; the native routes always need one.
    compat_require_key: bool = True

    # Workers.
    chronos_model: str | None = None
    device: str = "auto"
    # The model's weights and activations: auto is bfloat16 on CUDA, float32 on a CPU. bfloat16 on
    # a CPU with AVX512-BF16 or AMX ran bolt-tiny 3.2x as fast (64 series: 33 against 104 ms) with
    # medians within 0.05 % of float32's on synthetic weights; not the default there, as it changes
    # the numbers a CPU deployment answers (bench/README.md).
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16)$")
    # real: MODEL_PATH or the Hugging Face cache, else refuse to start. synthetic: always serve a
    # synthetic checkpoint. any: real when cached, else synthetic (what `make run` uses).
    weights: str = Field("real", pattern="^(real|synthetic|any)$")
    model_path: str | None = None
    synthetic_dir: str = ".cache/synthetic"
    synthetic_seed: int = 0
    # Jobs a worker holds at once (Celery thread slots), all feeding the model threads that batch
    # across them (workers/batcher.py). 0: twice the model's batch limit, at least 8, at most 1024.
    worker_slots: int = Field(0, ge=0)
    # Series per forward pass (0: the catalog's limit for the device). Halved on out-of-memory.
    max_batch: int = Field(0, ge=0)
    # Wait this long for more work when a batch is not full (0: run at once; work piles up meanwhile).
    batch_wait_ms: float = Field(0.0, ge=0)
    # On a GPU a /v1/predict's pass waits for the async pass in progress (on a CPU it runs beside it:
    # workers/batcher.py). For SYNC_GUARD_S after a sync request, passes of async work take at most
    # SYNC_GUARD_BATCH series (0: a quarter of the batch limit), so that pass is a short one; without
    # sync traffic async passes are full size. Unset: 10 s on a GPU, off on a CPU, where short async
    # passes only cost the flood (bench/README.md).
    sync_guard_s: float | None = Field(None, ge=0)
    sync_guard_batch: int = Field(0, ge=0)
    torch_threads: int = Field(0, ge=0)
    # Model threads of the async lane, each running passes of its own (workers/batcher.py); on a CPU
    # each gets TORCH_THREADS intra-op threads (unset: the cores shared out among them).
    async_threads: int = Field(1, ge=1, le=64)
    # A training worker (`python -m workers --train`): consumes its model's fine-tuning queue only.
    train: bool = False
    # Where fine-tuned weights are kept (adapters or full checkpoints, each with a manifest): a
    # directory every worker of the base model (and the API, which deletes them) can read.
    model_store: str = ".cache/finetuned"
    # Fine-tuned models an inference worker keeps loaded (least recently used out); each is a full
    # copy of the base model's weights in memory (amazon/chronos-2: ~0.5 GB in float32).
    finetuned_cache: int = Field(4, ge=1)
    # Steps of one fine-tuning job (it must also end within MAX_JOB_S, or it fails).
    max_finetune_steps: int = Field(1_000, ge=1)
    heartbeat_s: float = Field(5.0, gt=0)
    # A job still queued after this long with its message nowhere is sent again (workers/reaper.py).
    lost_message_grace_s: float = Field(30.0, gt=0)
    # A job is delivered at most this many times: each redelivery means its worker died running it.
    max_deliveries: int = Field(3, ge=1)
    # Celery task events (task received / started / succeeded), which only Flower's task list shows.
    # They cost three messages through Redis per Celery message, about a fifth of a worker's CPU
    # outside the model under a flood (bench/README.md), so they are off unless asked for. Flower's
    # queues and workers need none: workers still send their heartbeats.
    task_events: bool = False
    # Prometheus endpoint of a worker (0 = none). Each worker on one host needs its own port.
    metrics_port: int = Field(0, ge=0, le=65535)

    @field_validator("sync_models")
    @classmethod
    def _known_sync_models(cls, value: str | None) -> str | None:
        unknown = [name for name in _split(value) if catalog.find(name) is None]
        if unknown:
            raise ValueError(f"unknown model(s) in SYNC_MODELS: {', '.join(unknown)}")
        return value

    @field_validator("compat_model")
    @classmethod
    def _known_compat_model(cls, value: str) -> str:
        if catalog.find(value) is None:
            raise ValueError(f"unknown model in COMPAT_MODEL: {value}")
        return value

    def callback_prefixes(self) -> list[str]:
        return _split(self.callback_allowed_urls)

    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    def key_list(self) -> list[str]:
        """The configured API keys, from API_KEYS and API_KEYS_FILE together."""
        found = _split(self.api_keys)
        if self.api_keys_file:
            with open(self.api_keys_file, encoding="utf-8") as f:
                found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        return found

    @property
    def visibility_timeout_s(self) -> int:
        """Redis redelivers unacked messages after this; it must outlast the longest job or jobs run twice."""
        return self.max_job_s + 600

    def sync_eligible(self, spec: catalog.ModelSpec) -> bool:
        if self.sync_models is None:
            return spec.sync_eligible
        return any(catalog.find(name) is spec for name in _split(self.sync_models))


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
