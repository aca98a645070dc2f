"""Ack coalescing for one channel: acks asked for during a loop iteration leave as few frames as possible.

Data flow: the worker records every delivery tag of a channel (``delivered``) and, when a
delivery's work is done, asks to ack it (``done``). Once per event-loop iteration it calls
``flush``, which answers the frames to send: one ``basic.ack(multiple=True)`` for the longest
run of oldest outstanding tags that are all done, then single acks for done tags behind a tag
still in progress. A multiple ack therefore never covers a delivery that isn't finished, and
no tag is acked twice (a broker closes the channel for that). No ack is held back past the
iteration that finished its work, so a slow reconcile never delays other deliveries' acks.
"""

from __future__ import annotations

from collections import deque


class AckBatch:
    __slots__ = ("_outstanding", "_done")

    def __init__(self) -> None:
        self._outstanding: deque[int] = deque()  # delivered, not yet acked; increasing
        self._done: set[int] = set()  # acks asked for since the last flush

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def forget_newest(self, n: int) -> None:
        """Un-record the last ``n`` deliveries (they are about to be recorded again, in order)."""
        for _ in range(n):
            self._outstanding.pop()

    def done(self, tag: int) -> bool:
        """Ask to ack ``tag``; True when it is the first ask since the last flush (schedule one)."""
        self._done.add(tag)
        return len(self._done) == 1

    def forget(self, tag: int) -> bool:
        """``tag`` is settled another way (nacked back to its queue): no ack may name it. False
        when it was acked already (then it must not be nacked either)."""
        self._done.discard(tag)
        try:
            self._outstanding.remove(tag)
            return True
        except ValueError:
            return False

    def flush(self) -> list[tuple[int, bool]]:
        """``(tag, multiple)`` frames acking exactly the tags asked for since the last flush."""
        out, done = self._outstanding, self._done
        frames: list[tuple[int, bool]] = []
        run = 0
        last = 0
        while out and out[0] in done:
            last = out.popleft()
            done.discard(last)
            run += 1
        if run:
            frames.append((last, run > 1))
        for tag in sorted(done):
            try:
                out.remove(tag)
            except ValueError:
                continue  # settled already (acked, or forgotten and nacked): a second ack would close the channel
            frames.append((tag, False))
        done.clear()
        return frames

    @property
    def oldest(self) -> int | None:
        """The oldest tag delivered and not yet acked, if any."""
        return self._outstanding[0] if self._outstanding else None

    def __len__(self) -> int:
        """Deliveries not yet acked (or asked to be)."""
        return len(self._outstanding)
