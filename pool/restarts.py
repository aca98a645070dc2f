"""When the supervisor restarts workers: after a death (when, or give up), and in a rolling restart
(which slot next). Pure: no processes, no clock.

Data flow: ``Supervisor._reap`` passes the slot's recent deaths, the time and whether the
worker died inside a reconcile (its ``pool.journal`` says so); ``after_death`` answers the
slot's deaths to keep and either the delay before the restart or ``None``: a crash loop,
give up (``EXIT_CRASH_LOOP``).

A death inside a reconcile (a poison event, the OOM killer...) is restarted at once and not
counted: the slot's next worker blames the events it held, and ``--max-deliveries`` parks
each after so many deaths. That bounds these deaths; counting them would give up before the
poison is parked.
"""

from __future__ import annotations

CRASH_LOOP_DEATHS = 5  # this many deaths of one slot...
CRASH_LOOP_WINDOW_S = 60.0  # ...within this window mean it won't get better by restarting
RESTART_FIRST_S = 0.5  # first restart delay; doubles per recent death
RESTART_MAX_S = 30.0


def after_death(deaths: list[float], now: float, inside_reconcile: bool) -> tuple[list[float], float | None]:
    """(the slot's recent deaths, seconds until its restart or None to give up)."""
    if inside_reconcile:
        return deaths, RESTART_FIRST_S
    recent = [t for t in deaths if now - t < CRASH_LOOP_WINDOW_S] + [now]
    if len(recent) >= CRASH_LOOP_DEATHS:
        return recent, None
    return recent, min(RESTART_FIRST_S * 2 ** (len(recent) - 1), RESTART_MAX_S)


class Rolling:
    """A rolling restart (SIGHUP): the slots in line, and whether another was asked for meanwhile.

    ``request`` on SIGHUP: ``"start"`` (log it, tell systemd RELOADING) or ``"queued"`` (one is
    under way: another follows it, the first such request logged; a SIGHUP is never dropped).
    ``step`` every loop turn, given whether every worker is ready and none is retiring: the slot
    to retire now, ``"done"`` (tell systemd READY again, unless another one starts at once:
    ``reloading`` says), or ``None`` (wait)."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self.line: list[int] = []
        self.reloading = False
        self.again = False

    def request(self) -> str:
        if self.reloading:
            queued_first = not self.again
            self.again = True
            return "queued" if queued_first else "queued again"
        self.line, self.reloading, self.again = list(range(self._slots)), True, False
        return "start"

    def cancel(self) -> None:
        """Draining: no rolling restart goes on."""
        self.line, self.reloading, self.again = [], False, False

    def step(self, ready: bool, retiring: bool) -> int | str | None:
        if self.reloading and not self.line and ready and not retiring:
            self.reloading = False
            if self.again:
                self.request()
            return "done"
        if not self.line or not ready:
            return None
        return self.line.pop(0)
