"""What ``remote wait`` prints for a job that already finished, and the name ``remote download --zip``
gives the zip (as documented)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from diffuseexpand.client import Client, _Bar
from diffuseexpand.types import Job

ROOT = Path(__file__).resolve().parents[2]
JOB = "c" * 32


def job(status: str, kept: int, pps: float | None, eta: float | None = None) -> Job:
    progress = {"target": 16, "generated": 30, "kept": kept, "discarded": 30 - kept}
    return Job.from_json(
        {"id": JOB, "status": status, "progress": {**progress, "pairs_per_second": pps, "eta_seconds": eta}}
    )


def rates(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"([\d.]+) ?pair/s", text)]


def test_waiting_on_a_finished_job_shows_the_jobs_rate_not_a_millisecond_rate() -> None:
    out = io.StringIO()
    bar = _Bar(JOB, True, out)
    bar.update(job("succeeded", 16, 0.968))  # the job ran 31 s; wait read it in one answer
    bar.close()
    text = out.getvalue()
    assert "16/16" in text and set(rates(text)) == {0.97}, text  # was "17272.36 pair/s"


def test_a_running_jobs_bar_shows_its_rate_and_eta() -> None:
    out = io.StringIO()
    bar = _Bar(JOB, True, out)
    bar.update(job("running", 0, None))
    bar.update(job("running", 8, 1.25, eta=14.0))
    bar.close()
    text = out.getvalue()
    assert "8/16" in text and set(rates(text)) == {1.25} and "eta=14 s" in text, text


def test_the_zip_of_remote_download_has_the_documented_name(tmp_path: Path) -> None:
    from models import cli_remote

    assert Client._zip_target(JOB, tmp_path, "plain") == tmp_path / f"{JOB}.zip"
    assert Client._zip_target(JOB, tmp_path, "nnunet") == tmp_path / f"{JOB}-nnunet.zip"
    documented = (ROOT / "docs" / "client.md").read_text()
    (row,) = [line for line in documented.splitlines() if line.startswith("| `remote download")]
    assert "`ID.zip`" in row and "`ID-F.zip` for `--format F` other than plain" in row
    assert "ID-FORMAT.zip for\n    another --format than plain" in (cli_remote.download.__doc__ or "")
