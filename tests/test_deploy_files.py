"""compose.yaml and the Dockerfiles, checked against the catalog (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from cli import stack
from shared import catalog, families

from conftest import ROOT

SERVED = list(catalog.CATALOG)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def dockerfile(name: str) -> str:
    return (ROOT / name).read_text()


def instructions(text: str, keyword: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")]


def env_of(service: dict) -> dict:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def workers_of(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if name.startswith("worker-")}


def test_every_served_model_has_a_worker_service_pinned_to_it(compose):
    workers = workers_of(compose)
    for spec in SERVED:
        service = workers[f"worker-{spec.slug}"]
        assert env_of(service)["CHRONOS_MODEL"] == spec.id
    pinned = {env_of(s)["CHRONOS_MODEL"] for s in workers.values()}
    assert pinned <= {m.id for m in SERVED}


def test_workers_scale_freely_publish_no_ports_and_mount_the_cache_read_only(compose):
    for name, service in workers_of(compose).items():
        assert "ports" not in service and "container_name" not in service, name
        assert service["command"] == ["python", "-m", "workers"]
        assert any(v.endswith(":/hf:ro") for v in service["volumes"]), name
        assert env_of(service)["HF_HUB_OFFLINE"] == "1"
        assert env_of(service)["REDIS_URL"] == "redis://redis:6379/0"


def test_plain_up_starts_the_default_set_and_profiles_start_the_rest(compose):
    default = {name for name, s in compose["services"].items() if not s.get("profiles")}
    default_workers = {f"worker-{catalog.get(m).slug}" for m in stack.DEFAULT_MODELS.split(",")}
    assert default == {"redis", "api", "flower"} | default_workers
    all_profile = {name for name, s in workers_of(compose).items() if "all" in s.get("profiles", [])}
    assert all_profile | default_workers == {f"worker-{m.slug}" for m in SERVED}


def test_training_workers_run_the_tunable_models_and_share_the_model_store(compose):
    trainers = {name: s for name, s in compose["services"].items() if name.startswith("trainer-")}
    assert trainers, "no training worker service"
    for name, service in trainers.items():
        spec = catalog.get(env_of(service)["CHRONOS_MODEL"])
        assert name == f"trainer-{spec.slug}" and families.of(spec).fine_tunable
        assert service["command"] == ["python", "-m", "workers", "--train"] and service["profiles"] == ["train"]
        assert " ".join(service["command"]) in stack.procfile([], 8000, 5555, None, 0, [spec])
        serving = compose["services"][f"worker-{spec.slug}"]
        # The trainer writes, the base model's workers load, the API deletes: one volume, one path.
        for other in (serving, compose["services"]["api"]):
            assert "model-store:/models" in other["volumes"] and env_of(other)["MODEL_STORE"] == "/models"
        assert "model-store:/models" in service["volumes"] and env_of(service)["MODEL_STORE"] == "/models"
    assert "model-store" in compose["volumes"]


def test_gpu_worker_reserves_a_gpu_and_runs_on_cuda(compose):
    gpu = [s for s in workers_of(compose).values() if "gpu" in s.get("profiles", [])]
    assert gpu
    for service in gpu:
        assert env_of(service)["DEVICE"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        assert "cu" in service["build"]["args"]["TORCH_INDEX"]


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    volume = redis["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_flower_requires_basic_auth_from_the_environment(compose):
    flower = compose["services"]["flower"]
    auth = env_of(flower)["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:?")  # compose refuses to start without it
    assert flower["command"][:4] == stack.FLOWER_ENTRY.split()


def test_published_ports_bind_to_loopback_by_default(compose):
    for name in ("api", "flower"):
        (port,) = compose["services"][name]["ports"]
        assert port.startswith("${" + name.upper() + "_BIND:-127.0.0.1}:")


def test_api_image_installs_no_torch_and_runs_as_non_root_with_a_healthcheck():
    text = dockerfile("Dockerfile.api")
    installs = " ".join(instructions(text, "RUN")).lower()
    assert "torch" not in installs and "[worker" not in installs and "pip install" in installs
    assert instructions(text, "USER") == ["app"]
    assert "/healthz" in instructions(text, "HEALTHCHECK")[0]
    assert " ".join(yaml.safe_load(instructions(text, "CMD")[0])).startswith(stack.API_ENTRY)


def test_worker_image_is_cpu_by_default_offline_non_root_with_a_celery_ping_healthcheck():
    text = dockerfile("Dockerfile.worker")
    assert any("TORCH_INDEX=https://download.pytorch.org/whl/cpu" in a for a in instructions(text, "ARG"))
    assert "HF_HUB_OFFLINE=1" in " ".join(instructions(text, "ENV"))
    assert instructions(text, "USER") == ["app"]
    assert "workers.health" in instructions(text, "HEALTHCHECK")[0]
    assert " ".join(yaml.safe_load(instructions(text, "CMD")[0])) == stack.WORKER_ENTRY


def test_compose_api_requires_api_keys_and_workers_expose_metrics(compose):
    assert env_of(compose["services"]["api"])["API_KEYS"].startswith("${API_KEYS:?")
    for name, service in workers_of(compose).items():
        assert env_of(service)["METRICS_PORT"] == "9101", name


def test_compose_commands_are_the_local_stacks_entry_points(compose):
    assert " ".join(compose["services"]["api"]["command"]).startswith(stack.API_ENTRY)
    procfile = stack.procfile(list(SERVED), 8000, 5555, 6379, 9101)
    for entry in (stack.API_ENTRY, stack.WORKER_ENTRY, stack.FLOWER_ENTRY):
        assert entry in procfile


def test_the_api_side_imports_no_torch():
    code = "import sys, api.main, cli.flower, client; sys.exit('torch' in sys.modules or 'chronos' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_api_install_needs_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"] + project["optional-dependencies"]["flower"]).lower()
    assert "torch" not in base and "chronos-forecasting" not in base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["worker"])


def test_api_and_workers_never_import_each_other():
    pairs = [("api", "workers"), ("workers", "api"), ("shared", "api"), ("shared", "workers")]
    for side, other in [*pairs, ("client", "api"), ("client", "workers")]:
        for path in (ROOT / side).rglob("*.py"):
            text = path.read_text()
            assert not re.search(rf"^\s*(from|import) {other}\b", text, re.M), f"{path} imports {other}"


def test_the_installed_package_carries_the_job_store_scripts(tmp_path):
    """The images `pip install .` (not editable): the Lua scripts must travel as package data."""
    import shutil
    import zipfile

    from shared.store import scripts

    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("api", "workers", "shared", "cli", "client"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert {f"shared/store/lua/{name}.lua" for name in (*scripts.NAMES, "ended")} <= packed
