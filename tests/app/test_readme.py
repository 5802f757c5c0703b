"""The README's curl journeys, replayed against the app with its default settings (real Redis and
storage; the shards and trainings are only enqueued): what a new user types gets what it says."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TRAINING = (ROOT / "docs" / "training.md").read_text()  # the README's "your own data" journey lives here


def sh_block(heading: str, text: str = README) -> str:
    """The first ```sh block after ``heading``."""
    after = text[text.index(heading) :]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def curls(block: str) -> list[dict[str, Any]]:
    """Each ``curl`` of a shell block (also inside ``$(...)``): method, path, headers, data, form."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for segment in re.findall(r"curl\s[^|)]*", line):
            args = shlex.split(segment, comments=True)[1:]
            call: dict[str, Any] = {"method": "GET", "headers": {}, "data": None, "form": {}}
            i = 0
            while i < len(args):
                arg = args[i]
                if arg in ("-X", "-H", "-d", "-F", "-o"):
                    value = args[i + 1]
                    i += 2
                    if arg == "-X":
                        call["method"] = value
                    elif arg == "-H":
                        name, _, v = value.partition(":")
                        call["headers"][name.strip()] = v.strip()
                    elif arg == "-d":
                        call["data"], call["method"] = (
                            value,
                            "POST" if call["method"] == "GET" else call["method"],
                        )
                    elif arg == "-F":
                        name, _, v = value.partition("=")
                        call["form"][name] = v
                    continue
                if not arg.startswith("-"):
                    call["path"] = "/" + arg.split("/", 1)[1]
                i += 1
            out.append(call)
    return out


def replay(client: TestClient, call: dict[str, Any], **subst: str) -> Any:
    headers = {k: v for k, v in call["headers"].items() if k.lower() != "authorization"}  # $KEY: the admin's
    data = call["data"]
    for name, value in subst.items():
        data = data.replace(f"${name}", value) if data else data
    return client.request(call["method"], call["path"], content=data, headers=headers)


@pytest.fixture()
def client(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    """The service as ``make serve`` configures it: no setting changed from its default."""
    settings = settings_factory()
    assert settings.min_dataset_pairs == Settings.model_fields["min_dataset_pairs"].default
    with TestClient(
        create_app(settings, enqueue=Enqueued(), train_enqueue=lambda *a: None), headers=ADMIN_HEADERS
    ) as c:
        yield c


def test_the_curl_session_creates_one_job(client: TestClient) -> None:
    """Step 1 shows the 202, the ``ID=`` line keeps the id: the same request, so the same job; the
    user waits for one job, not two."""
    posts = [c for c in curls(sh_block("## Try it: a curl session")) if c["method"] == "POST"]
    assert len(posts) >= 1 and all(c["path"] == "/v1/jobs" for c in posts)
    ids = set()
    for call in posts:
        resp = replay(client, call)
        assert resp.status_code in (200, 202), resp.text
        ids.add(resp.json()["id"])
    assert len(ids) == 1
    assert client.get("/v1/jobs").json()["count"] == 1


def test_your_own_data_uploads_the_shipped_example_and_trains_on_it(
    client: TestClient, tmp_path: Path
) -> None:
    """examples/cxr-mini (6 pairs) is accepted by a default service, as the README's journey says."""
    block = sh_block("## From a folder to a model: the cxr-mini example", TRAINING)
    (zip_line,) = [line for line in block.splitlines() if line.startswith("(cd examples/cxr-mini && zip")]
    archive = tmp_path / "cxr-mini.zip"
    subprocess.run(["sh", "-c", zip_line.replace("/tmp/cxr-mini.zip", str(archive))], cwd=ROOT, check=True)
    upload, train = [c for c in curls(block) if c["method"] == "POST"][:2]
    assert upload["path"] == "/v1/datasets" and upload["form"] == {"file": "@/tmp/cxr-mini.zip"}
    resp = client.post(
        "/v1/datasets", files={"file": ("cxr-mini.zip", archive.read_bytes(), "application/zip")}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["pairs"] == 6
    assert train["path"] == "/v1/models"
    resp = replay(client, train, DS=resp.json()["id"])
    assert resp.status_code in (201, 202), resp.text


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md", "docs/training.md"])
def test_the_docs_say_where_the_command_line_is_before_calling_it_bare(doc: str) -> None:
    """``make serve`` installs ``diffuseexpand`` into .venv/bin, which is not on PATH."""
    text = (ROOT / doc).read_text()
    first_bare = re.search(r"^diffuseexpand ", text, flags=re.M)
    if first_bare is not None:
        assert ". .venv/bin/activate" in text[: first_bare.start()]
