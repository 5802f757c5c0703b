"""Docker cannot run here: check that the compose file, the Dockerfiles and .env.example match the settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from app.core.config import Settings

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
    assert set(compose()["volumes"]) == {"redis-data", "seaweed-data"}
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
