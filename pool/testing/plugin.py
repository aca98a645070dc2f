"""The pytest plugin ctlpool registers (entry point ``pytest11``): the ``ctlpool`` fixture.

``ctlpool(*controllers, **settings)`` makes a ``pool.testing.Harness``; every harness a test made
is closed after it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from ..controller import Controller
from .harness import Harness


@pytest.fixture
def ctlpool() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*controllers: Controller, **settings: Any) -> Harness:
        h = Harness(*controllers, **settings)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()
