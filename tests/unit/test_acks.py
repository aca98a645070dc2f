"""AckBatch: coalesced acks never cover an unfinished delivery and never ack a tag twice."""

import random

from pool.acks import AckBatch


def test_in_order_acks_become_one_multiple_frame():
    # Given 5 deliveries all finished in the same loop iteration
    b = AckBatch()
    for t in range(1, 6):
        b.delivered(t)
    assert b.done(1) is True
    for t in range(2, 6):
        assert b.done(t) is False
    # When flushed Then one multiple ack up to 5 covers them
    assert b.flush() == [(5, True)]
    assert len(b) == 0


def test_a_single_ack_is_not_multiple():
    b = AckBatch()
    b.delivered(7)
    b.done(7)
    assert b.flush() == [(7, False)]


def test_done_tags_behind_a_busy_one_are_acked_singly_and_not_covered_later():
    # Given tags 1..4 where 2 is still being reconciled
    b = AckBatch()
    for t in (1, 2, 3, 4):
        b.delivered(t)
    for t in (1, 3, 4):
        b.done(t)
    # When flushed Then 1 is acked alone (a multiple ack up to 1), 3 and 4 singly, 2 untouched
    assert b.flush() == [(1, False), (3, False), (4, False)]
    # and when 2 finishes later it is acked alone: a multiple ack would re-cover 3 and 4
    b.done(2)
    assert b.flush() == [(2, False)]


def test_random_completion_orders_ack_each_tag_exactly_once():
    rng = random.Random(7)
    for _ in range(200):
        # Given deliveries finishing in random order over random flush points
        b = AckBatch()
        n = rng.randint(1, 60)
        for t in range(1, n + 1):
            b.delivered(t)
        order = list(range(1, n + 1))
        rng.shuffle(order)
        acked: list[int] = []
        outstanding = set(range(1, n + 1))
        for i, t in enumerate(order):
            b.done(t)
            if rng.random() < 0.3 or i == n - 1:
                finished = set(order[: i + 1])
                for tag, multiple in b.flush():
                    # Then a frame only ever covers finished, not-yet-acked tags, and names one of them
                    covered = {x for x in outstanding if x <= tag} if multiple else {tag}
                    assert tag in outstanding
                    assert covered <= finished
                    outstanding -= covered
                    acked.extend(covered)
        assert sorted(acked) == list(range(1, n + 1))
        assert len(b) == 0


def test_deliveries_held_then_replayed_are_recorded_once():
    # Given tags 1..3 recorded while the worker held them (guard window being measured)
    b = AckBatch()
    for t in (1, 2, 3):
        b.delivered(t)
    # When the worker replays them: forget the newest 3, then record them again as it dispatches
    b.forget_newest(3)
    for t in (1, 2, 3):
        b.delivered(t)
    assert len(b) == 3
    # Then finishing them all still coalesces into one multiple ack, with nothing left over
    for t in (1, 2, 3):
        b.done(t)
    assert b.flush() == [(3, True)]
    assert len(b) == 0


def test_a_tag_settled_twice_is_acked_once_and_not_nacked_after() -> None:
    # Given a tag acked (flushed), then asked to ack again (a late confirm after it was settled)
    b = AckBatch()
    for t in (1, 2):
        b.delivered(t)
    b.done(1)
    assert b.flush() == [(1, False)]
    b.done(1)
    # Then no second frame names it (the broker closes the channel on an unknown tag)
    assert b.flush() == []
    # and a tag nacked back (forgotten) is not acked when its confirm comes late; one acked already can't be nacked
    assert b.forget(2) is True
    b.done(2)
    assert b.flush() == []
    assert b.forget(1) is False
