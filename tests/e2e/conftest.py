"""e2e fixtures: two real upstream processes shared by the module's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import upstream


@pytest.fixture(scope="module")
def upstream_a() -> Iterator[int]:
    with upstream("a") as port:
        yield port


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[int]:
    with upstream("b") as port:
        yield port
