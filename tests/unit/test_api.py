"""The public API: ``pool.__all__`` is pinned, and its value types behave as documented."""

from __future__ import annotations

import dataclasses
import math
import uuid
from pathlib import Path

import pytest

import pool
from pool import ConfigError, Controller, CtlpoolError, Permanent, Result, RetryPolicy
from pool.controller import MAX_REQUEUE_AFTER_S, is_async, load_controller

PUBLIC_API = [
    "BlockingPublisher",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "Context",
    "Controller",
    "CtlpoolError",
    "Event",
    "Nacked",
    "Permanent",
    "PluginMissing",
    "PublishError",
    "Publisher",
    "Result",
    "RetryPolicy",
    "TopologyMismatch",
    "Unroutable",
]


def test_all_is_pinned() -> None:
    # Given the package's declared public names
    # When compared with the list users were promised
    # Then they are exactly the same (adding or removing a name is a deliberate API change)
    assert pool.__all__ == PUBLIC_API


def test_every_public_name_exists() -> None:
    # Given the public names
    # When each is looked up on the package
    # Then it is there (a star-import cannot fail)
    namespace: dict[str, object] = {}
    exec("from pool import *", namespace)  # noqa: S102 - the point is the star-import itself
    assert set(PUBLIC_API) <= set(namespace)


def test_result_defaults_to_no_requeue() -> None:
    # Given a Result built without arguments
    # When its requeue is read
    # Then there is none
    assert Result().requeue_after is None
    assert Result(requeue_after=30).requeue_after == 30


@pytest.mark.parametrize("value", [0, 0.5, 30, 30.0, MAX_REQUEUE_AFTER_S])
def test_result_takes_seconds_from_zero_to_a_year(value: float) -> None:
    # Given a requeue delay in range
    # When a Result is built with it
    # Then it keeps it
    assert Result(requeue_after=value).requeue_after == value


@pytest.mark.parametrize("value", ["30", b"30", True, False, [30], 1j, object()])
def test_result_refuses_what_is_not_a_number(value: object) -> None:
    # Given a requeue delay that is not a number of seconds (a bool is not one either)
    # When a Result is built with it
    with pytest.raises(TypeError) as info:
        Result(requeue_after=value)  # type: ignore[arg-type]
    # Then it fails at once, naming the value
    assert "requeue_after" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, -math.inf, MAX_REQUEUE_AFTER_S + 1, 1e300])
def test_result_refuses_seconds_out_of_range(value: float) -> None:
    # Given a requeue delay below zero, not finite, or beyond a year
    # When a Result is built with it
    with pytest.raises(ValueError) as info:
        Result(requeue_after=value)
    # Then it fails at once, naming the range and the value
    assert "requeue_after" in str(info.value) and repr(value) in str(info.value)
    assert str(MAX_REQUEUE_AFTER_S) in str(info.value)


def test_result_is_frozen() -> None:
    # Given a Result
    result = Result(requeue_after=5)
    # When someone tries to change it
    # Then it refuses
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.requeue_after = 10  # type: ignore[misc]


def test_results_compare_by_value() -> None:
    # Given two Results with the same requeue
    # When compared
    # Then they are equal and hash alike
    assert Result(requeue_after=5) == Result(requeue_after=5)
    assert hash(Result(requeue_after=5)) == hash(Result(requeue_after=5))
    assert Result(requeue_after=5) != Result(requeue_after=6)


def test_permanent_is_an_exception_carrying_its_message() -> None:
    # Given a Permanent raised with a reason
    # When caught as a plain Exception
    with pytest.raises(Exception) as info:
        raise Permanent("spec invalid")
    # Then it is a Permanent, a CtlpoolError, and says why
    assert isinstance(info.value, Permanent)
    assert isinstance(info.value, CtlpoolError)
    assert str(info.value) == "spec invalid"


def test_controller_defaults() -> None:
    # Given the base class
    # When its class attributes are read
    # Then a subclass starts with no name, plain JSON events and the default retry policy
    assert Controller.name == ""
    assert Controller.event_type is None
    assert Controller.retry == RetryPolicy()


def test_controller_base_reconcile_is_abstract() -> None:
    # Given a Controller that did not implement reconcile
    class Lazy(Controller):
        name = "lazy"

    # When reconcile is called
    # Then it says so
    with pytest.raises(NotImplementedError):
        Lazy().reconcile("k", {}, None)  # type: ignore[arg-type]


def test_setup_is_a_no_op_by_default() -> None:
    # Given a Controller that does not override setup
    class Plain(Controller):
        name = "plain"

    # When setup is called
    # Then nothing happens and nothing is returned
    assert Plain().setup() is None  # type: ignore[func-returns-value]


def test_async_and_plain_reconcile_are_told_apart() -> None:
    # Given one controller with async reconcile and one with a plain def
    class Async(Controller):
        name = "async"

        async def reconcile(self, key, event, ctx):  # noqa: ANN001, ANN201
            return None

    class Sync(Controller):
        name = "sync"

        def reconcile(self, key, event, ctx):  # noqa: ANN001, ANN201
            return Result(requeue_after=1)

    # When the worker checks how to run them
    # Then the async one runs on the loop and the plain one in a thread
    assert is_async(Async())
    assert not is_async(Sync())


# ---- load_controller: whatever the user's module does, one line ----

def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """Write ``source`` as a fresh importable module; its name."""
    name = f"ctl_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


GOOD_BASE = "from pool import Controller\n"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        (GOOD_BASE + "class C(Controller):\n    name = 5\n", "needs a class attribute name, a string"),
        (GOOD_BASE + "class C(Controller):\n    name = b'web'\n", "needs a class attribute name, a string"),
        (GOOD_BASE + "class C(Controller):\n    name = 'we\\x1bb'\n", "needs a class attribute name, a string"),
        (GOOD_BASE + "class C(Controller):\n    name = 'ok'\n    def __init__(self):\n"
         "        raise RuntimeError('db down\\nsecond line')\n", "failed: RuntimeError: db down\\nsecond line"),
        ("raise ValueError('bad config\\nat import')\n", "failed: ValueError: bad config\\nat import"),
        ("def broken(:\n", "failed: SyntaxError: "),
        ("import sys\nsys.exit(3)\n", "failed: SystemExit: 3"),
    ],
)
def test_a_controller_that_cannot_load_is_one_config_error_line(source: str, needle: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a controller module that breaks while being imported, checked or constructed
    ref = _module(tmp_path, monkeypatch, source) + ":C"
    # When it is loaded
    with pytest.raises(ConfigError) as info:
        load_controller(ref)
    # Then it is a ConfigError on one line that says what went wrong
    text = str(info.value)
    assert text.startswith("--controllers: ")
    assert needle in text
    assert "\n" not in text and "\x1b" not in text


def test_a_good_controller_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a controller module that is fine
    ref = _module(tmp_path, monkeypatch, GOOD_BASE + "class C(Controller):\n    name = 'web'\n") + ":C"
    # When it is loaded
    ctl = load_controller(ref)
    # Then an instance comes back
    assert isinstance(ctl, Controller) and ctl.name == "web"
