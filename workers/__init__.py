"""Celery workers, each pinned to one Chronos model. Only this side imports torch and chronos."""
