"""`chronos-queue`: operator commands.

    chronos-queue weights synthetic --model amazon/chronos-bolt-tiny --out DIR [--seed N]
    chronos-queue weights resolve --model amazon/chronos-bolt-tiny
    chronos-queue worker   (same as `python -m workers`; CHRONOS_MODEL picks the model)
"""

from __future__ import annotations

import argparse
import sys

from shared import catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chronos-queue", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="checkpoints a worker serves").add_subparsers(
        dest="action", required=True
    )
    build = weights.add_parser("synthetic", help="write a synthetic checkpoint (random weights, real architecture)")
    build.add_argument("--model", required=True, help="catalog id or slug")
    build.add_argument("--out", required=True, help="directory to write the checkpoint to")
    build.add_argument("--seed", type=int, default=0)
    where = weights.add_parser("resolve", help="print where a worker would load its weights from")
    where.add_argument("--model", required=True)

    commands.add_parser("worker", help="start a worker for CHRONOS_MODEL (extra args go to Celery)")

    args, rest = parser.parse_known_args(argv)
    if args.command == "worker":
        from workers.__main__ import main as worker_main

        worker_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        spec = catalog.get(args.model)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.action == "synthetic":
        from workers import synthetic

        path = synthetic.build(spec, args.out, seed=args.seed)
        print(f"synthetic checkpoint of {spec.id} (seed {args.seed}) in {path}: forecasts from it are meaningless")
        return 0
    from shared.settings import get_settings
    from workers.weights import WeightsNotFound, resolve

    try:
        found = resolve(spec, get_settings())
    except WeightsNotFound as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{spec.id}: {found.kind} weights from {found.source}: {found.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
