"""Unit tests of pool.workqueue: client-go work queue semantics, no broker, no clock."""

from __future__ import annotations

import random

from pool.workqueue import WorkQueue, WorkQueueStats


def drain(q: WorkQueue[str, int]) -> list[tuple[str, list[int]]]:
    """Every ready key in order, each finished at once."""
    out = []
    while (got := q.get()) is not None:
        key, items = got
        q.done(key, len(items))
        out.append((key, items))
    return out


def test_empty_queue_hands_out_nothing() -> None:
    # Given a new queue
    q: WorkQueue[str, int] = WorkQueue()
    # When we ask for work
    got = q.get()
    # Then there is none, and every counter is zero
    assert got is None
    assert len(q) == 0
    assert q.statistics() == WorkQueueStats(ready=0, processing=0, items=0, adds=0, coalesced=0)


def test_ready_keys_are_handed_out_oldest_first() -> None:
    # Given three keys added in the order b, a, c
    q: WorkQueue[str, int] = WorkQueue()
    q.add("b", 1)
    q.add("a", 2)
    q.add("c", 3)
    # When they are taken one by one
    order = [q.get(), q.get(), q.get(), q.get()]
    # Then they come out in the order they became ready, then nothing
    assert order == [("b", [1]), ("a", [2]), ("c", [3]), None]


def test_items_of_a_ready_key_collapse_into_one_hand_out() -> None:
    # Given a key added three times before anyone took it, between two other keys
    q: WorkQueue[str, int] = WorkQueue()
    q.add("k", 1)
    q.add("other", 9)
    q.add("k", 2)
    q.add("k", 3)
    # When the queue is drained
    got = drain(q)
    # Then the key is handed out once, at its first position, with all its items in add order
    assert got == [("k", [1, 2, 3]), ("other", [9])]
    assert q.statistics().coalesced == 2


def test_a_processing_key_is_never_handed_out_again_until_done() -> None:
    # Given a key that is being processed
    q: WorkQueue[str, int] = WorkQueue()
    q.add("k", 1)
    assert q.get() == ("k", [1])
    # When more items arrive for it while it is processing
    q.add("k", 2)
    q.add("k", 3)
    # Then it is not ready: get returns nothing and the key stays processing
    assert q.get() is None
    assert len(q) == 0
    assert q.is_processing("k")


def test_items_added_while_processing_become_one_follow_up() -> None:
    # Given a processing key that collected two more items meanwhile
    q: WorkQueue[str, int] = WorkQueue()
    q.add("k", 1)
    key, items = q.get()  # type: ignore[misc]
    q.add("k", 2)
    q.add("k", 3)
    # When its processing is done
    q.done(key, len(items))
    # Then exactly one follow-up is ready, carrying both new items, and nothing after it
    assert len(q) == 1
    assert not q.is_processing("k")
    assert q.get() == ("k", [2, 3])
    assert q.get() is None


def test_done_without_new_items_forgets_the_key() -> None:
    # Given a processing key with no new items
    q: WorkQueue[str, int] = WorkQueue()
    q.add("k", 1)
    q.get()
    # When it is done
    q.done("k", 1)
    # Then it is neither ready nor processing and holds nothing
    assert q.get() is None
    assert not q.is_processing("k")
    assert q.statistics() == WorkQueueStats(ready=0, processing=0, items=0, adds=1, coalesced=0)


def test_follow_up_joins_the_back_of_the_line() -> None:
    # Given key a processing with a pending item, and key b ready behind it
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.get()
    q.add("a", 2)
    q.add("b", 3)
    # When a is done
    q.done("a", 1)
    # Then b (ready earlier) comes first, then a's follow-up
    assert drain(q) == [("b", [3]), ("a", [2])]


def test_different_keys_are_processed_concurrently() -> None:
    # Given two ready keys
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.add("b", 2)
    # When both are taken without finishing the first
    first, second = q.get(), q.get()
    # Then both are processing at once
    assert (first, second) == (("a", [1]), ("b", [2]))
    assert q.is_processing("a") and q.is_processing("b")
    assert q.statistics().processing == 2


def test_statistics_count_items_through_their_life() -> None:
    # Given a queue with: key a processing plus one dirty item, key b ready with two items
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.get()
    q.add("a", 2)
    q.add("b", 3)
    q.add("b", 4)
    # When we take a snapshot
    s = q.statistics()
    # Then: one ready key, one processing key, all four items held, two of the adds coalesced
    assert s == WorkQueueStats(ready=1, processing=1, items=4, adds=4, coalesced=2)
    # And when a is done (it handed out 1 item) and everything is drained
    q.done("a", 1)
    drain(q)
    # Then no items are held and the totals stay
    assert q.statistics() == WorkQueueStats(ready=0, processing=0, items=0, adds=4, coalesced=2)


