"""API keys: who is calling and what it may do. A key is sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`.

Keys are held only as SHA-256 digests and compared in constant time. A caller is known by
its *owner id* (the first 16 hex digits of its key's digest): jobs record it, the audit log
names the caller by it, and a job asked for under another owner id answers 404, as if it did
not exist (except to an `admin` key, which sees every job's metadata and may cancel it).

A key may be limited (`API_KEYS_FILE` lines `KEY models=chronos-bolt-*,chronos-2 scopes=forecast,read`):
`scopes` is what it may do, `models` the glob patterns of the model ids or slugs it may forecast
with. A plain `KEY` has `forecast` and `read` on every model. Scopes follow the method, so no
route can forget its check: GET (and HEAD) needs `read`, POST and DELETE need `forecast`; `admin`
holds both, and sees and cancels every owner's jobs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from shared import catalog, model_store
from shared.settings import Settings

from api.problems import Problem

ANONYMOUS = "anonymous"  # the owner of every job when auth is disabled
# The owner of keyless calls on the legacy routes (COMPAT_REQUIRE_KEY=false). Never a key's owner
# id, which is 16 hex digits, so these calls never see a keyed caller's jobs, nor it theirs.
LEGACY = "legacy"

FORECAST, READ, ADMIN = "forecast", "read", "admin"
SCOPES = (FORECAST, READ, ADMIN)

# auto_error=False: a missing key is our 401 problem, not FastAPI's 403; declared for /docs' Authorize.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")
# The security requirement, as FastAPI writes it for `caller`, of a route that calls `owner_of`.
SECURITY: list[dict[str, list[str]]] = [{_api_key_header.scheme_name: []}, {_bearer.scheme_name: []}]

# A key file line: the key, then any `models=` and `scopes=` options. Whatever comes before the
# options is the key, so every line that was a key before options existed still is.
_LINE = re.compile(r"^(?P<key>.+?)(?P<options>(?:\s+(?:models|scopes)=\S*)*)\s*$")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What a key may do: its scopes and the model patterns it may forecast with (None: no limit)."""

    scopes: frozenset[str] = frozenset((FORECAST, READ))
    models: tuple[str, ...] | None = None

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    def require(self, scope: str) -> None:
        """403 `missing-scope` unless the key holds `scope` (or `admin`)."""
        if scope not in self.scopes and ADMIN not in self.scopes:
            raise Problem(
                403, "missing-scope", f"scope '{scope}' required; this key has {', '.join(sorted(self.scopes))}",
                scope=scope,
            )  # fmt: skip

    def permit(self, model: str, spec: catalog.ModelSpec | None) -> None:
        """403 `model-not-allowed` unless a pattern matches the model's id or slug (or the name as given)."""
        if self.models is None:
            return
        names = (model, spec.id, spec.slug) if spec else (model,)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.models for name in names):
            raise Problem(403, "model-not-allowed", f"model '{model[:128]}' not allowed for this key", field="model")


FULL = Grant()


