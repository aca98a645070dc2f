"""pool.journal: what survives a worker's death, and only that."""

import os
import signal

import pytest

from pool import journal


@pytest.mark.parametrize("backed", ["file", "anonymous"])
def test_a_killed_process_leaves_its_in_flight_events_with_their_counts(tmp_path, backed):
    # Given a slot's store, made before the fork (as the supervisor does)
    path = journal.path_for(str(tmp_path), "node", 0)
    store = journal.Store.open(path, 4) if backed == "file" else journal.Store.anonymous(4)
    a, b = journal.digest("k1", b"{}"), journal.digest("k2", b"{}")
    # and a child process with two reconciles in flight (one already blamed once) and one finished
    pid = os.fork()
    if pid == 0:
        j = journal.Journal(store)
        j.enter("k1", b"{}", 0)
        j.enter("k2", b"{}", 1)
        j.leave(j.enter("done", b"", 0))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    # When the supervisor looks, and the slot's next process takes the journal
    assert store.records() == {a: 1, b: 2}
    j, leftover = journal.Journal.take_leftover(store)
    # Then it holds exactly the two in flight, each with one more death
    assert leftover == {a: 1, b: 2}
    # and a clean exit leaves nothing
    j.enter("k1", b"{}", 0)
    j.close()
    assert store.records() == {}


def test_the_file_outlives_the_pool_and_is_read_only_up_to_its_size(tmp_path):
    # Given a journal file a previous pool left with one record, grown huge and sparse behind it
    path = journal.path_for(str(tmp_path), "node", 0)
    j = journal.Journal(journal.Store.open(path, 2))
    j.enter("k1", b"{}", 0)
    with open(path, "r+b") as fh:
        fh.truncate(1 << 40)  # 1 TB, sparse
    # When the next pool opens it for the same concurrency
    store = journal.Store.open(path, 2)
    # Then the record is there, and nothing beyond the journal's own size was read
    assert store.records() == {journal.digest("k1", b"{}"): 1}
    assert os.path.getsize(path) == 2 * journal.RECORD


def test_a_full_journal_never_raises(tmp_path):
    j = journal.Journal(journal.Store.open(journal.path_for(str(tmp_path), "n", 1), 1))
    first, second = j.enter("x", b"", 0), j.enter(b"\xff", b"", 300)
    assert first == 0 and second == -1
    j.leave(second)
    j.close()


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory"])
def test_a_planted_journal_path_is_refused_not_followed(tmp_path, plant):
    path = journal.path_for(str(tmp_path), "n", 0)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    if plant == "symlink":
        os.symlink(victim, path)
    elif plant == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    with pytest.raises(OSError):
        journal.Store.open(path, 4)
    assert victim.read_bytes() == b"precious"
