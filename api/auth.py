"""API keys: who is calling. A key is sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`.

Keys are held only as SHA-256 digests and compared in constant time. A caller is known by
its *owner id* (the first 16 hex digits of its key's digest): jobs record it, and a job
asked for under another owner id answers 404, as if it did not exist.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from shared.settings import Settings

from api.problems import Problem

ANONYMOUS = "anonymous"  # the owner of every job when auth is disabled
# The owner of keyless calls on the legacy routes (COMPAT_REQUIRE_KEY=false). Never a key's owner
# id, which is 16 hex digits, so these calls never see a keyed caller's jobs, nor it theirs.
LEGACY = "legacy"

# auto_error=False: a missing key is our 401 problem, not FastAPI's 403; declared for /docs' Authorize.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The accepted keys, as digests."""

    def __init__(self, keys: list[str], disabled: bool = False, legacy_keyless: bool = False):
        self.disabled, self.legacy_keyless = disabled, legacy_keyless
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys = settings.key_list()
        if not keys and not settings.auth_disabled:
            raise RuntimeError(
                "no API keys configured: set API_KEYS (comma-separated) or API_KEYS_FILE, "
                "or AUTH_DISABLED=true to run without authentication"
            )
        return cls(keys, disabled=settings.auth_disabled, legacy_keyless=not settings.compat_require_key)

    def owner(self, presented: str | None) -> str | None:
        """The owner id of a valid key, else None. Every configured digest is compared."""
        if presented is None:
            return None
        digest = _digest(presented)
        match = None
        for candidate in self._digests:
            if hmac.compare_digest(candidate, digest):
                match = candidate
        return match[:16] if match else None


async def caller(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency: the caller's owner id, or a 401 problem."""
    return _owner(request.app.state.keys, _presented(api_key, bearer))


async def legacy_caller(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency of the legacy routes: as `caller`, except that with COMPAT_REQUIRE_KEY=false
    a call without any key runs as the `LEGACY` owner (the old server had no auth there)."""
    ring: KeyRing = request.app.state.keys
    presented = _presented(api_key, bearer)
    if presented is None and ring.legacy_keyless and not ring.disabled:
        return LEGACY
    return _owner(ring, presented)


def _presented(api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    """The key sent, as `X-API-Key` or else as a bearer token (clients that send both send the same key)."""
    return api_key if api_key is not None else (bearer.credentials if bearer else None)


def _owner(ring: KeyRing, presented: str | None) -> str:
    if ring.disabled:
        return ANONYMOUS
    owner = ring.owner(presented)
    if owner is None:
        detail = "missing API key" if presented is None else "invalid API key"
        raise Problem(
            401,
            "unauthorized",
            f"{detail}: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return owner


Caller = Annotated[str, Depends(caller)]
LegacyCaller = Annotated[str, Depends(legacy_caller)]
