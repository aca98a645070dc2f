"""pool.messages: what crosses the worker -> supervisor pipe."""

from pool.messages import Metrics, WorkerState, decode, encode_metrics, encode_state


def test_states_and_snapshots_round_trip_and_never_mix():
    for state in WorkerState:
        assert decode(encode_state(state)) is state
    # a snapshot whose JSON happens to read like a state word is still a snapshot
    assert decode(encode_metrics(b"ready")) == Metrics(b"ready")
    assert decode(encode_metrics(b"")) == Metrics(b"")


def test_anything_else_is_ignored():
    assert decode(b"") is None
    assert decode(b"ready") is None  # the old bare word
    assert decode(b"sunknown") is None
