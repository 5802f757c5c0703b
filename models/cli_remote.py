"""``diffuseexpand remote ...``: drive a DiffuseExpand service over HTTP with the Python client
(``diffuseexpand.Client``). Nothing here samples, so nothing here imports torch; the client itself
is imported when a command runs. ``python -m models.cli_remote`` runs these commands alone.

Errors end the command with one line on stderr, never a traceback: exit code 2 for a value the
service refused (naming the option), 1 for everything else (unreachable, bad key, unknown job,
rate limit, a job that failed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from diffuseexpand import Client

app = typer.Typer(
    name="remote",
    help="Use a DiffuseExpand service: submit jobs, follow them, download their pairs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class ExportFormat(StrEnum):
    plain = "plain"
    nnunet = "nnunet"
    monai = "monai"


class MaskSourceOpt(StrEnum):  # app.params.MaskSource, spelt out: this module imports nothing of app/
    generated = "generated"
    real = "real"
    mixed = "mixed"


Url = Annotated[
    str,
    typer.Option(
        "--url", envvar="DIFFEXP_URL", help="the service, e.g. http://localhost:8000", show_envvar=True
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="DIFFEXP_API_KEY", help="the API key (dx_...)", show_envvar=True),
]
JobIdArg = Annotated[str, typer.Argument(help="the job id (32 hex digits)", show_default=False)]
Out = Annotated[Path, typer.Option("--out", help="folder to unpack the pairs into", file_okay=False)]
FormatOpt = Annotated[
    ExportFormat, typer.Option("--format", help="layout of the pairs: plain, nnunet (v2 raw) or monai")
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar on stderr")]
Timeout = Annotated[
    float | None, typer.Option("--timeout", help="stop waiting after this many seconds (the job goes on)")
]

# body fields of POST /v1/jobs as this CLI spells them, to name the option the service refused
_OPTIONS = {
    "w_cf": "--w-cf",
    "w_cg": "--w-cg",
    "max_attempts": "--max-attempts",
    "early_reject": "--early-reject",
}


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=code)


def _option(field: str) -> str:
    return _OPTIONS.get(field, f"--{field.replace('_', '-')}")


@contextmanager
def remote_errors() -> Iterator[None]:
    """The client's errors as one line each and an exit code (2: a refused value, 1: the rest)."""
    import httpx

    from diffuseexpand import DiffuseExpandError, InvalidRequest, Unauthorized

    try:
        yield
    except InvalidRequest as exc:
        body_errors = [e for e in exc.errors if str(e.get("pointer", "")).startswith("#/")]
        if body_errors:
            parts = []
            for e in body_errors:
                field = str(e["pointer"])[2:]
                got = f" {json.dumps(e['input'])}" if e.get("input") is not None else ""
                parts.append(f"invalid {_option(field)}{got}: {e.get('detail', 'invalid')}")
            raise _fail("; ".join(parts), 2) from None
        raise _fail(str(exc), 2) from None
    except Unauthorized as exc:
        raise _fail(f"{exc} (give the key with --api-key or DIFFEXP_API_KEY)") from None
    except DiffuseExpandError as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # a URL that is not one
        raise _fail(str(exc), 2) from None
    except (OSError, httpx.HTTPError) as exc:
        raise _fail(str(exc) or type(exc).__name__) from None


def _client(url: str, api_key: str | None) -> Client:
    from diffuseexpand import Client

    return Client(url, api_key=api_key or "")  # "": no key, not a fallback to the environment


def _summary(job: Any) -> str:
    p = job.progress
    return f"job {job.id} {job.status}: {p.kept_capped}/{p.target} pairs kept, {p.generated} generated"


