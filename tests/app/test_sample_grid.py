"""``GET /v1/models/{name}/{version}/sample-grid.png``: the grid a training draws when it publishes
(worker/training.py ``publish``), named by the model's ``links.sample_grid``."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from app.registry import GRID_FILE, Registry


def test_a_trained_models_sample_grid_is_served(
    client: TestClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    registry: Registry = client.app.state.registry  # type: ignore[attr-defined]
    out = tmp_path / "trained"
    shutil.copytree(tiny_bundle, out, ignore=shutil.ignore_patterns(".checkpoints"))
    buf = io.BytesIO()
    Image.new("L", (32, 16), 128).save(buf, format="PNG")
    (out / GRID_FILE).write_bytes(buf.getvalue())  # what publish() writes before publishing
    registry.publish(out, "trained", owner="admin", extra={"training": "t1", "sample_grid": GRID_FILE})

    model = client.get("/v1/models/trained").json()
    assert model["extra"]["sample_grid"] == GRID_FILE
    assert model["links"] == {"sample_grid": "/v1/models/trained/1/sample-grid.png"}
    resp = client.get(model["links"]["sample_grid"])
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.content == buf.getvalue()

    # a version without a grid (pushed from a local training) and a model that does not exist: 404
    registry.publish(tiny_bundle, "pushed", owner="admin")
    assert client.get("/v1/models/pushed/1").json()["links"] == {}
    for url in ("/v1/models/pushed/1/sample-grid.png", "/v1/models/nope/1/sample-grid.png"):
        resp = client.get(url)
        assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
    assert "has no sample grid" in client.get("/v1/models/pushed/1/sample-grid.png").json()["detail"]
