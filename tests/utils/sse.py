"""A reader of Server-Sent Events for tests: the lines of a response in, one dict per event out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def read_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Events as ``{"id": int, "event": str, "data": dict}``; comments (keep-alive pings) are skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if fields:
                yield {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
