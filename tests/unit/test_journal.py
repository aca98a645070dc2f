"""pool.journal: what survives a worker's death, and only that."""

import os
import signal

from pool import journal


def test_a_killed_process_leaves_its_in_flight_events_with_their_counts(tmp_path):
    path = journal.path_for(str(tmp_path), "node", 0)
    a, b = journal.digest("k1", b"{}"), journal.digest("k2", b"{}")
    # Given a child process with two reconciles in flight (one already blamed once) and one finished
    pid = os.fork()
    if pid == 0:
        j = journal.Journal(path, 4)
        j.enter("k1", b"{}", 0)
        j.enter("k2", b"{}", 1)
        j.leave(j.enter("done", b"", 0))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    # When the slot's next process takes the journal
    j, leftover = journal.Journal.take_leftover(path, 4)
    # Then it holds exactly the two in flight, each with one more death
    assert leftover == {a: 1, b: 2}
    # and a clean exit leaves nothing
    j.enter("k1", b"{}", 0)
    j.close()
    assert journal.read_inflight(path) == {}


def test_a_full_journal_never_raises(tmp_path):
    j = journal.Journal(journal.path_for(str(tmp_path), "n", 1), 1)
    first, second = j.enter("x", b"", 0), j.enter(b"\xff", b"", 300)
    assert first == 0 and second == -1
    j.leave(second)
    j.close()
