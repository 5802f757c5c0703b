"""A Server-Sent Events decoder (the WHATWG event-stream format), fed line by line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None  # the stream's last event id when this one was dispatched (what to resume from)
    retry_ms: int | None = None


class Decoder:
    """Turns lines (without their line break) into ``Event``s; keeps the last event id across
    calls, so a reconnect can send it as ``Last-Event-ID``."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":  # a blank line dispatches what was gathered
            data, event = self._data, self._event or "message"
            self._data, self._event = [], ""
            if not data:
                return None
            return Event(event=event, data="\n".join(data), id=self.last_id, retry_ms=self.retry_ms)
        if line.startswith(":"):  # a comment: keep-alive pings
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def events(self, lines: Iterable[str]) -> Iterator[Event]:
        for line in lines:
            event = self.feed(line.rstrip("\r"))
            if event is not None:
                yield event
