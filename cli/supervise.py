"""`python -m cli.supervise NAME -- COMMAND...`: run COMMAND, and start it again whenever it dies.

`make run` starts every process of the stack under honcho, which stops them all as soon as any
one of them exits: a crashed worker took Redis, the API and Flower down with it. Each Procfile
entry therefore runs under this wrapper, which restarts its command after a crash (waiting 1 s,
doubling while it keeps dying within 10 s of starting, at most 30 s) and exits only when it is
told to stop (SIGTERM or SIGINT, passed on to the command). Written here rather than switching to
supervisord or circus because honcho's prefixed, coloured output in one terminal is what `make
run` is for, and restarting one child is all that was missing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

_QUICK_S = 10.0  # a command that dies sooner than this after starting is crashing, not finishing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args or args.index("--") != 1 or len(args) < 3:
        sys.exit("usage: python -m cli.supervise NAME -- COMMAND [ARGS...]")
    name, command = args[0], args[2:]
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        code = child.wait()
        if stopping:
            return 0
        delay = min(delay * 2, 30.0) if time.monotonic() - started < _QUICK_S else 1.0
        print(f"{name} exited with code {code}; starting it again in {delay:g}s", flush=True)
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0


if __name__ == "__main__":
    sys.exit(main())
