"""pool.eager: a coroutine's first step runs inside start(), the rest as the returned task."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Awaitable, Callable

import pytest
import uvloop

from pool import eager

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: Any) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run ``main()`` on a fresh loop of each kind the worker may use."""

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(main())  # type: ignore[arg-type]
    return runner


def from_callback(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """Call ``fn`` the way pika calls the worker: from a plain loop callback, no task current."""
    out: asyncio.Future[Any] = loop.create_future()

    def cb() -> None:
        assert asyncio.current_task(loop) is None
        out.set_result(fn())
    loop.call_soon(cb)
    return out


def test_a_coroutine_with_nothing_to_await_finishes_inside_start(run: Any) -> None:
    log: list[str] = []

    async def quick() -> int:
        log.append("ran")
        return 7

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def go() -> asyncio.Task[int]:
            task = eager.start(loop, quick())
            log.append("returned")
            return task
        task = await from_callback(loop, go)
        assert log == ["ran", "returned"]
        assert await task == 7
    run(main)


def test_the_first_step_runs_now_and_the_rest_when_what_it_awaits_is_done(run: Any) -> None:
    log: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = loop.create_future()

        async def waits() -> str:
            log.append("before")
            got = await gate
            log.append(f"after {got}")
            await asyncio.sleep(0)
            return "done"

        task = await from_callback(loop, lambda: eager.start(loop, waits()))
        assert log == ["before"]
        await asyncio.sleep(0.01)
        assert log == ["before"] and not task.done()
        gate.set_result(1)
        assert await task == "done"
        assert log == ["before", "after 1"]
    run(main)


def test_the_first_step_sees_its_own_task_so_asyncio_timeout_works(run: Any) -> None:
    seen: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def timed() -> None:
            seen.append(asyncio.current_task())
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)

        task = await from_callback(loop, lambda: eager.start(loop, timed()))
        assert seen == [task]
        with pytest.raises(TimeoutError):
            await task
    run(main)


def test_an_exception_in_the_first_step_is_the_tasks(run: Any) -> None:
    async def boom() -> None:
        raise ValueError("first step")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = await from_callback(loop, lambda: eager.start(loop, boom()))
        with pytest.raises(ValueError, match="first step"):
            await task
    run(main)


def test_cancelled_before_its_next_step_the_coroutine_is_cancelled_where_it_waits(run: Any) -> None:
    log: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = loop.create_future()

        async def waits() -> None:
            try:
                await gate
                log.append("not cancelled")
            except asyncio.CancelledError:
                log.append("cancelled")
                raise
            finally:
                log.append("finally")

        def go() -> asyncio.Task[None]:
            task = eager.start(loop, waits())
            task.cancel()  # at once: the task has not taken a step of its own yet
            return task
        task = await from_callback(loop, go)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["cancelled", "finally"]
        assert gate.cancelled()  # what it waited on is cancelled too, as Task.cancel() does
    run(main)


def test_cancelling_a_coroutine_that_already_finished_does_not_run_it_again(run: Any) -> None:
    runs: list[int] = []

    async def quick() -> None:
        runs.append(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def go() -> asyncio.Task[None]:
            task = eager.start(loop, quick())
            task.cancel()
            return task
        task = await from_callback(loop, go)
        await asyncio.wait({task})
        assert task.done() and runs == [1]
    run(main)


def test_started_from_a_running_task_it_is_queued_not_nested(run: Any) -> None:
    log: list[str] = []

    async def other() -> None:
        log.append("other")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = eager.start(loop, other())  # main() is a running task
        log.append("returned")
        await task
        assert log == ["returned", "other"]
    run(main)


def test_context_variables_set_in_the_first_step_stay_with_the_task(run: Any) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def sets() -> None:
            var.set("task")
            await asyncio.sleep(0)
            seen.append(var.get())

        task = await from_callback(loop, lambda: eager.start(loop, sets()))
        assert var.get() == "unset"
        await task
        assert seen == ["task"]
    run(main)
