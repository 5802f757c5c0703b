"""app.params: the one torch-free home of job and sampling parameters, their ranges and the merge."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.bundles import list_bundles
from app.core.config import Settings
from app.params import (
    DEFAULT_ETA,
    SEED_BITS,
    GuidanceMode,
    JobParams,
    SamplingSettings,
    merge_job_params,
    merge_sampling,
)

BUNDLE_DEFAULTS = {
    "steps": 4,
    "order": 2,
    "w_cf": 3.0,
    "w_cg": 1.0,
    "guidance": "tau",
    "tau": 1.0,
    "scale": 2.0,
}


def test_params_module_imports_neither_torch_nor_fastapi_nor_models() -> None:
    code = (
        "import sys, app.params\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'starlette', 'models')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tau", 0.049),
        ("tau", 5e-324),
        ("tau", 20.01),
        ("scale", 0.0),
        ("scale", 21.0),
        ("w_cf", -0.1),
        ("w_cf", 20.5),
        ("w_cg", -1.0),
        ("w_cg", 1e308),
        ("steps", 0),
        ("steps", 1001),
        ("order", 4),
        ("tau", math.nan),
        ("tau", math.inf),
        ("w_cg", -math.inf),
    ],
)
def test_sampling_settings_refuse_values_outside_their_range(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingSettings.model_validate({field: value})
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_sampling_settings_bounds_are_inclusive_and_defaults_are_the_papers() -> None:
    SamplingSettings(tau=0.05, scale=20.0, w_cf=20.0, w_cg=50.0, steps=1000, order=3)
    SamplingSettings(tau=20.0, scale=0.05, w_cf=0.0, w_cg=0.0, steps=1, order=1)
    d = SamplingSettings()
    assert (d.steps, d.order, d.w_cf, d.w_cg, d.guidance, d.tau, d.scale, d.clip_x0) == (
        20,
        2,
        3.0,
        1.0,
        GuidanceMode.TAU,
        1.0,
        None,
        True,
    )
    assert DEFAULT_ETA == 0.065


def test_merge_takes_the_request_over_the_bundle_defaults() -> None:
    merged = merge_sampling(BUNDLE_DEFAULTS, steps=7, w_cg=None, guidance=GuidanceMode.SCALE)
    assert merged.steps == 7 and merged.w_cg == 1.0 and merged.guidance == "scale" and merged.scale == 2.0
    # a new τ without a new scale drops the saved scale, so s = 1/τ follows it
    assert merge_sampling(BUNDLE_DEFAULTS, tau=0.5).scale is None
    assert merge_sampling(BUNDLE_DEFAULTS, tau=0.5, scale=3.0).scale == 3.0
    with pytest.raises(ValidationError):
        merge_sampling(BUNDLE_DEFAULTS, tau=0.01)


def test_merge_job_params_fills_eta_seed_and_max_attempts() -> None:
    common: dict[str, Any] = {
        "model": "m",
        "sampling_defaults": BUNDLE_DEFAULTS,
        "batch_size": 2,
        "shard_size": 4,
    }
    p = merge_job_params(count=3, eta_default=None, **common)
    assert p.eta == DEFAULT_ETA and p.max_attempts == 20 * 3 and 0 <= p.seed < 2**SEED_BITS
    p = merge_job_params(count=3, eta_default=0.2, max_attempts_factor=5, **common)
    assert p.eta == 0.2 and p.max_attempts == 15
    p = merge_job_params(count=3, eta_default=0.2, eta=0.5, seed=9, max_attempts=4, tau=2.0, **common)
    assert (p.eta, p.seed, p.max_attempts, p.sampling.tau) == (0.5, 9, 4, 2.0)
    # the record round-trips through JSON into the same typed parameters (what a worker parses)
    assert JobParams.model_validate(json.loads(json.dumps(p.model_dump()))) == p


def test_numbers_must_be_json_numbers_and_request_seeds_exact_in_any_client() -> None:
    settings = SamplingSettings.model_validate({"steps": 4.0, "tau": 1})  # 4.0 is an integer in JSON Schema
    assert settings.steps == 4 and isinstance(settings.steps, int) and settings.tau == 1.0
    assert SamplingSettings.model_validate({"steps": numpy.int64(5), "tau": numpy.float32(2.0)}).steps == 5
    for wrong in ({"steps": True}, {"steps": "4"}, {"steps": 4.5}, {"tau": "0.5"}, {"w_cg": False}):
        with pytest.raises(ValidationError):
            SamplingSettings.model_validate(wrong)
    # a job record may hold any 63-bit seed (older requests); a request at most 2^53 - 1
    record = merge_job_params(
        model="m", count=1, sampling_defaults={}, eta_default=None, batch_size=1, shard_size=1, seed=2**63 - 1
    )
    assert JobParams.model_validate(record.model_dump()).seed == 2**63 - 1


def test_a_job_records_typed_sampling_settings(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"count": 1, "tau": 0.5}).json()
    assert set(job["params"]["sampling"]) == set(SamplingSettings.model_fields)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["JobParams"]["properties"]["sampling"] == {"$ref": "#/components/schemas/SamplingSettings"}
    tau = schemas["SamplingSettings"]["properties"]["tau"]
    assert (tau["minimum"], tau["maximum"]) == (0.05, 20.0) and "0.05 to 20" in tau["description"]
    count = schemas["JobCreate"]["properties"]["count"]
    assert "DIFFEXP_MAX_COUNT" in count["description"]


def test_bundles_with_defaults_out_of_range_are_not_served(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    good = Path(settings.bundles_dir) / settings.default_model
    for name, change in (("ok", {}), ("hot", {"tau": 1e-6}), ("wild", {"w_cg": 1e308})):
        shutil.copytree(good, root / name, ignore=shutil.ignore_patterns("*.safetensors"))
        meta = json.loads((root / name / "bundle.json").read_text())
        meta["sampling_defaults"].update(change)
        (root / name / "bundle.json").write_text(json.dumps(meta))
    (root / "eta").mkdir()
    (root / "eta" / "bundle.json").write_text(json.dumps({"resolution": 16, "eta_default": 0}))
    assert list(list_bundles(settings.model_copy(update={"bundles_dir": root}))) == ["ok"]
