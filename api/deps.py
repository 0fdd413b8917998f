"""FastAPI dependencies: the process-wide service and settings."""

from __future__ import annotations

from fastapi import Request

from shared.settings import Settings

from api.service import JobService


def service(request: Request) -> JobService:
    return request.app.state.service


def settings(request: Request) -> Settings:
    return request.app.state.service.settings
