"""The FastAPI application: `uvicorn --factory api.main:create_app` (settings read at start)."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from shared.settings import Settings, get_settings
from shared.store import POOL_WAIT_S, AsyncJobStore
from shared.store.connection import PackedConnection

from api import audit, bodies, problems, security
from api.auth import LEGACY, KeyRing
from api.callbacks import Dispatcher
from api.events import JobEvents
from api.hot import HotRoutes
from api.limits import BodySizeLimit
from api.metrics import ApiMetrics, RequestTimer
from api.routes import anomalies, backtests, callbacks, compat, finetunes, forecasts, health, models, predict
from api.service import JobService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:  # started by uvicorn: configure logging as the service logs
        handler = logging.StreamHandler()
        handler.addFilter(security.RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A blocking pool: under a burst, requests wait their turn for a connection (up to
        # POOL_WAIT_S) instead of failing with "Too many connections".
        # A connection that died with a Redis restart is retried on a fresh one, not reported as an error.
        # No socket timeout: with one, redis-py sends every command under asyncio.wait_for, a task
        # per round trip (~20 us of the event loop each; 48 against 69 us for one EVALSHA,
        # measured). The job store bounds each round trip itself (REDIS_TIMEOUT_S, the wait for a
        # connection included).
        # Commands packed in C (shared/store/connection.py); a `unix://` or `rediss://` URL keeps
        # redis-py's own connection class.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, connection_class=PackedConnection,
            max_connections=settings.redis_max_connections, timeout=POOL_WAIT_S,
            retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_timeout=None, socket_connect_timeout=5,
        )  # fmt: skip
        client = aioredis.Redis(connection_pool=pool)  # replies as bytes: the job store decodes what it reads
        # The job events' subscription has a connection of its own: requests that exhaust the pool
        # must not keep it from subscribing again after a reconnect.
        listening = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
        bodies.warm_up(settings)
        events = JobEvents(listening)
        events.start()
        store = AsyncJobStore(client, settings)
        app.state.service = JobService(settings, store, events, app.state.metrics)
        dispatcher = Dispatcher(store, settings) if settings.callback_prefixes() else None
        if dispatcher:
            dispatcher.start()
        # What start-up built (FastAPI's routes and models, Celery, pydantic) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks 100 000 objects
        # (about 50 ms with every request stalled) but only what requests allocate.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if dispatcher:
                await dispatcher.stop()
            await app.state.service.sender.close()
            await events.stop()
            if app.state.audit:
                app.state.audit.close()
            await listening.aclose()
            await client.aclose()
            await pool.disconnect()

    app = FastAPI(
        redirect_slashes=False,  # a redirect would name whatever Host the client sent
        title="chronos-queue",
        version="0.1.0",
        summary="Queue-backed forecasting with Amazon Chronos models",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry, which the service does not configure: left on, it looked for
        # configured providers in the environment at every request (8.5 µs of ~1,300 for a POST).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.keys = KeyRing.from_settings(settings)
    if app.state.keys.legacy_keyless and not settings.auth_disabled:
        log.warning(
            "COMPAT_REQUIRE_KEY=false: the legacy routes (/health, /v1/timeseries/forecast, /forecast/v1/chronos/*, "
            "also under /models/{slug}) accept calls without a key, as one owner %r (LEGACY_RATE_LIMIT_PER_S %g, "
            "LEGACY_MAX_IN_FLIGHT %d); the native /v1 routes still need one",
            LEGACY, settings.legacy_rate_limit_per_s, settings.legacy_max_in_flight,
        )  # fmt: skip
    app.state.metrics = ApiMetrics()
    problems.install(app)
    routers = [
        forecasts.router,
        predict.router,
        backtests.router,
        anomalies.router,
        finetunes.router,
        callbacks.router,
        models.router,
        health.router,
        compat.default,
        compat.per_model,
    ]
    app.add_middleware(HotRoutes, routers=routers)  # innermost: FastAPI's router is skipped for these
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, max_columnar_bytes=settings.max_columnar_body_bytes
    )
    app.state.audit = audit.install(app, settings.audit_log)  # inside SecurityHeaders: it sets the request id
    security.install(app, settings.cors_origin_list())
    app.add_middleware(RequestTimer, metrics=app.state.metrics)  # outermost: times 413s too
    for router in routers:
        app.include_router(router)
    bodies.install(app)
    return app
