"""The pure parts of the client: problem details to typed errors, the event-stream decoder, the
lenient reading of job JSON."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from diffuseexpand import (
    Conflict,
    DiffuseExpandError,
    InvalidRequest,
    Job,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
)
from diffuseexpand.client import pack_folder
from diffuseexpand.errors import error_from_response, retry_after_s
from diffuseexpand.sse import Decoder
from diffuseexpand.types import Model, Pair
from tests.client.scripted import job_json

VALIDATION = {
    "type": "about:blank",
    "title": "Unprocessable Entity",
    "status": 422,
    "detail": "2 invalid parameters; see errors",
    "instance": "/v1/jobs",
    "errors": [
        {"detail": "Input should be greater than or equal to 1", "type": "greater_than_equal",
         "loc": ["body", "count"], "pointer": "#/count", "input": 0},
        {"detail": "Input should be less than or equal to 100", "type": "less_than_equal",
         "loc": ["query", "limit"], "parameter": "limit", "input": 500},
    ],
}  # fmt: skip


def test_validation_problem_names_each_field_and_value() -> None:
    err = error_from_response(422, json.dumps(VALIDATION).encode(), {})
    assert isinstance(err, InvalidRequest)
    assert err.fields == ["count", "limit"]
    assert err.status == 422 and err.title == "Unprocessable Entity" and err.problem == VALIDATION
    assert str(err) == (
        "422 Unprocessable Entity: count: Input should be greater than or equal to 1 (got 0); "
        "limit: Input should be less than or equal to 100 (got 500)"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, Unauthorized), (404, NotFound), (409, Conflict), (415, InvalidRequest), (500, ServerError)],
)
def test_status_picks_the_class(status: int, kind: type[DiffuseExpandError]) -> None:
    body = json.dumps({"title": "T", "status": status, "detail": "what happened"}).encode()
    err = error_from_response(status, body, {})
    assert type(err) is kind and err.detail == "what happened" and str(err) == f"{status} T: what happened"


def test_rate_limit_and_unavailable_carry_retry_after() -> None:
    err = error_from_response(
        429, b'{"title": "Too Many Requests", "detail": "slow down"}', {"retry-after": "7"}
    )
    assert isinstance(err, RateLimited) and err.retry_after == 7.0 and "(retry after 7 s)" in str(err)
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 55 < (retry_after_s(when) or 0) <= 60
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_a_proxy_page_is_not_a_problem_but_still_typed() -> None:
    err = error_from_response(502, b"<html>Bad Gateway</html>", {})
    assert isinstance(err, ServiceUnavailable) and err.detail == "<html>Bad Gateway</html>"
    err = error_from_response(418, b"", {})
    assert type(err) is DiffuseExpandError and str(err) == "418 I'm a Teapot"


def test_sse_decoder_follows_the_format() -> None:
    d = Decoder()
    lines = [": ping", "", "retry: 1500", "id: 7", "event: progress", "data: {\"a\":", "data:1}", "",
             "id: 8", "", "data: plain\r", ""]  # fmt: skip
    events = list(d.events(lines))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("progress", '{"a":\n1}', "7"),
        ("message", "plain", "8"),
    ]
    assert d.last_id == "8" and events[0].retry_ms == 1500


def test_job_json_parses_and_ignores_unknown_fields() -> None:
    data = job_json("a" * 32, "running", 2, pairs_per_second=1.5, eta_seconds=None, phase="mask")
    data["something_new"] = {"x": 1}
    job = Job.from_json(data)
    assert job.status == "running" and not job.done and job.progress.kept == 2
    assert job.progress.pairs_per_second == 1.5 and job.progress.phase == "mask"
    assert job.created_at == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert job.raw["something_new"] == {"x": 1}


def test_pairs_and_models_carry_the_number_of_classes() -> None:
    binary = {"name": "s1-000001", "index": 1, "seed": 1, "dice_loss": 0.2, "class_dice_losses": None}
    assert Pair.from_json(binary).class_dice_losses is None
    assert Pair.from_json({**binary, "class_dice_losses": [0.1, 0.3]}).class_dice_losses == [0.1, 0.3]
    assert Model.from_json({"name": "m", "resolution": 16}).num_classes == 2  # an older service says none
    assert Model.from_json({"name": "m", "resolution": 16, "num_classes": 3}).num_classes == 3


def test_kept_beyond_the_target_is_capped_for_display() -> None:
    # shards running alongside may keep more pairs than the result takes
    job = Job.from_json(job_json("a" * 32, "succeeded", 5, target=4))
    assert job.progress.kept == 5 and job.progress.kept_capped == 4


def test_pack_folder_zips_the_pairs_and_notes_only(tmp_path: Path) -> None:
    for rel in ("images/a.png", "masks/a.png", "unlabelled/u.dcm", "pairs.csv", "SOURCE.md", ".DS_Store",
                "images/.hidden", "other/x.png"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    with zipfile.ZipFile(io.BytesIO(pack_folder(tmp_path))) as zf:
        assert sorted(zf.namelist()) == [
            "SOURCE.md",
            "images/a.png",
            "masks/a.png",
            "pairs.csv",
            "unlabelled/u.dcm",
        ]
        assert zf.read("masks/a.png") == b"masks/a.png"
