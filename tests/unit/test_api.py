"""The public API: ``pool.__all__`` is pinned, and its value types behave as documented."""

from __future__ import annotations

import dataclasses

import pytest

import pool
from pool import Controller, CtlpoolError, Permanent, Result, RetryPolicy
from pool.controller import is_async

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