@contextmanager
def _interrupted(job_id: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(
            f"\nStopped waiting; job {job_id} goes on. Follow it with `diffuseexpand remote wait {job_id}`, "
            f"stop it with `diffuseexpand remote cancel {job_id}`.",
            err=True,
        )
        raise typer.Exit(130) from None


@app.command()
def expand(
    url: Url,
    count: Annotated[int, typer.Option("--count", help="pairs to keep")],
    out: Out,
    api_key: ApiKey = None,
    model: Annotated[
        str | None, typer.Option(help="model name (remote models); default: the service's")
    ] = None,
    tau: Annotated[float | None, typer.Option(help="guidance temperature τ")] = None,
    eta: Annotated[float | None, typer.Option(help="Stage IV threshold η")] = None,
    steps: Annotated[int | None, typer.Option(help="solver steps per phase")] = None,
    w_cf: Annotated[float | None, typer.Option("--w-cf", help="classifier-free weight")] = None,
    w_cg: Annotated[float | None, typer.Option("--w-cg", help="classifier guidance weight")] = None,
    seed: Annotated[int | None, typer.Option(help="request seed (default: drawn and recorded)")] = None,
    solver: Annotated[str | None, typer.Option(help="dpmpp (DPM-Solver++) or unipc")] = None,
    karras: Annotated[bool | None, typer.Option("--karras/--no-karras", help="Karras sigmas")] = None,
    early_reject: Annotated[
        bool | None,
        typer.Option("--early-reject/--no-early-reject", help="the model's calibrated early rejection"),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="output WIDTHxHEIGHT, e.g. 256x192 (centre-cropped, resized); default: square"),
    ] = None,
    mask_source: Annotated[
        MaskSourceOpt | None,
        typer.Option(
            help="generated (the mask phase; default), real (a training mask of the model, deformed) or "
            "mixed (--real-share of the pairs real)"
        ),
    ] = None,
    real_share: Annotated[
        float | None, typer.Option(help="with --mask-source mixed: the share of pairs on real masks, 0 to 1")
    ] = None,
    clean_masks: Annotated[
        bool | None,
        typer.Option("--clean-masks/--no-clean-masks", help="clean generated masks (specks, holes)"),
    ] = None,
    format: FormatOpt = ExportFormat.plain,
    progress: Progress = True,
    timeout: Timeout = None,
) -> None:
    """Submit a job, follow it with a progress bar, then download and unpack its pairs into OUT."""
    with remote_errors(), _client(url, api_key) as client:
        job = client.submit(
            count, model=model, tau=tau, eta=eta, steps=steps, w_cf=w_cf, w_cg=w_cg, seed=seed,
            solver=solver, karras=karras, early_reject=early_reject, size=size,
            mask_source=mask_source.value if mask_source is not None else None, real_share=real_share,
            clean_masks=clean_masks,
        )  # fmt: skip
        typer.echo(f"job {job.id} queued", err=True)
        with _interrupted(job.id):
            job = client.wait(job.id, progress=progress, timeout=timeout)
        client.download(job.id, out, format=format.value, unpack=True)
        typer.echo(f"{job.progress.target} pairs of job {job.id} in {out}")  # succeeded: exactly target


@app.command()
def status(job_id: JobIdArg, url: Url, api_key: ApiKey = None) -> None:
    """Print the job as JSON (status, progress, parameters)."""
    with remote_errors(), _client(url, api_key) as client:
        typer.echo(json.dumps(client.get(job_id).raw, indent=2))


@app.command()
def wait(
    job_id: JobIdArg, url: Url, api_key: ApiKey = None, progress: Progress = True, timeout: Timeout = None
) -> None:
    """Follow the job until it finishes; exit code 1 if it failed or was canceled."""
    with remote_errors(), _client(url, api_key) as client, _interrupted(job_id):
        typer.echo(_summary(client.wait(job_id, progress=progress, timeout=timeout)))


@app.command()
def download(
    job_id: JobIdArg,
    url: Url,
    out: Out,
    api_key: ApiKey = None,
    format: FormatOpt = ExportFormat.plain,
    partial: Annotated[bool, typer.Option(help="the pairs kept so far of an unfinished job")] = False,
    unpack: Annotated[
        bool, typer.Option("--unpack/--zip", help="unpack into OUT, or keep the zip there")
    ] = True,
    progress: Progress = True,
) -> None:
    """Download the job's pairs into OUT (unpacked, or with --zip as OUT/ID.zip; ID-FORMAT.zip for
    another --format than plain)."""
    with remote_errors(), _client(url, api_key) as client:
        out.mkdir(parents=True, exist_ok=True)  # OUT is a folder: with --zip, ID[-FORMAT].zip goes in it
        path = client.download(
            job_id, out, format=format.value, unpack=unpack, partial=partial, progress=progress
        )
        typer.echo(str(path))


@app.command()
def cancel(job_id: JobIdArg, url: Url, api_key: ApiKey = None) -> None:
    """Stop the job; the pairs kept so far stay downloadable with `download --partial`."""
    with remote_errors(), _client(url, api_key) as client:
        typer.echo(_summary(client.cancel(job_id)))


@app.command()
def delete(job_id: JobIdArg, url: Url, api_key: ApiKey = None) -> None:
    """Remove the job and everything it stored."""
    with remote_errors(), _client(url, api_key) as client:
        client.delete(job_id)
        typer.echo(f"job {job_id} deleted")


