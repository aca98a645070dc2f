"""Start a coroutine now, finish it as a Task: what ``asyncio`` calls an eager task (3.12+).

``loop.create_task`` only schedules a coroutine's first step; it runs after everything else
the loop has queued for this iteration. The worker creates one task per reconcile from inside
pika's delivery callback, which handles every delivery a socket read brought in before the
loop moves on, so under load each reconcile waited for the whole read's worth of parsing and
then for its turn in the ready queue. Measured on the 2-core box with the broker local
(``python -m bench latency``, pool p99 at 2,000 events/s): quorum queues 52-57 ms deferred
against 26-34 ms eager; classic queues median 256 ms (11 runs) against 137 ms (4 runs). A
reconcile that has nothing to do returns in its first step and so completes right there,
inside the callback that received it. Cost on 3.11: ~2.5 us of CPU per reconcile.

``start(loop, coro)`` runs ``coro`` up to its first suspension immediately, with
``asyncio.current_task()`` being the returned task (so ``asyncio.timeout`` and friends work in
that first step) and in the task's own context, then lets the task carry on from there. On
Python 3.12+ that is ``asyncio.Task(..., eager_start=True)``. On 3.11 it is done here:
the task wraps ``_Resume``, which hands the task whatever the first step produced (its
result, its exception, or the future it is waiting on) and then forwards ``send``/``throw``
to the coroutine. Called while a task is running (a reconcile finishing and starting the
next one), it is ``loop.create_task``: a backlog then goes through the loop, not through ever
deeper nested first steps (and 3.11 could not make two tasks current anyway).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any

_NATIVE = sys.version_info >= (3, 12)
_enter_task, _leave_task = asyncio.tasks._enter_task, asyncio.tasks._leave_task


class _Resume(Coroutine):  # type: ignore[type-arg]
    """The rest of a coroutine whose first step already ran (see the module docstring)."""

    __slots__ = ("_coro", "_first", "_yielded", "_result", "_exc", "_finished")

    def __init__(self, coro: Coroutine) -> None:  # type: ignore[type-arg]
        self._coro = coro
        self._first = True  # the task has not taken the first step's outcome yet
        self._yielded: Any = None  # start() fills these in from the first step
        self._result: Any = None
        self._exc: BaseException | None = None
        self._finished = False

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            if self._finished:
                if self._exc is not None:
                    exc, self._exc = self._exc, None  # don't keep a traceback cycle alive
                    raise exc
                raise StopIteration(self._result)
            return self._yielded  # the task now waits on what the first step waits on
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._first:
            self._first = False
            if self._finished:  # cancelled after the coroutine already returned: nothing to stop
                raise typ if val is None else val
            waited = self._yielded
            if isinstance(waited, asyncio.Future):
                waited.cancel()  # as Task.cancel() does with the future a task waits on
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine) -> asyncio.Task:  # type: ignore[type-arg]
    """A task for ``coro`` whose first step has already run (see the module docstring)."""
    if asyncio.current_task(loop) is not None:
        # a task starting another (a reconcile finishing picks up the next key): queue it, so a
        # backlog is worked through by the loop rather than by ever deeper nested first steps
        return loop.create_task(coro)
    if _NATIVE:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    resume = _Resume(coro)
    context = contextvars.copy_context()
    task = loop.create_task(resume, context=context)  # its first step, queued, picks up the outcome
    _enter_task(loop, task)
    try:
        resume._yielded = context.run(coro.send, None)
    except StopIteration as stop:
        resume._finished, resume._result = True, stop.value
    except BaseException as exc:  # noqa: BLE001 - handed to the task, which re-raises it
        resume._finished, resume._exc = True, exc
    finally:
        _leave_task(loop, task)
    return task