def parse_entry(entry: str) -> tuple[str, Grant]:
    """A configured key and its grant, from `KEY [models=PATTERN,...] [scopes=SCOPE,...]`."""
    match = _LINE.match(entry.strip())
    if match is None:
        raise ValueError("empty API key entry")
    options = dict(option.split("=", 1) for option in match["options"].split())
    grant = FULL
    if "scopes" in options:
        scopes = frozenset(s for s in options["scopes"].split(",") if s)
        unknown = sorted(scopes - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {', '.join(unknown)}: the scopes are {', '.join(SCOPES)}")
        grant = Grant(scopes=scopes)
    if "models" in options:
        grant = Grant(grant.scopes, tuple(m for m in options["models"].split(",") if m))
    return match["key"], grant


class KeyRing:
    """The accepted keys, as digests, each with its grant."""

    def __init__(self, entries: list[str], disabled: bool = False, legacy_keyless: bool = False):
        self.disabled, self.legacy_keyless = disabled, legacy_keyless
        grants: dict[str, Grant] = {}
        for entry in entries:
            key, grant = parse_entry(entry)
            digest = _digest(key)
            if grants.get(digest, grant) != grant:
                raise ValueError(f"API key {digest[:16]} is configured twice with different models or scopes")
            grants[digest] = grant
        self._keys = list(grants.items())

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        keys = settings.key_list()
        if not keys and not settings.auth_disabled:
            raise RuntimeError(
                "no API keys configured: set API_KEYS (comma-separated) or API_KEYS_FILE, "
                "or AUTH_DISABLED=true to run without authentication"
            )
        return cls(keys, disabled=settings.auth_disabled, legacy_keyless=not settings.compat_require_key)

    def find(self, presented: str | None) -> tuple[str, Grant] | None:
        """The owner id and grant of a valid key, else None. Every configured digest is compared."""
        if presented is None:
            return None
        digest = _digest(presented)
        match = None
        for candidate, grant in self._keys:
            if hmac.compare_digest(candidate, digest):
                match = (candidate[:16], grant)
        return match

    def owner(self, presented: str | None) -> str | None:
        """The owner id of a valid key, else None."""
        found = self.find(presented)
        return found[0] if found else None


def owner_of(request: Request) -> str:
    """The caller's owner id, or a 401 problem (403 outside the key's scopes). The hot routes
    (`POST /v1/forecasts`, `GET /v1/{jobs}/{job_id}`, the predicts) call it themselves instead of
    declaring `Caller`: FastAPI's solving of `caller` and its two security sub-dependencies cost
    ~30 µs a request (api/deps.py)."""
    return _admit(request, _identify(request.app.state.keys, presented(request)))


async def caller(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency: `owner_of`. Its two parameters declare the key's schemes in OpenAPI (and
    /docs' Authorize); the key is read by `presented`, the one reading the hot routes use too."""
    return owner_of(request)


async def legacy_caller(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency of the legacy routes: as `caller`, except that with COMPAT_REQUIRE_KEY=false
    a call without any key runs as the `LEGACY` owner (the old server had no auth there)."""
    ring: KeyRing = request.app.state.keys
    presented_key = presented(request)
    if presented_key is None and ring.legacy_keyless and not ring.disabled:
        return _admit(request, (LEGACY, FULL))
    return _admit(request, _identify(ring, presented_key))


def presented(request: Request) -> str | None:
    """The key sent, as `X-API-Key` or else as a bearer token (clients that send both send the same
    key); None for neither. Read as FastAPI's `APIKeyHeader` and `HTTPBearer` read them: an empty
    header, or an `Authorization` of another scheme, is no key."""
    headers = request.headers
    if api_key := headers.get("x-api-key"):
        return api_key
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    return credentials if credentials and scheme.lower() == "bearer" else None


def permit_model(request: Request, model: str) -> None:
    """403 unless the caller's key may forecast with `model`; notes the model for the audit log.
    Routes call it as soon as they know the model, before the series are parsed where they can. A
    fine-tuned model is allowed where its base model is."""
    spec = catalog.find(model_store.base_of(model) if model_store.is_finetuned(model) else model)
    request.state.model = model[:128] if spec is None or model_store.is_finetuned(model) else spec.id
    grant: Grant = getattr(request.state, "grant", FULL)
    grant.permit(model, spec)


def is_admin(request: Request) -> bool:
    """The caller's key holds the `admin` scope."""
    grant: Grant = getattr(request.state, "grant", FULL)
    return grant.admin


def _identify(ring: KeyRing, presented: str | None) -> tuple[str, Grant]:
    if ring.disabled:
        return ANONYMOUS, FULL
    found = ring.find(presented)
    if found is None:
        detail = "missing API key" if presented is None else "invalid API key"
        raise Problem(
            401,
            "unauthorized",
            f"{detail}: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


def _admit(request: Request, identity: tuple[str, Grant]) -> str:
    """Record who calls (for the audit log and the model check) and check the method's scope."""
    owner, grant = identity
    request.state.key_id, request.state.grant = owner, grant
    grant.require(READ if request.method in ("GET", "HEAD") else FORECAST)
    return owner


Caller = Annotated[str, Depends(caller)]
LegacyCaller = Annotated[str, Depends(legacy_caller)]
