"""What the supervisor does when a worker dies: restart it when, or give up. Pure: no processes, no clock.

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
