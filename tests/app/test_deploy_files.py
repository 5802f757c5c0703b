"""Docker cannot run here: check that the compose file, the Dockerfiles and .env.example match the settings."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.config import Settings
from app.metrics import METRICS_PATH

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f"DIFFEXP_{name.upper()}" for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_has_the_services_with_healthchecks_and_volumes() -> None:
    services = compose()["services"]
    assert {"api", "worker", "redis", "seaweedfs", "bucket"} <= set(services)
    for name in ("api", "worker", "redis", "seaweedfs"):
        assert "test" in services[name]["healthcheck"], name
    assert set(compose()["volumes"]) == {"redis-data", "seaweed-data", "prometheus-data"}
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert (
        worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
        and "BASE_IMAGE" in worker["build"]["args"]
    )
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert services["bucket"]["command"] == ["python", "-m", "app.bootstrap"]
    assert services["api"]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    # bundles travel through the registry: only the one-shot publisher mounts the demo's folder
    assert "volumes" not in worker and "volumes" not in services["api"]
    assert services["bucket"]["volumes"] == ["./models/bundles:/srv/models/bundles:ro"]
    assert services["bucket"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_environment_names_are_settings_fields() -> None:
    services = compose()["services"]
    for name in ("api", "worker", "bucket"):
        env = set(services[name]["environment"])
        assert env <= FIELDS, (name, env - FIELDS)
        assert {"DIFFEXP_REDIS_URL", "DIFFEXP_STORAGE_BACKEND", "DIFFEXP_S3_ENDPOINT_URL"} <= env
    assert services["api"]["environment"]["DIFFEXP_STORAGE_BACKEND"] == "s3"
    assert services["api"]["environment"]["DIFFEXP_REDIS_URL"].startswith("redis://redis:")
    # the values must also validate as Settings (defaults of ${VAR:-default} substituted)
    values = {
        k.removeprefix("DIFFEXP_").lower(): re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
        for k, v in services["worker"]["environment"].items()
    }
    Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_env_example_documents_every_setting_with_its_default() -> None:
    lines = [ln for ln in (ROOT / ".env.example").read_text().splitlines() if ln and not ln.startswith("#")]
    documented = dict(ln.split("=", 1) for ln in lines)
    assert set(documented) == FIELDS
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    given = {k.removeprefix("DIFFEXP_").lower(): v for k, v in documented.items() if v}
    assert Settings(_env_file=None, **given).model_dump() == defaults.model_dump()  # type: ignore[call-arg]
    for key, value in documented.items():
        if value == "":
            assert getattr(defaults, key.removeprefix("DIFFEXP_").lower()) is None, key


def test_dockerfiles_keep_torch_out_of_the_api_image() -> None:
    api = (ROOT / "docker" / "Dockerfile.api").read_text() + (
        ROOT / "docker" / "requirements-api.txt"
    ).read_text()
    assert "torch" not in api.replace("no torch", "").replace("No torch", "")
    assert "COPY models" not in api and "COPY worker" not in api
    worker = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda", worker, re.M)
    assert "--pool solo" in worker


def test_the_api_container_listens_on_all_addresses_only_with_keys() -> None:
    services = compose()["services"]
    api = services["api"]["environment"]
    assert api["DIFFEXP_HOST"] == "0.0.0.0" and api["DIFFEXP_AUTH"] == "required"
    # `${VAR:?message}`: compose refuses to start without an admin key
    assert re.fullmatch(r"\$\{DIFFEXP_ADMIN_KEY:\?[^}]+\}", api["DIFFEXP_ADMIN_KEY"])
    for name in ("worker", "bucket"):  # only the API holds the admin key
        assert not {"DIFFEXP_ADMIN_KEY", "DIFFEXP_ADMIN_KEY_FILE"} & set(services[name]["environment"]), name
    dockerfile = (ROOT / "docker" / "Dockerfile.api").read_text()
    assert re.search(r"^ENV DIFFEXP_HOST=0\.0\.0\.0$", dockerfile, re.M)
    (cmd,) = [ln for ln in dockerfile.splitlines() if ln.startswith("CMD ")]
    assert '--host \\"$DIFFEXP_HOST\\"' in cmd  # binds where the start-up check looks
    assert not re.search(r"^(ENV|ARG) .*DIFFEXP_AUTH", dockerfile, re.M)  # the default stays: required


def test_the_monitoring_profile_scrapes_the_api_every_worker_and_flower() -> None:
    services = compose()["services"]
    for name in ("prometheus", "flower"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name  # no login
    for name in ("api", "worker", "redis", "seaweedfs", "bucket"):
        assert "profiles" not in services[name], name  # `docker compose up` still starts the service
    prom = services["prometheus"]
    (mount,) = [v for v in prom["volumes"] if v.startswith("./docker/prometheus.yml:")]
    start = " ".join(prom["command"])
    assert f"--config.file={mount.split(':')[1]}" in start
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"diffexp-api", "diffexp-worker", "flower"}

    # the API: the port it listens on in its container, the app's path, the key the entrypoint writes
    api = jobs["diffexp-api"]
    ((host, port),) = [t.split(":") for t in api["static_configs"][0]["targets"]]
    assert host == "api" and services["api"]["ports"][0].endswith(f":{port}")
    assert f"--port {port}" in (ROOT / "docker" / "Dockerfile.api").read_text()
    assert api["metrics_path"] == METRICS_PATH
    key_file = api["authorization"]["credentials_file"]
    assert f"printf '%s' \"$$DIFFEXP_METRICS_KEY\" > {key_file}" in start  # $$: the container's env
    assert prom["environment"]["DIFFEXP_METRICS_KEY"] == services["api"]["environment"]["DIFFEXP_METRICS_KEY"]

    # every worker replica (compose DNS: one A record each), where the workers listen
    (sd,) = jobs["diffexp-worker"]["dns_sd_configs"]
    worker = services["worker"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"
    assert str(sd["port"]) == worker["environment"]["DIFFEXP_WORKER_METRICS_PORT"]
    assert worker["environment"]["DIFFEXP_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert worker["expose"] == [str(sd["port"])]
    assert f"EXPOSE {sd['port']}" in (ROOT / "docker" / "Dockerfile.worker").read_text()

    # Flower reads the service's Redis broker, on the port Prometheus scrapes
    flower = services["flower"]
    assert f"--broker={compose()['x-settings']['DIFFEXP_REDIS_URL']}" in flower["command"]
    (target,) = jobs["flower"]["static_configs"][0]["targets"]
    assert target == "flower:5555" and "--port=5555" in flower["command"]


def _make_dry_run(target: str, tmp: Path) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(
        ["make", "-n", target, f"VENV={tmp / 'venv'}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if "pip install" in line]


def test_make_serve_installs_only_what_serving_needs(tmp_path: Path) -> None:
    """A fresh clone's `make serve` installs the package, not the test and dev extras (schemathesis,
    selenium, SeaweedFS, mypy...); `make test` adds them."""
    serve = _make_dry_run("serve", tmp_path)
    assert serve and not [line for line in serve if "[" in line], serve
    assert any("'.[test,dev]'" in line for line in _make_dry_run("test", tmp_path))
