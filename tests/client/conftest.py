from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.scripted import Scripted


@pytest.fixture()
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()
