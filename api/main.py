"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from shared.celery_app import make_celery
from shared.settings import Settings, get_settings

from api import problems
from api.events import JobEvents
from api.limits import BodySizeLimit
from api.routes import forecasts, health, models
from api.service import JobService


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = aioredis.from_url(settings.redis_url, decode_responses=True)
        events = JobEvents(client)
        events.start()
        celery = make_celery(settings)
        app.state.service = JobService(settings, client, celery, events)
        try:
            yield
        finally:
            await events.stop()
            celery.close()
            await client.aclose()

    app = FastAPI(
        title="chronos-queue",
        version="0.1.0",
        summary="Queue-backed forecasting with Amazon Chronos models",
        lifespan=lifespan,
    )
    problems.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (forecasts, models, health):
        app.include_router(module.router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
