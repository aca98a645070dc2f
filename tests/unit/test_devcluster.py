"""``pool.devcluster`` without a broker: node names, ports, the nodes' environment, argument parsing,
and the one line (exit 2) when something the tool needs is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pool import devcluster
from pool.devcluster import NODES, LocalCluster, node_config, node_env, resolve_node
from pool.devcluster.__main__ import main, parse_args
from pool.settings import split_urls

DEFAULT_BROKER_PORTS = {5672, 25672, 15672, 4369}  # AMQP, dist, management, epmd of rabbit@localhost


@pytest.mark.parametrize("text", ["2", 2, "c2", "ctlpool-c2", "ctlpool-c2@localhost", " 2 "])
def test_a_node_is_named_by_number_short_name_or_full_name(text: str | int) -> None:
    assert resolve_node(text) == 2


@pytest.mark.parametrize("text", ["0", "4", "c4", "rabbit@localhost", "ctlpool-c2@vm", "", "two"])
def test_anything_else_is_no_node(text: str) -> None:
    with pytest.raises(ValueError, match="no such node"):
        resolve_node(text)


def test_three_nodes_with_their_own_ports_none_of_the_default_brokers() -> None:
    # Given the nodes
    names = [n.name for n in NODES]
    ports = [p for n in NODES for p in (n.amqp_port, n.dist_port)]
    # Then they are c1..c3 on localhost, AMQP on 5681..5683, and no port repeats or clashes with rabbit@localhost
    assert names == ["ctlpool-c1@localhost", "ctlpool-c2@localhost", "ctlpool-c3@localhost"]
    assert [n.amqp_port for n in NODES] == [5681, 5682, 5683]
    assert len(set(ports)) == len(ports) and not set(ports) & DEFAULT_BROKER_PORTS
    assert NODES[1].url == "amqp://guest:guest@127.0.0.1:5682/%2F"


def test_the_url_list_is_what_ctlpool_reads_as_a_cluster(tmp_path: Path) -> None:
    # Given a cluster
    cluster = LocalCluster(tmp_path)
    # When its URL list is split the way CTLPOOL_AMQP_URL is
    # Then it gives one URL per node, in node order
    assert split_urls(cluster.url_list()) == cluster.urls() == [n.url for n in NODES]


def test_the_environment_keeps_every_file_under_the_base_dir(tmp_path: Path) -> None:
    # Given node 3's environment
    env = node_env(NODES[2], tmp_path, "+S 1:1", home="/var/lib/rabbitmq")
    # Then it names the node, its dist port, one scheduler and the rabbitmq user's home (the cookie's dir)
    assert env["RABBITMQ_NODENAME"] == "ctlpool-c3@localhost"
    assert env["RABBITMQ_DIST_PORT"] == "25683"
    assert env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] == "+S 1:1"
    assert env["HOME"] == "/var/lib/rabbitmq"
    # and every file and directory it names is under the base dir, none in /etc/rabbitmq (the default node's)
    paths = {k: v for k, v in env.items() if k.startswith("RABBITMQ_") and v.startswith("/")}
    assert set(paths) == {"RABBITMQ_CONF_ENV_FILE", "RABBITMQ_CONFIG_FILE", "RABBITMQ_ENABLED_PLUGINS_FILE",
                          "RABBITMQ_MNESIA_BASE", "RABBITMQ_LOG_BASE", "RABBITMQ_PID_FILE"}
    assert all(Path(v).is_relative_to(tmp_path) for v in paths.values())
    assert env["RABBITMQ_PID_FILE"] != node_env(NODES[0], tmp_path)["RABBITMQ_PID_FILE"]


def test_each_node_listens_on_loopback_on_its_own_port() -> None:
    assert node_config(NODES[0]).splitlines() == ["listeners.tcp.local = 127.0.0.1:5681", "net_ticktime = 10",
                                                  "cluster_partition_handling = autoheal"]


def test_the_callers_rabbitmq_settings_do_not_leak_into_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a shell that sets a node name and Erlang flags of its own
    monkeypatch.setenv("RABBITMQ_NODENAME", "rabbit@localhost")
    monkeypatch.setenv("ERL_FLAGS", "+S 8")
    monkeypatch.setenv("PATH", "/usr/bin")
    # When a node's environment is built
    env = devcluster.clean_environ({"RABBITMQ_NODENAME": "ctlpool-c1@localhost"})
    # Then only ours is there, and the rest of the environment is kept
    assert env["RABBITMQ_NODENAME"] == "ctlpool-c1@localhost" and "ERL_FLAGS" not in env and env["PATH"] == "/usr/bin"


def test_the_base_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(devcluster.DIR_ENV, raising=False)
    assert LocalCluster().base == Path(devcluster.DEFAULT_DIR)
    monkeypatch.setenv(devcluster.DIR_ENV, str(tmp_path))
    assert LocalCluster().base == tmp_path
    assert LocalCluster("/elsewhere").base == Path("/elsewhere")


@pytest.mark.parametrize("argv, command, node", [(["up"], "up", None), (["status"], "status", None),
                                                 (["kill", "c2"], "kill", 2), (["stop-app", "3"], "stop-app", 3),
                                                 (["freeze", "2"], "freeze", 2), (["thaw", "c2"], "thaw", 2),
                                                 (["start-app", "ctlpool-c1@localhost"], "start-app", 1),
                                                 (["restart", "ctlpool-c3"], "restart", 3)])
def test_commands_parse(argv: list[str], command: str, node: int | None) -> None:
    args = parse_args(argv)
    assert args.command == command and getattr(args, "node", None) == node


def test_down_wipes_only_when_asked() -> None:
    assert parse_args(["down"]).wipe is False and parse_args(["down", "--wipe"]).wipe is True


@pytest.mark.parametrize("argv", [[], ["kill"], ["kill", "4"], ["restart", "rabbit@localhost"], ["explode"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_bad_node_is_named_in_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["kill", "9"])
    assert "no such node '9': give 1..3" in capsys.readouterr().err


def test_no_rabbitmq_server_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Given a machine as root without RabbitMQ
    monkeypatch.setattr(devcluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(devcluster.shutil, "which", lambda *a, **k: None)
    # When the tool runs
    code = main(["up"])
    # Then it exits 2 with one line saying what to run
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run: apt-get install -y rabbitmq-server" in err


def test_not_root_and_no_sudo_is_one_line_naming_sudo(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Given RabbitMQ installed, but a user who is not root and has no sudo
    monkeypatch.setattr(devcluster.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(devcluster.shutil, "which", lambda name, **k: None if name == "sudo" else f"/usr/sbin/{name}")
    monkeypatch.setattr(devcluster, "_rabbitmq_user", lambda: None)
    # When the tool runs
    code = main(["status"])
    # Then it exits 2 with one line: the same command through sudo
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"run: sudo {sys.executable} -m pool.devcluster up" in err


def test_a_zombie_is_not_alive() -> None:
    # Given a child that has exited but is not reaped yet (as a killed beam is until init reaps it)
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    # Then it does not count as alive, this process does, and a reaped pid does not
    assert not devcluster._pid_alive(child.pid)
    assert devcluster._pid_alive(os.getpid())
    child.wait()
    assert not devcluster._pid_alive(child.pid)
