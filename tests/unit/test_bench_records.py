"""bench.records: what the latency figures are made of (no broker)."""

from __future__ import annotations

from array import array

from bench.records import REC, account, percentile, split_warmup


def test_split_warmup_puts_events_published_before_the_cut_apart() -> None:
    lat = [50.0, 3.0, 40.0, 2.0, 4.0]
    pub = [100, 300, 150, 200, 250]  # ns; the cut at 200 leaves 100 and 150 in the warm-up
    steady, warm = split_warmup(lat, pub, 200)
    assert steady == [2.0, 3.0, 4.0]
    assert warm == [40.0, 50.0]
    assert split_warmup(lat, pub, 0) == (sorted(lat), [])


def test_account_keeps_each_latency_with_its_publish_time() -> None:
    # key, n, covered, start, end, published: two reconciles of key 1, one of key 2
    rows = [(1, 1, 1, 10_000_000, 11_000_000, 9_000_000), (1, 3, 2, 20_000_000, 21_000_000, 12_000_000),
            (2, 1, 1, 15_000_000, 18_000_000, 14_000_000)]
    records = array("q", b"".join(REC.pack(*r) for r in rows))
    acc = account(records)
    assert acc.covered == 4 and acc.overlaps == 0
    assert list(zip(acc.published_ns, acc.latencies_ms)) == [(9_000_000, 2.0), (12_000_000, 9.0), (14_000_000, 4.0)]
    steady, warm = split_warmup(acc.latencies_ms, acc.published_ns, 12_000_000)
    assert steady == [4.0, 9.0] and warm == [2.0]
    assert percentile(steady, 99) == 9.0