def test_statistics_is_a_frozen_snapshot() -> None:
    # Given a snapshot taken before an add
    q: WorkQueue[str, int] = WorkQueue()
    before = q.statistics()
    # When the queue changes
    q.add("k", 1)
    # Then the old snapshot did not change
    assert before.adds == 0 and q.statistics().adds == 1


def test_remove_where_drops_matching_unhanded_items_only() -> None:
    # Given: key a ready with items 1,2; key b ready with 3; key c processing (item 5) with dirty item 6
    q: WorkQueue[str, int] = WorkQueue()
    q.add("c", 5)
    assert q.get() == ("c", [5])
    q.add("a", 1)
    q.add("a", 2)
    q.add("b", 3)
    q.add("c", 6)
    # When every even item is removed
    removed = q.remove_where(lambda item: item % 2 == 0)
    # Then the even items not yet handed out come back; the handed-out item 5 is untouched
    assert sorted(removed) == [2, 6]
    assert q.statistics().items == 3  # 1, 3 and the processing 5
    # And c's follow-up vanished (no items left for it), a keeps its odd item
    q.done("c", 1)
    assert drain(q) == [("a", [1]), ("b", [3])]
    assert q.statistics().items == 0


def test_remove_where_empties_a_ready_key_out_of_the_line() -> None:
    # Given keys a, b, c ready in that order
    q: WorkQueue[str, str] = WorkQueue()
    for key in "abc":
        q.add(key, f"{key}-item")
    # When all of b's items are removed
    removed = q.remove_where(lambda item: item.startswith("b"))
    # Then b is no longer ready and the others keep their order
    assert removed == ["b-item"]
    assert len(q) == 2
    assert [q.get(), q.get(), q.get()] == [("a", ["a-item"]), ("c", ["c-item"]), None]


def test_remove_where_matching_nothing_changes_nothing() -> None:
    # Given a queue with two ready keys
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.add("b", 2)
    before = q.statistics()
    # When nothing matches
    removed = q.remove_where(lambda item: item > 100)
    # Then nothing is removed and the queue is as it was
    assert removed == []
    assert q.statistics() == before
    assert drain(q) == [("a", [1]), ("b", [2])]


class Model:
    """A deliberately naive reference: lists only, obviously right."""

    def __init__(self) -> None:
        self.ready: list[str] = []
        self.pending: dict[str, list[int]] = {}
        self.processing: set[str] = set()

    def add(self, key: str, item: int) -> None:
        if key in self.pending:
            self.pending[key].append(item)
        else:
            self.pending[key] = [item]
            if key not in self.processing:
                self.ready.append(key)

    def get(self) -> tuple[str, list[int]] | None:
        if not self.ready:
            return None
        key = self.ready.pop(0)
        self.processing.add(key)
        return key, self.pending.pop(key)

    def done(self, key: str) -> None:
        self.processing.remove(key)
        if key in self.pending:
            self.ready.append(key)


def test_random_operations_never_process_a_key_twice_and_hand_out_every_item_once() -> None:
    # Given a seeded stream of 20,000 random adds, gets and dones over 12 keys
    rng = random.Random(20240611)
    q: WorkQueue[str, int] = WorkQueue()
    model = Model()
    in_progress: dict[str, list[int]] = {}  # what the "workers" hold now
    handed_out: list[int] = []
    next_item = 0
    adds = 0
    for _ in range(20_000):
        op = rng.random()
        # When each operation is applied to the queue and to the reference model
        if op < 0.5:
            key = f"k{rng.randrange(12)}"
            q.add(key, next_item)
            model.add(key, next_item)
            next_item += 1
            adds += 1
        elif op < 0.75:
            got = q.get()
            # Then get agrees with the model (FIFO of ready keys, all collected items) ...
            assert got == model.get()
            if got is not None:
                key, items = got
                # ... and never hands out a key that someone is still processing
                assert key not in in_progress, f"{key} handed out twice at once"
                assert items, "a key is never handed out without items"
                in_progress[key] = items
                handed_out.extend(items)
        elif in_progress:
            key = rng.choice(sorted(in_progress))
            q.done(key, len(in_progress.pop(key)))
            model.done(key)
        s = q.statistics()
        assert s.processing == len(in_progress)
        assert s.ready == len(model.ready) == len(q)
        assert s.items == next_item - len(handed_out) + sum(len(v) for v in in_progress.values())
    # And after finishing everything still in progress and draining
    for key, items in list(in_progress.items()):
        q.done(key, len(items))
    handed_out.extend(item for _, items in drain(q) for item in items)
    # Then every added item was handed out exactly once
    assert sorted(handed_out) == list(range(next_item))
    s = q.statistics()
    assert (s.ready, s.processing, s.items, s.adds) == (0, 0, 0, adds)
    assert 0 < s.coalesced < adds  # the stream did exercise coalescing
