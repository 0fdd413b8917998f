"""Container health check: `python -m workers.health` exits 0 when this host's worker answers a Celery ping."""

from __future__ import annotations

import socket
import sys

from shared.celery_app import make_celery
from shared.settings import get_settings


def main() -> int:
    host = socket.gethostname()
    replies = make_celery(get_settings()).control.ping(timeout=5.0) or []  # None only when no reply is asked for
    alive = [name for reply in replies for name in reply if name.endswith(f"@{host}")]
    print(f"worker on {host}: {'pong from ' + ', '.join(alive) if alive else 'no answer'}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
