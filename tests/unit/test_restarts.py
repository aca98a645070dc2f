"""pool.restarts: when a dead worker is restarted, and when the supervisor gives up."""

from pool.restarts import CRASH_LOOP_DEATHS, CRASH_LOOP_WINDOW_S, RESTART_FIRST_S, after_death


def test_the_restart_delay_doubles_with_recent_deaths_then_gives_up():
    deaths: list[float] = []
    delays = []
    for i in range(CRASH_LOOP_DEATHS):
        deaths, delay = after_death(deaths, 100.0 + i, inside_reconcile=False)
        delays.append(delay)
    assert delays[:-1] == [RESTART_FIRST_S * 2 ** i for i in range(CRASH_LOOP_DEATHS - 1)]
    assert delays[-1] is None  # the fifth death within the window: a crash loop


def test_deaths_older_than_the_window_are_forgotten():
    deaths = [0.0, 1.0, 2.0, 3.0]
    deaths, delay = after_death(deaths, CRASH_LOOP_WINDOW_S + 2.5, inside_reconcile=False)
    assert deaths == [3.0, CRASH_LOOP_WINDOW_S + 2.5] and delay == RESTART_FIRST_S * 2


def test_a_death_inside_a_reconcile_restarts_at_once_and_is_not_counted():
    deaths = [10.0, 11.0, 12.0, 13.0]
    for t in range(20):
        kept, delay = after_death(deaths, 14.0 + t, inside_reconcile=True)
        assert (kept, delay) == (deaths, RESTART_FIRST_S)


def test_a_first_death_restarts_after_the_first_delay():
    assert after_death([], 0.0, inside_reconcile=False) == ([0.0], RESTART_FIRST_S)


def test_a_sighup_during_a_rolling_restart_queues_exactly_one_more():
    from pool.restarts import Rolling

    r = Rolling(2)
    # Given a rolling restart under way (slot 0 retired, waiting for it)
    assert r.request() == "start"
    assert r.step(ready=True, retiring=False) == 0
    # When SIGHUP comes twice more meanwhile: one more restart is queued (the first said, the second folded in)
    assert (r.request(), r.request()) == ("queued", "queued again")
    assert r.step(ready=False, retiring=True) is None  # waits while slot 0's replacement starts
    assert r.step(ready=True, retiring=False) == 1
    # Then when this one is done, the next starts at once, over every slot again
    assert r.step(ready=True, retiring=False) == "done" and r.reloading
    assert [r.step(ready=True, retiring=False), r.step(ready=True, retiring=False)] == [0, 1]
    assert r.step(ready=True, retiring=False) == "done" and not r.reloading
    # and a drain cancels whatever is in line
    r.request()
    r.cancel()
    assert r.step(ready=True, retiring=False) is None and not r.reloading