@app.command()
def models(url: Url, api_key: ApiKey = None) -> None:
    """The models the service serves: name, resolution, and which is the default."""
    with remote_errors(), _client(url, api_key) as client:
        for m in client.models():
            typer.echo(f"{m.name}\t{m.resolution}px" + ("\t(default)" if m.default else ""))


@app.command()
def jobs(
    url: Url,
    api_key: ApiKey = None,
    limit: Annotated[int | None, typer.Option(help="list at most this many (newest first)")] = None,
) -> None:
    """The key's jobs, newest first: id, status, kept/target, created."""
    with remote_errors(), _client(url, api_key) as client:
        for i, job in enumerate(client.jobs(page_size=min(limit or 100, 100))):
            if limit is not None and i >= limit:
                break
            p, created = job.progress, job.created_at.isoformat() if job.created_at else ""
            typer.echo(f"{job.id}\t{job.status}\t{p.kept_capped}/{p.target}\t{created}")


_STAGES = {"dpm": "I", "segmenter": "II", "filter": "IV"}


def _training_line(t: dict[str, Any]) -> str:
    p = t.get("progress") or {}
    if not p:
        return f"training {t['id']} {t['status']}"
    loss = f" loss {p['loss']:.4f}" if p.get("loss") is not None else ""
    eta = f" eta {p['eta_seconds']:.0f} s" if p.get("eta_seconds") is not None else ""
    stage = _STAGES.get(p.get("stage", ""), "?")
    return f"training {t['id']} {t['status']}: stage {stage} step {p.get('step')}/{p.get('steps')}{loss}{eta}"


@app.command()
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="dataset folder (images/, masks/, optional unlabelled/ and pairs.csv) or a .zip/.tar.gz"
        ),
    ],
    url: Url,
    name: Annotated[str, typer.Option("--name", help="model name (a-z 0-9 . _ -)")],
    api_key: ApiKey = None,
    resolution: Annotated[
        int | None, typer.Option(help="square training size (16-256, a multiple of 8)")
    ] = None,
    train_steps: Annotated[int | None, typer.Option(help="Stage I steps")] = None,
    segmenter_steps: Annotated[int | None, typer.Option(help="Stage II steps (default: half)")] = None,
    filter_steps: Annotated[int | None, typer.Option(help="Stage IV steps (default: half)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="training batch size")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split and every draw")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    unlabelled_share: Annotated[
        float | None,
        typer.Option(help="share of Stage I batch rows from the data's unlabelled/ images, 0 to below 1"),
    ] = None,
    progress: Progress = True,
    timeout: Timeout = None,
) -> None:
    """Upload DATA as a dataset, train a model on it on the service, follow the training, and print
    the model's name and version once it is published."""
    if not data.exists():
        raise _fail(f"{data}: no such file or folder", 2)
    with remote_errors(), _client(url, api_key) as client:
        dataset = client.upload_dataset(data, name=data.name)
        unlabelled = f", {dataset['unlabelled']} unlabelled images" if dataset.get("unlabelled") else ""
        typer.echo(f"dataset {dataset['id']}: {dataset['pairs']} pairs{unlabelled}", err=True)
        training = client.train(
            dataset["id"],
            name,
            resolution=resolution,
            train_steps=train_steps,
            segmenter_steps=segmenter_steps,
            filter_steps=filter_steps,
            batch_size=batch_size,
            seed=seed,
            checkpoint_every=checkpoint_every,
            unlabelled_share=unlabelled_share,
        )
        typer.echo(f"training {training['id']} queued", err=True)
        last: list[str] = []

        def show(t: dict[str, Any]) -> None:
            line = _training_line(t)
            if progress and (not last or line != last[-1]):
                typer.echo(line, err=True)
                last.append(line)

        try:
            done = client.wait_training(training["id"], timeout=timeout, on_progress=show)
        except KeyboardInterrupt:
            typer.echo(f"\nStopped waiting; training {training['id']} goes on.", err=True)
            raise typer.Exit(130) from None
        model = done.get("model") or {}
        metrics = model.get("metrics") or {}
        if metrics.get("filter_dice") is not None:
            typer.echo(
                f"filter held-out Dice {metrics['filter_dice']:.4f}, real pairs passing "
                f"{metrics['real_pass_rate']:.1%}",
                err=True,
            )
        typer.echo(f"{model.get('name', name)}@{model.get('version')}")


def main() -> None:
    app(prog_name="diffuseexpand remote")


if __name__ == "__main__":
    main()
