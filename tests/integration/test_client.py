"""The Python client and ``diffuseexpand remote`` against the real service: uvicorn, Celery workers
on the tiny bundle, redis-server and SeaweedFS (tests/integration/conftest.py). Real jobs cost
seconds each, so there are four: a round trip, one waited by polling, one through the CLI, and one
canceled at once."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from diffuseexpand import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    Job,
    JobFailed,
    NotFound,
    RateLimited,
    Unauthorized,
)
from models.cli import app as cli_app
from tests.client.scripted import Scripted, json_reply
from tests.conftest import ADMIN_KEY
from tests.integration.conftest import Stack
from tests.integration.servers import ROOT, free_port, worker_env

pytestmark = pytest.mark.integration
ETA = 0.42
runner = CliRunner()


@pytest.fixture()
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.url, api_key=ADMIN_KEY) as c:
        yield c


def pair_files(folder: Path) -> tuple[list[dict[str, str]], list[str]]:
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    return rows, files


def remote(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(cli_app, ["remote", *args], env=env)


@pytest.fixture()
def receiver() -> Iterator[Scripted]:
    """A webhook receiver on loopback (the stack sets DIFFEXP_WEBHOOK_ALLOW_PRIVATE)."""
    server = Scripted()
    server.on("POST", "/hook", json_reply(200, {}))
    yield server
    server.close()


def test_submit_wait_download_unpack_round_trip(client: Client, receiver: Scripted, tmp_path: Path) -> None:
    hook = f"{receiver.url}/hook"

    def submit() -> Job:
        return client.submit(2, eta=ETA, steps=4, seed=7, callback_url=hook, idempotency_key="round-trip")

    job = submit()
    assert job.status in ("queued", "running") and job.progress.target == 2
    assert job.callback_secret and job.webhook is not None and job.webhook["url"] == hook
    assert submit().id == job.id  # a replay

    bar = io.StringIO()
    done = client.wait(job.id, progress=True, timeout=120, file=bar)
    assert (
        done.status == "succeeded"
        and done.progress.kept_capped == 2
        and done.params["sampling"]["steps"] == 4
    )
    assert "2/2" in bar.getvalue() and f"job {job.id[:8]}" in bar.getvalue()
    deadline = time.monotonic() + 30  # the webhook: the ended job, POSTed and signed
    while not receiver.seen("POST", "/hook") and time.monotonic() < deadline:
        time.sleep(0.1)
    delivered = receiver.seen("POST", "/hook")[0]
    assert json.loads(delivered.body)["id"] == job.id and delivered.headers["x-diffuseexpand-signature"]

    folder = client.download(job.id, tmp_path / "pairs", unpack=True)
    rows, files = pair_files(folder)
    assert len(rows) == 2 and all(float(r["dice_loss"]) <= ETA for r in rows)
    assert files == sorted(f"{d}/{r['name']}.png" for r in rows for d in ("images", "masks"))
    assert not list(folder.glob("*.part"))

    zip_path = client.download(job.id, tmp_path)  # a folder: ID.zip in it
    assert zip_path == tmp_path / f"{job.id}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(n for n in zf.namelist() if n.endswith(".png")) == files

    # the same job, but for its webhook: delivered after the terminal event the stream sent
    assert dataclasses.replace(client.get(job.id), webhook=None) == dataclasses.replace(done, webhook=None)
    assert job.id in {j.id for j in client.jobs()}
    with pytest.raises(Conflict, match="409 Conflict: job is succeeded"):
        client.cancel(job.id)

    async def async_calls() -> None:  # the async variant on the same job (no new job: cheap)
        async with AsyncClient(client.url, api_key=ADMIN_KEY) as ac:
            assert (await ac.wait(job.id, timeout=30)).status == "succeeded"
            out = await ac.download(job.id, tmp_path / "async", unpack=True)
            assert pair_files(out)[1] == files
            assert job.id in [j.id async for j in ac.jobs()]

    asyncio.run(async_calls())

    client.delete(job.id)
    with pytest.raises(NotFound, match=f"job {job.id} not found") as exc:
        client.get(job.id)
    assert exc.value.status == 404 and exc.value.problem["instance"] == f"/v1/jobs/{job.id}"


class Recording(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.method, request.url.path, response.status_code))
        return response


class NoEvents(Client):
    events_path = "/v1/jobs/{id}/no-such-events"  # a service without the stream answers 404


def test_wait_polls_when_the_events_route_is_missing(stack: Stack, tmp_path: Path) -> None:
    transport = Recording()
    with NoEvents(stack.url, api_key=ADMIN_KEY, transport=transport) as client:
        job = client.submit(2, eta=ETA, steps=4, seed=8)
        bar = io.StringIO()
        done = client.wait(job.id, progress=True, timeout=120, poll_interval=0.2, file=bar)
    assert done.status == "succeeded" and "2/2" in bar.getvalue()
    assert (f"/v1/jobs/{job.id}/no-such-events", 404) in [(p, s) for _, p, s in transport.seen]
    polls = [s for m, p, s in transport.seen if m == "GET" and p == f"/v1/jobs/{job.id}"]
    assert len(polls) >= 1 and set(polls) == {200}


def test_typed_errors_carry_the_problem(stack: Stack, client: Client) -> None:
    with Client(stack.url, api_key="not-a-key") as bad, pytest.raises(Unauthorized) as exc:
        bad.models()
    assert exc.value.status == 401 and exc.value.detail == "invalid or revoked key"

    with pytest.raises(NotFound, match="job 0{32} not found"):
        client.get("0" * 32)

    with pytest.raises(InvalidRequest) as invalid:
        client.submit(0, tau=30)
    assert sorted(invalid.value.fields) == ["count", "tau"]
    assert "count: Input should be greater than or equal to 1 (got 0)" in str(invalid.value)
    with pytest.raises(InvalidRequest) as hook:
        client.submit(1, callback_url="ftp://example.org/hook")
    assert hook.value.fields == ["callback_url"] and "http:// or https://" in str(hook.value)

    # a key allowed one request a second: the second within the second is a 429 with Retry-After
    name = f"slow-{os.getpid()}"
    key = stack.client.post("/v1/keys", json={"name": name, "requests_per_second": 1}).json()["key"]
    with Client(stack.url, api_key=key) as slow, pytest.raises(RateLimited) as limited:
        for _ in range(5):
            slow.models()
    assert limited.value.retry_after == 1 and "requests_per_second" in (limited.value.detail or "")


def test_remote_expand_then_status_jobs_download(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = remote(
        "expand", "--url", stack.url, "--api-key", ADMIN_KEY, "--count", "2", "--steps", "4",
        "--eta", str(ETA), "--seed", "9", "--out", str(out), "--format", "nnunet",
        "--solver", "unipc", "--no-early-reject",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows, files = pair_files(out)  # the nnU-Net v2 raw layout
    assert all(r["mask_source"] == "generated" and r["cleaned"] == "0" for r in rows)
    assert len(rows) == 2 and (out / "dataset.json").exists()
    assert files == sorted(
        [f"imagesTr/{r['name']}_0000.png" for r in rows] + [f"labelsTr/{r['name']}.png" for r in rows]
    )
    said = re.fullmatch(r"2 pairs of job ([0-9a-f]{32}) in (.+)", result.stdout.strip())
    assert said is not None and said[2] == str(out)
    job_id = said[1]
    assert f"job {job_id} queued" in result.stderr and "2/2" in result.stderr

    env = {"DIFFEXP_URL": stack.url, "DIFFEXP_API_KEY": ADMIN_KEY}  # the options' defaults
    status = remote("status", job_id, env=env)
    assert status.exit_code == 0 and '"status": "succeeded"' in status.stdout
    sampling = json.loads(status.stdout)["params"]["sampling"]
    assert (sampling["solver"], sampling["early_reject"]) == ("unipc", False)
    listed = remote("jobs", "--limit", "1", env=env)
    assert listed.exit_code == 0 and listed.stdout.startswith(f"{job_id}\tsucceeded\t2/2\t")
    dl = remote("download", job_id, "--out", str(tmp_path / "zips"), "--zip", "--format", "monai", env=env)
    assert dl.exit_code == 0 and Path(dl.stdout.strip()) == tmp_path / "zips" / f"{job_id}-monai.zip"
    with zipfile.ZipFile(tmp_path / "zips" / f"{job_id}-monai.zip") as zf:
        assert "datalist.json" in zf.namelist()
    assert remote("delete", job_id, env=env).stdout.strip() == f"job {job_id} deleted"

    # masks from the model's training masks: the manifest names each pair's source
    real = remote("expand", "--count", "2", "--steps", "2", "--eta", "1.0", "--seed", "9", "--out",
                  str(tmp_path / "real"), "--mask-source", "mixed", "--real-share", "1", "--clean-masks",
                  env=env)  # fmt: skip
    assert real.exit_code == 0, real.output
    rows, _ = pair_files(tmp_path / "real")
    assert len(rows) == 2 and all(r["mask_source"].startswith("real:") and r["cleaned"] == "0" for r in rows)


def test_cancel_then_wait_is_job_failed_in_client_and_cli(stack: Stack, client: Client) -> None:
    job = client.submit(50, steps=60, seed=10)
    env = {"DIFFEXP_URL": stack.url, "DIFFEXP_API_KEY": ADMIN_KEY}
    canceled = remote("cancel", job.id, env=env)
    assert canceled.exit_code == 0 and canceled.stdout.startswith(f"job {job.id} canceled")
    with pytest.raises(JobFailed, match="was canceled") as exc:
        client.wait(job.id, progress=False, timeout=30)
    assert exc.value.job.status == "canceled"

    waited = remote("wait", job.id, "--no-progress", env=env)
    assert waited.exit_code == 1 and waited.stderr.strip() == f"Error: job {job.id} was canceled"
    again = remote("cancel", job.id, env=env)
    assert again.exit_code == 1 and again.stderr.strip() == "Error: 409 Conflict: job is canceled"
    client.delete(job.id)


def test_remote_errors_are_one_line_and_a_nonzero_exit(stack: Stack, tmp_path: Path) -> None:
    base = ["--url", stack.url, "--api-key", ADMIN_KEY]
    cases = [
        (["models", "--url", stack.url, "--api-key", "wrong"], 1,
         "Error: 401 Unauthorized: invalid or revoked key (give the key with --api-key or DIFFEXP_API_KEY)"),
        (["status", "f" * 32, *base], 1, f"Error: 404 Not Found: job {'f' * 32} not found"),
        (["expand", *base, "--count", "2", "--tau", "30", "--out", str(tmp_path)], 2,
         "Error: invalid --tau 30.0: Input should be less than or equal to 20"),
        (["expand", *base, "--count", "2", "--w-cf", "-1", "--out", str(tmp_path)], 2,
         "Error: invalid --w-cf -1.0: Input should be greater than or equal to 0"),
        (["expand", *base, "--count", "2", "--solver", "euler", "--out", str(tmp_path)], 2,
         """Error: invalid --solver "euler": Input should be 'dpmpp' or 'unipc'"""),
        (["expand", *base, "--count", "2", "--mask-source", "mixed", "--real-share", "2", "--out", str(tmp_path)],
         2, "Error: invalid --real-share 2.0: Input should be less than or equal to 1"),
        (["expand", *base, "--count", "2", "--real-share", "0.5", "--out", str(tmp_path)],
         2, "Error: invalid --real-share 0.5: real_share applies to mask_source mixed only"),
        (["models", "--url", "localhost:8000"], 2,
         "Error: invalid service URL 'localhost:8000': expected http(s)://HOST[:PORT]"),
    ]  # fmt: skip
    for args, code, message in cases:
        result = remote(*args)
        assert (result.exit_code, result.stderr.strip()) == (code, message), args
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused jobs download nothing

    gone = f"http://127.0.0.1:{free_port()}"
    result = remote("models", "--url", gone)
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: cannot reach {gone}: ")
    assert len(result.stderr.strip().splitlines()) == 1

    key = stack.client.post("/v1/keys", json={"name": f"cli-{os.getpid()}", "requests_per_second": 1}).json()
    results = [remote("models", "--url", stack.url, "--api-key", key["key"]) for _ in range(4)]
    limited = [r for r in results if r.exit_code != 0]
    assert limited and limited[0].exit_code == 1
    assert limited[0].stderr.strip().startswith("Error: 429 Too Many Requests: rate limit")
    assert limited[0].stderr.strip().endswith("(retry after 1 s)")


def test_env_vars_are_the_defaults_and_the_cli_runs_without_torch(stack: Stack, tiny_bundle: Path) -> None:
    result = remote("models", env={"DIFFEXP_URL": stack.url, "DIFFEXP_API_KEY": ADMIN_KEY})
    assert result.exit_code == 0 and result.stdout == f"{tiny_bundle.name}\t16px\t(default)\n"
    no_key = remote("models", env={"DIFFEXP_URL": stack.url, "DIFFEXP_API_KEY": ""})
    assert no_key.exit_code == 1 and "401 Unauthorized: missing bearer key" in no_key.stderr

    # the remote commands alone, in a fresh interpreter: they work and never load torch
    code = (
        "import runpy, sys\n"
        "sys.argv = ['remote', 'models']\n"
        "try:\n"
        "    runpy.run_module('models.cli_remote', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**worker_env({}), "DIFFEXP_URL": stack.url, "DIFFEXP_API_KEY": ADMIN_KEY}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tiny_bundle.name}\t16px\t(default)\n"
