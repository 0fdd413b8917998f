"""The secret that signs this API key's completion callbacks (api/callbacks.py)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api import callbacks
from api.auth import Caller
from api.deps import Jobs
from api.problems import documented

router = APIRouter(prefix="/v1", tags=["callbacks"])


class CallbackSecret(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of this API key's callbacks.")
    header: str = callbacks.SIGNATURE_HEADER
    format: str = "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.<raw body>')>"
    allowed_prefixes: list[str] = Field(description="URL prefixes a callback_url may start with.")


@router.get(
    "/callbacks/secret",
    response_model=CallbackSecret,
    responses=documented("unauthorized", "missing-scope", "redis-unavailable"),
)
async def callback_secret(jobs: Jobs, owner: Caller) -> CallbackSecret:
    """How to check that a callback came from this service: verify its signature with this secret
    (`client.verify_signature` does), and reject old timestamps to stop replays."""
    master = await callbacks.master_secret(jobs.store, jobs.settings)
    return CallbackSecret(
        secret=callbacks.key_secret(master, owner), allowed_prefixes=jobs.settings.callback_prefixes()
    )
