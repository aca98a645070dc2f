"""``--pin auto|true|false``: pin workers unless the broker runs on this host (``pool.pinning``)."""

from __future__ import annotations

import pytest

from pool.pinning import LocalFacts, _addr, decide, local_facts

HERE = frozenset({"127.0.0.1", "::1", "192.0.2.2", "fe80::1"})


def facts(host: str, *addrs: str, pid: int | None = None) -> LocalFacts:
    return LocalFacts(host, frozenset(addrs), HERE, pid)


@pytest.mark.parametrize("mode", [True, False])
def test_an_explicit_setting_wins_whatever_runs_here(mode: bool) -> None:
    assert decide(mode, facts("localhost", "127.0.0.1", pid=42)) == (mode, f"--pin {str(mode).lower()}")
    assert decide(mode, None)[0] is mode  # nothing is looked up for an explicit setting


@pytest.mark.parametrize(("host", "addrs"), [
    ("localhost", ("127.0.0.1",)),
    ("localhost", ("::1",)),
    ("127.0.1.1", ("127.0.1.1",)),  # loopback but not listed among the interfaces
    ("myhost", ("192.0.2.2",)),  # this host's own name: one of its interface addresses
    ("rabbit", ("198.51.100.7", "192.0.2.2")),  # any address of the name being ours is enough
])
def test_auto_does_not_pin_when_the_broker_url_names_this_host(host: str, addrs: tuple[str, ...]) -> None:
    pin, why = decide(None, facts(host, *addrs))
    assert pin is False
    assert why.startswith("the broker runs on this host") and "--pin true" in why
    assert host in why


def test_auto_does_not_pin_next_to_a_local_rabbitmq_node() -> None:
    # the URL names another node, but a RabbitMQ node (beam.smp) runs here too
    pin, why = decide(None, facts("rabbit-2", "198.51.100.7", pid=4242))
    assert pin is False and "beam.smp, pid 4242" in why


@pytest.mark.parametrize("addrs", [("198.51.100.7",), ()])  # remote, or not resolvable right now
def test_auto_pins_when_the_broker_is_elsewhere(addrs: tuple[str, ...]) -> None:
    assert decide(None, facts("rabbit", *addrs)) == (True, "the broker (rabbit) is on another host")


def test_ipv6_scopes_are_dropped() -> None:
    assert _addr("fe80::1%eth0") == "fe80::1"
    assert _addr("192.0.2.2") == "192.0.2.2"


def test_local_facts_sees_loopback_as_this_host() -> None:
    f = local_facts("amqp://user:secret@127.0.0.1:5672/%2F")
    assert f.broker_host == "127.0.0.1" and f.broker_addrs == {"127.0.0.1"}
    assert "127.0.0.1" in f.local_addrs
    assert decide(None, f)[0] is False
