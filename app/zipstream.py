"""The job's zip, streamed member by member with ``stream-zip`` (never built whole in memory)."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_32, ZIP_64, stream_zip

from app.layout import image_key, manifest_csv, manifest_key, mask_key, record_key
from app.storage import Storage

MODE = stat.S_IFREG | 0o644


def job_zip(
    storage: Storage,
    job_id: str,
    rows: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    final: bool,
    on_member: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """``images/NAME.png``, ``masks/NAME.png``, ``manifest.csv`` and ``job.json`` of ``rows``.

    ``final`` streams the stored manifest; otherwise (a partial zip) one is written for ``rows``.
    """
    big = 2 * len(rows) + 2 > 65_000
    deflate, store = (ZIP_64, NO_COMPRESSION_64) if big else (ZIP_32, NO_COMPRESSION_32)
    now = datetime.now(UTC).replace(tzinfo=None)

    def members() -> Iterable[tuple[str, datetime, int, Any, Iterable[bytes]]]:
        manifest = storage.iter_chunks(manifest_key(job_id)) if final else iter([manifest_csv(rows, params)])
        yield "manifest.csv", now, MODE, deflate, manifest
        yield "job.json", now, MODE, deflate, storage.iter_chunks(record_key(job_id))
        for i, row in enumerate(rows):  # PNGs are compressed already
            if on_member is not None:
                on_member(i)
            for folder, key in (("images", image_key), ("masks", mask_key)):
                yield (
                    f"{folder}/{row['name']}.png",
                    now,
                    MODE,
                    store,
                    storage.iter_chunks(key(job_id, row["name"])),
                )

    return iter(stream_zip(members()))
