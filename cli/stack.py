"""`make run`: the whole stack on this machine, in the foreground, under honcho.

    python -m cli.stack run        write .run/Procfile and exec honcho (Ctrl-C stops everything)
    python -m cli.stack announce   (a Procfile entry) wait until ready, print where everything is

Environment: CHRONOS_MODELS (comma-separated ids or slugs, or `all`: a worker for every catalog
model; the evaluation strategies use chronos-t5-tiny, chronos-t5-mini, chronos-t5-base and
chronos-bolt-mini), CHRONOS_TRAIN_MODELS (comma-separated: a training worker for each, which runs
its fine-tuning jobs; default none; amazon/chronos-2 can be fine-tuned), MODEL_STORE
(.cache/finetuned: where fine-tuned models are kept), API_PORT (8000), FLOWER_PORT (5555),
REDIS_PORT (6379, for the Redis it starts), WORKER_METRICS_PORT (9101: the first worker's
Prometheus port, the next ones count up; 0 for none), REDIS_URL (use that Redis, start none),
WEIGHTS (any: real from the Hugging Face cache when present, else synthetic),
INSTALL_REDIS (1: apt-get install redis-server when missing and running as root),
API_KEYS / API_KEYS_FILE / AUTH_DISABLED (with none set, a dev key is made once, kept in .run/dev-api-key
and printed), COMPAT_REQUIRE_KEY (false: the old server's routes take calls without a key, as it did).
The entry points are those of the containers (Dockerfile.api, Dockerfile.worker, compose.yaml).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shared import catalog, families

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
DEFAULT_MODELS = "amazon/chronos-bolt-tiny,amazon/chronos-t5-tiny"

# The same entry points the containers run.
API_ENTRY = "python -m api"
WORKER_ENTRY = "python -m workers"
FLOWER_ENTRY = "celery -A cli.flower flower"


def models_from_env(variable: str = "CHRONOS_MODELS", default: str = DEFAULT_MODELS) -> list[catalog.ModelSpec]:
    wanted = os.environ.get(variable, default)
    if wanted.strip().lower() == "all":
        return list(catalog.CATALOG)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    specs = []
    for name in names:
        spec = catalog.find(name)
        if spec is None:
            known = ", ".join(m.id for m in catalog.CATALOG)
            sys.exit(f"{variable}: {name!r} is not a catalog model; choose from {known}")
        specs.append(spec)
    return specs


def trained_from_env() -> list[catalog.ModelSpec]:
    """The models CHRONOS_TRAIN_MODELS names: a training worker each (none by default)."""
    specs = models_from_env("CHRONOS_TRAIN_MODELS", "")
    for spec in specs:
        if not families.of(spec).fine_tunable:
            sys.exit(f"CHRONOS_TRAIN_MODELS: {spec.id} cannot be fine-tuned; amazon/chronos-2 can")
    return specs


def procfile(
    specs: list[catalog.ModelSpec],
    api_port: int,
    flower_port: int,
    redis_port: int | None,
    metrics_base: int,
    trained: Sequence[catalog.ModelSpec] = (),
) -> str:
    """One line per process: Redis (unless external), the API, a worker per model, a training worker
    per `trained` model, Flower, the announcer. Each runs under `cli.supervise`, which starts it
    again if it dies (honcho alone stops them all)."""
    commands = {}
    if redis_port is not None:
        data = RUN_DIR / "redis"
        commands["redis"] = (
            f"redis-server --port {redis_port} --bind 127.0.0.1 --dir {shlex.quote(str(data))}"
            " --appendonly yes --save ''"
        )
    commands["api"] = f"{API_ENTRY} --host 127.0.0.1 --port {api_port}"
    for i, spec in enumerate(specs):
        metrics = f" METRICS_PORT={metrics_base + i}" if metrics_base else ""
        commands[f"worker-{spec.slug}"] = f"env CHRONOS_MODEL={spec.id}{metrics} {WORKER_ENTRY}"
    for spec in trained:
        commands[f"trainer-{spec.slug}"] = f"env CHRONOS_MODEL={spec.id} {WORKER_ENTRY} --train"
    commands["flower"] = f"{FLOWER_ENTRY} --address=127.0.0.1 --port={flower_port}"
    lines = [f"{name}: python -m cli.supervise {name} -- {command}" for name, command in commands.items()]
    lines.append("ready: python -m cli.stack announce")
    return "\n".join(lines) + "\n"


def run() -> None:
    specs, trained = models_from_env(), trained_from_env()
    api_port = int(os.environ.get("API_PORT", 8000))
    flower_port = int(os.environ.get("FLOWER_PORT", 5555))
    metrics_base = int(os.environ.get("WORKER_METRICS_PORT", 9101))
    redis_port = None
    env = dict(os.environ)
    if not env.get("REDIS_URL"):
        redis_port = int(env.get("REDIS_PORT", 6379))
        _ensure_redis_server()
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    metrics_ports = [("WORKER_METRICS_PORT", metrics_base + i) for i in range(len(specs))] if metrics_base else []
    for name, port in (
        ("API_PORT", api_port),
        ("FLOWER_PORT", flower_port),
        ("REDIS_PORT", redis_port),
        *metrics_ports,
    ):
        if port is not None and _in_use(port):
            sys.exit(f"port {port} ({name}) is in use; pick another, e.g. {name}={port + 1} make run")
    (RUN_DIR / "redis").mkdir(parents=True, exist_ok=True)
    if not any(env.get(name) for name in ("API_KEYS", "API_KEYS_FILE", "AUTH_DISABLED")):
        env["API_KEYS"] = _dev_key()
    path = RUN_DIR / "Procfile"
    path.write_text(procfile(specs, api_port, flower_port, redis_port, metrics_base, trained))
    env.update(
        API_PORT=str(api_port),
        FLOWER_PORT=str(flower_port),
        WORKER_METRICS_PORT=str(metrics_base),
        CHRONOS_MODELS=",".join(s.id for s in specs),
        WEIGHTS=env.get("WEIGHTS", "any"),
        SYNTHETIC_DIR=env.get("SYNTHETIC_DIR", str(ROOT / ".cache" / "synthetic")),
        MODEL_STORE=env.get("MODEL_STORE", str(ROOT / ".cache" / "finetuned")),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # The venv's python, uvicorn and celery come first, as in the images.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    honcho = shutil.which("honcho", path=env["PATH"])
    if honcho is None:
        sys.exit("honcho is not installed (pip install -e '.[stack]', or just `make run`)")
    os.chdir(ROOT)
    os.execve(honcho, [honcho, "-f", str(path), "-d", str(ROOT), "start"], env)


def announce() -> None:
    """Wait until the API answers and every model has a worker online, then say where things are."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    api = f"http://127.0.0.1:{os.environ['API_PORT']}"
    key = (os.environ.get("API_KEYS") or "").split(",")[0].strip()
    auth = {"X-API-Key": key} if key else {}
    wanted = os.environ["CHRONOS_MODELS"].split(",")
    deadline = time.monotonic() + float(os.environ.get("READY_TIMEOUT_S", 600))
    models: dict = {}
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{api}/v1/models", headers=auth)
            listing = json.load(urllib.request.urlopen(request, timeout=2))
            models = {m["id"]: m for m in listing if m["id"] in wanted}
            if all(models[m]["workers_online"] > 0 for m in wanted):
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        print(f"not ready after {os.environ.get('READY_TIMEOUT_S', 600)}s; see the worker logs above", flush=True)
        signal.pause()
    first = models[wanted[0]]
    example = {
        "model": first["id"],
        "inputs": [{"target": [float(10 + (i % 7)) for i in range(24)]}],
        "parameters": {"prediction_length": 12},
    }
    lines = [
        "",
        "chronos-queue is ready",
        f"  API       {api}   (interactive docs: {api}/docs)",
        f"  Flower    http://127.0.0.1:{os.environ['FLOWER_PORT']}",
        f"  Redis     {os.environ['REDIS_URL']}",
        f"  API key   {key}" if key else "  API key   none (AUTH_DISABLED)",
    ]
    base = int(os.environ.get("WORKER_METRICS_PORT", 0))
    lines += [
        f"  worker    {m}: {models[m]['weights']} weights"
        + (f", metrics http://127.0.0.1:{base + i}/metrics" if base else "")
        for i, m in enumerate(wanted)
    ]
    lines.append(f"  metrics   {api}/metrics (API and queue depths)")
    if os.environ.get("COMPAT_REQUIRE_KEY", "true").strip().lower() in ("false", "0", "no", "off"):
        lines.append("  legacy    /v1/timeseries/forecast, /forecast/v1/chronos/*: no key (COMPAT_REQUIRE_KEY=false)")
    else:
        lines.append("  legacy    /v1/timeseries/forecast, /forecast/v1/chronos/*: key needed "
                     "(COMPAT_REQUIRE_KEY=false make run: none, as the old server)")  # fmt: skip
    synthetic = [m for m in wanted if models[m]["weights"] == "synthetic"]
    if synthetic:
        lines.append(f"  *** SYNTHETIC weights for {', '.join(synthetic)}: random weights, meaningless forecasts ***")
    lines += [
        "",
        "Forecast now:",
        f"  curl -s -X POST '{api}/v1/predict' -H 'content-type: application/json'"
        + (f" -H 'X-API-Key: {key}'" if key else "")
        + f" -d '{json.dumps(example)}'",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
    signal.pause()


def _dev_key() -> str:
    """The local stack's API key: made once, then reused, so scripts keep working across restarts."""
    path = RUN_DIR / "dev-api-key"
    if not path.exists():
        path.write_text(f"dev-{secrets.token_urlsafe(18)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _ensure_redis_server() -> None:
    """redis-server on the PATH, installed from the OS archive when missing and running as root
    (`make run` and `make test` both call this: the tests start their own redis-server)."""
    if shutil.which("redis-server"):
        return
    how = "install it (sudo apt-get install redis-server) or point REDIS_URL at a running Redis"
    if os.environ.get("INSTALL_REDIS", "1") != "1" or os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"redis-server is not installed: {how}")
    print("redis-server is missing: installing it from the OS archive (INSTALL_REDIS=0 to refuse)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        if subprocess.run(cmd, env=env).returncode != 0:
            sys.exit(f"installing redis-server failed: {how}")


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    commands = {"run": run, "announce": announce, "ensure-redis": _ensure_redis_server}
    commands[sys.argv[1] if len(sys.argv) > 1 else "run"]()
