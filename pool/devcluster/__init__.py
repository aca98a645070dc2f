"""A local 3-node RabbitMQ cluster for development, tests and benchmarks (the CLI: ``python -m pool.devcluster``).

Data flow: ``up`` writes the base directory (``/var/tmp/ctlpool-cluster`` or ``CTLPOOL_CLUSTER_DIR``,
owned by ``rabbitmq``): a config file per node (its AMQP listener on 127.0.0.1), an enabled-plugins
file naming only the consistent-hash plugin, an empty env file (so ``/etc/rabbitmq/rabbitmq-env.conf``,
which names the default node, is not read). The nodes that are down start detached, all at once,
through ``/usr/sbin/rabbitmq-server`` (Debian's wrapper switches to ``rabbitmq``) with ``node_env``:
own name, dist port, data, log and pid paths, one scheduler. ``up`` polls each with ``rabbitmqctl
eval`` until its app runs (``await_startup`` fails at once while a node is not yet in epmd), joins
c2 and c3 to c1 (stop_app, force_reset, join_cluster, start_app) unless both sides list each other
already, and enables the plugin where it does not run. The default broker on 5672 shares only epmd
and the Erlang cookie with these nodes: every command runs with ``HOME`` set to the ``rabbitmq``
user's home, so the nodes, ``rabbitmqctl`` (run as ``rabbitmq`` by the wrapper) and
``rabbitmq-plugins`` (run as root) read the same ``.erlang.cookie``. ``kill`` takes the pid from the
pid file when ``/proc/PID/environ`` names the node, else from ``eval os:getpid()``. Nodes are
numbered 1..3 everywhere (c1..c3, AMQP ports 5681..5683), in the CLI and ``LocalCluster`` alike.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from .nodes import NODE_COUNT, NODES, Node, resolve_node  # noqa: F401 - NODE_COUNT re-exported for the CLI


DEFAULT_DIR = "/var/tmp/ctlpool-cluster"
DIR_ENV = "CTLPOOL_CLUSTER_DIR"
ERL_ARGS_ENV = "CTLPOOL_CLUSTER_ERL_ARGS"
LIGHT_ERL_ARGS = "+S 1:1 +A 4"  # one scheduler per node: three nodes share a 2-core box
PLUGIN = "rabbitmq_consistent_hash_exchange"
SBIN = "/usr/sbin:/usr/lib/rabbitmq/bin:/usr/local/sbin"
INNER_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # what Debian's /usr/sbin wrapper runs via su
NET_TICKTIME_S = 10  # a silent peer node is down after 10 s (7.5-12.5), not the default 60 s (45-75)
NOFILE = 65536  # each node's file-descriptor limit (RabbitMQ's production advice), or the hard limit if lower
MARKER = ".ctlpool-devcluster"  # --wipe deletes only a directory holding this file
HEAL_WAIT_S = 30.0  # autoheal acts within a few seconds of the nodes seeing each other again; past this, heal by hand
START_TIMEOUT_S = 120.0  # three nodes booting at once took ~11 s here
CTL_TIMEOUT_S = 60.0
POLL_S = 0.25
STATE_EXPR = ("case rabbit:is_running() of true -> running; "
              "false -> case rabbit:is_booting() of true -> starting; false -> stopped end end.")
INSTALL_HINT = "rabbitmq-server is not installed; run: apt-get install -y rabbitmq-server"
T = TypeVar("T")


class ClusterError(RuntimeError):
    """A node did not start, stop, join or answer in time; the message says which and where to look."""


class MissingTool(ClusterError):
    """Something the tool needs is absent; the message is the one line to act on (exit 2)."""


def node_config(node: Node) -> str:
    """The node's rabbitmq.conf: its own AMQP port, on loopback only (the default broker's file says
    5672). A node cut off from the others (paused, partitioned) is noticed after ``NET_TICKTIME_S``;
    once it sees them again, autoheal restarts the losing side, so the partition heals itself
    (measured: pause_minority does not notice a node that was itself paused). README, Running on
    a RabbitMQ cluster, says why a real 3-node cluster wants the same."""
    return (f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n"
            f"net_ticktime = {NET_TICKTIME_S}\n"
            "cluster_partition_handling = autoheal\n")


def node_env(node: Node, base: Path, erl_args: str = LIGHT_ERL_ARGS, home: str = "/var/lib/rabbitmq") -> dict[str, str]:
    """The variables ``rabbitmq-server`` starts ``node`` with: nothing shared with the default node but epmd."""
    return {
        "HOME": home,  # the cookie: $HOME/.erlang.cookie
        "RABBITMQ_NODENAME": node.name,
        "RABBITMQ_DIST_PORT": str(node.dist_port),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(base / f"{node.short}.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / f"{node.short}.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": erl_args,
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without RABBITMQ_*/ERL_* settings from the caller's shell, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}, **extra}


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` is a process that is not a zombie (a killed beam waits a moment for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _as_rabbitmq_with_room() -> None:
    """In the node's process, before exec: file descriptors for many quorum queues, then the
    ``rabbitmq`` user. At 1024, RabbitMQ 3.10 stops answering AMQP handshakes (and list_queues
    hangs) near 300 queues (README, broker sizing): a few controllers' worth, which the chaos
    tests and the bench reach."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)  # a container may cap the hard one
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    user = _rabbitmq_user()
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def _tool(name: str) -> str:
    exe = shutil.which(name, path=SBIN) or shutil.which(name)
    if exe is None:
        raise MissingTool(INSTALL_HINT)
    return exe


def _rabbitmq_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("rabbitmq")
    except KeyError:
        raise MissingTool(INSTALL_HINT) from None


class LocalCluster:
    """The three nodes under ``base``. Methods take a node number 1..3 (or a name, see ``resolve_node``)."""

    def __init__(self, base: str | Path | None = None, erl_args: str | None = None) -> None:
        self.base = Path(base or os.environ.get(DIR_ENV) or DEFAULT_DIR)
        self.erl_args = erl_args or os.environ.get(ERL_ARGS_ENV) or LIGHT_ERL_ARGS
        self.nodes = NODES
        self.say: Callable[[str], None] = lambda line: None  # the CLI prints progress through this

    def node(self, i: int | str) -> Node:
        return NODES[resolve_node(i) - 1]

    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def url_list(self) -> str:
        """The value for CTLPOOL_AMQP_URL."""
        return ",".join(self.urls())

    def log_file(self, i: int | str) -> Path:
        return self.base / "log" / f"{self.node(i).name}.log"

    # ---- running the tools ----
    def preflight(self) -> None:
        """Raises MissingTool unless the tools, the rabbitmq user and root are all there."""
        for name in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-plugins"):
            _tool(name)
        _rabbitmq_user()
        if os.geteuid() != 0:
            raise MissingTool("nodes run as the rabbitmq user, which needs root; "
                              f"run: sudo {sys.executable} -m pool.devcluster up")

    def _run(self, tool: str, *args: str, timeout: float = CTL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        cmd = [_tool(tool), *args]
        # rabbitmq-plugins would read and write /etc/rabbitmq/enabled_plugins (the default node's) without it
        env = {"HOME": _rabbitmq_user().pw_dir, "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins")}
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_environ(env))
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{' '.join(cmd)}: no answer in {timeout:.0f} s") from None

    def ctl(self, i: int | str, *args: str, timeout: float = CTL_TIMEOUT_S) -> str:
        """``rabbitmqctl -n NODE -q args``'s stdout; raises ClusterError when it fails."""
        node = self.node(i)
        r = self._run("rabbitmqctl", "-n", node.name, "-q", *args, timeout=timeout)
        if r.returncode != 0:
            why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[0]
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {why}")
        return r.stdout.strip()

    def _each(self, fn: Callable[[int], T], numbers: list[int] | None = None) -> list[T]:
        """``fn`` of each node number, all at once (each rabbitmqctl call is a 0.3 s Erlang VM start)."""
        nums = [n.number for n in self.nodes] if numbers is None else numbers
        with ThreadPoolExecutor(max_workers=len(nums) or 1) as pool:
            return list(pool.map(fn, nums))

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float, hint: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise ClusterError(f"{what}: not done after {timeout:.0f} s{hint}")
            time.sleep(POLL_S)

    # ---- what runs ----
    def state(self, i: int | str) -> str:
        """``running``; ``starting`` (booting); ``stopped`` (the Erlang node answers, its app is stopped); ``down``."""
        try:
            return self.ctl(i, "eval", STATE_EXPR, timeout=15)
        except ClusterError:
            return "down"

    def is_running(self, i: int | str) -> bool:
        return self.state(i) == "running"

    def wait_running(self, i: int | str, timeout: float = START_TIMEOUT_S) -> None:
        """Polls until the node's app runs; fails at once when its beam process died while booting."""
        node, hint = self.node(i), f"; see {self.log_file(i)}"

        def ready() -> bool:
            if self.is_running(node.number):
                return True
            pid = self._read_pid(node)
            if pid is not None and not _pid_alive(pid):
                raise ClusterError(f"{node.name} exited while starting{hint}")
            return False

        self._wait(f"{node.name} running", ready, timeout, hint)

    def members(self, i: int | str) -> tuple[set[str], set[str]]:
        """(cluster members, running members) as node ``i`` sees them."""
        status = json.loads(self.ctl(i, "cluster_status", "--formatter", "json"))
        return set(status["disk_nodes"]) | set(status.get("ram_nodes", [])), set(status["running_nodes"])

    def in_cluster(self, i: int | str) -> bool:
        """Node ``i`` runs and sees, running, every other node that runs."""
        states = dict(zip((n.name for n in self.nodes), self._each(self.state)))
        if states[self.node(i).name] != "running":
            return False
        running = self.members(i)[1]
        return all(name in running for name, s in states.items() if s == "running")

    def plugin_running(self, i: int | str) -> bool:
        """Whether the plugin runs on node ``i`` (``rabbitmq-plugins list`` says so too, in 1.4 s instead of 0.3)."""
        try:
            return self.ctl(i, "eval", f"lists:member({PLUGIN}, rabbit_plugins:active()).", timeout=15) == "true"
        except ClusterError:
            return False

    def queues(self, vhost: str = "/") -> list[dict[str, object]]:
        """``list_queues name type state leader members online`` (JSON) from the first node that runs.

        On 3.10.8 ``leader`` is a node name and ``members``/``online`` lists of them for quorum queues;
        a classic queue has "" in all three (and type ``rabbit_classic_queue`` while its node is down)."""
        first = next((n.number for n in self.nodes if self.is_running(n.number)), None)
        if first is None:
            raise ClusterError("no node of the cluster runs")
        columns = ("name", "type", "state", "leader", "members", "online")
        return json.loads(self.ctl(first, "list_queues", "-p", vhost, *columns, "--formatter", "json") or "[]")

    def connections(self) -> list[tuple[int, str]]:
        """(node number, client-given connection name) of every AMQP connection to the cluster."""
        first = next((n.number for n in self.nodes if self.is_running(n.number)), None)
        if first is None:
            raise ClusterError("no node of the cluster runs")
        rows = json.loads(self.ctl(first, "list_connections", "port", "client_properties", "--formatter", "json")
                          or "[]")
        out = []
        for r in rows:
            props = r["client_properties"]  # a JSON object, or [[key, type, value], ...]
            props = dict(props) if isinstance(props, dict) else {p[0]: p[2] for p in props}
            node = next((n.number for n in self.nodes if n.amqp_port == int(r["port"])), None)
            if node is not None:
                out.append((node, str(props.get("connection_name", ""))))
        return out

    def leaders(self, vhost: str = "/") -> dict[str, str]:
        """Quorum queue name -> the node its leader runs on (classic queues have no leader to show)."""
        from ..replicas import parse

        return {q: r.leader for q, r in parse(self.queues(vhost)).items() if r.leader}

    def _read_pid(self, node: Node) -> int | None:
        try:
            return int((self.base / f"{node.short}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def os_pid(self, i: int | str) -> int | None:
        """The beam.smp pid of a running node: its pid file's if /proc says that pid is this node, else os:getpid()."""
        node = self.node(i)
        pid, mark = self._read_pid(node), f"RABBITMQ_NODENAME={node.name}\0".encode()
        try:
            if pid and _pid_alive(pid) and mark in Path(f"/proc/{pid}/environ").read_bytes():
                return pid
        except OSError:
            pass
        try:
            return int(self.ctl(i, "eval", "os:getpid().", timeout=15).strip('"'))
        except (ClusterError, ValueError):
            return None

    # ---- one node ----
    def _prepare(self) -> None:
        user = _rabbitmq_user()
        files = {"rabbitmq-env.conf": "# the nodes of ctlpool's dev cluster read no /etc/rabbitmq/rabbitmq-env.conf\n",
                 MARKER: "made by python -m pool.devcluster; `down --wipe` deletes this directory\n",
                 **{f"{n.short}.conf": node_config(n) for n in self.nodes}}
        if not (self.base / "enabled_plugins").exists():  # rabbitmq-plugins may have added to it since
            files["enabled_plugins"] = f"[{PLUGIN}].\n"
        for d in (self.base, self.base / "mnesia", self.base / "log"):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        for name, text in files.items():
            (self.base / name).write_text(text)
            os.chown(self.base / name, user.pw_uid, user.pw_gid)

    def _launch(self, node: Node) -> None:
        for port in (node.amqp_port, node.dist_port):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise ClusterError(f"{node.name}: port {port} is taken; see: ss -ltnp 'sport = :{port}'")
        (self.base / f"{node.short}.pid").unlink(missing_ok=True)  # a killed node's pid: not 'died while booting'
        self.say(f"{node.name}: starting")
        env = clean_environ(node_env(node, self.base, self.erl_args, _rabbitmq_user().pw_dir))
        with open(self.base / "log" / f"{node.short}.start.log", "ab") as log:  # not a pipe: the beam keeps it
            # the server script itself, as rabbitmq: Debian's wrapper switches user with su, whose
            # PAM limits would put the file-descriptor limit back to 1024
            r = subprocess.run([INNER_SERVER, "-detached"], stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log, start_new_session=True, timeout=CTL_TIMEOUT_S, env=env,
                               preexec_fn=_as_rabbitmq_with_room)
        if r.returncode != 0:
            raise ClusterError(f"{node.name}: rabbitmq-server exited {r.returncode}; see {log.name}")

    def start(self, i: int | str, timeout: float = START_TIMEOUT_S) -> None:
        """Starts node ``i`` (its process when down, its app when stopped) and waits until it runs."""
        node, state = self.node(i), self.state(i)
        if state == "down":
            self._prepare()
            self._launch(node)
        elif state == "stopped":
            self.ctl(node.number, "start_app", timeout=timeout)
        self.wait_running(node.number, timeout)

    def stop_app(self, i: int | str) -> None:
        self.ctl(i, "stop_app")

    def start_app(self, i: int | str, timeout: float = START_TIMEOUT_S) -> None:
        self.ctl(i, "start_app", timeout=timeout)
        self.wait_running(i, timeout)

    def kill(self, i: int | str, timeout: float = 15.0) -> int:
        """SIGKILLs node ``i``'s beam.smp and waits until it is gone; returns the pid killed."""
        node, pid = self.node(i), self.os_pid(i)
        if pid is None:
            raise ClusterError(f"{node.name} does not run: nothing to kill")
        os.kill(pid, signal.SIGKILL)
        self._wait(f"{node.name} (pid {pid}) gone", lambda: not _pid_alive(pid) and self.state(i) == "down", timeout)
        return pid

    def freeze(self, i: int | str, frozen: bool = True) -> int:
        """SIGSTOPs node ``i``'s beam.smp (a paused VM: its sockets stay open, nothing answers), or
        SIGCONTs it (``frozen=False``); asks the node nothing. Returns the pid, 0 if none lives."""
        pid = self.os_pid(i) if frozen else self._read_pid(self.node(i))
        if pid is None or not _pid_alive(pid):
            return 0
        os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)
        return pid

    def stop(self, i: int | str, timeout: float = CTL_TIMEOUT_S) -> None:
        """Stops node ``i`` gracefully (``rabbitmqctl stop``) and waits until its process is gone."""
        node = self.node(i)
        if self.state(i) == "down":
            return
        pid = self.os_pid(i)
        self.say(f"{node.name}: stopping")
        self.ctl(i, "stop", timeout=timeout)
        self._wait(f"{node.name} stopped", lambda: self.state(i) == "down" and not (pid and _pid_alive(pid)), timeout)

    def restart(self, i: int | str, timeout: float = START_TIMEOUT_S) -> None:
        """Stops node ``i`` if it runs, starts it, and waits until it runs and is back in the cluster."""
        if self.state(i) != "down":
            try:
                self.stop(i)
            except ClusterError as exc:  # a node too busy to answer its stop: kill it
                self.say(f"{self.node(i).name}: {exc}; killing it")
                self.kill(i)
        self.start(i, timeout)
        self._wait(f"{self.node(i).name} back in the cluster", lambda: self.in_cluster(i), timeout)

    # ---- the cluster ----
    def _join(self, node: Node, first_members: set[str]) -> None:
        first = self.nodes[0]
        self.say(f"{node.name}: joining {first.name}")
        self.ctl(node.number, "stop_app")
        self.ctl(node.number, "force_reset")  # reset would ask its old peers to forget it; they may not know it
        if node.name in first_members:  # c1 remembers a node whose data was wiped
            self.ctl(first.number, "forget_cluster_node", node.name)
        self.ctl(node.number, "join_cluster", first.name, timeout=START_TIMEOUT_S)
        self.start_app(node.number)

    def up(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Starts what is down, joins what is apart, enables the plugin where it is off. False: nothing to do."""
        self.preflight()
        self._prepare()
        self._each(lambda n: self.freeze(n, frozen=False))  # one left frozen (a test cut short) answers nothing
        states = self._each(self.state)
        for node, state in zip(self.nodes, states):
            if state == "down":
                self._launch(node)  # all at once: a node that was clustered waits for its peers while it boots
            elif state == "stopped":
                self.say(f"{node.name}: starting its app")
                self.ctl(node.number, "start_app", timeout=timeout)
        waiting = [n.number for n, s in zip(self.nodes, states) if s != "running"]
        self._each(lambda n: self.wait_running(n, timeout), waiting)
        changed = bool(waiting)
        views = self._each(self.members)  # (members, running) as each node sees them
        first, everyone = self.nodes[0], {n.name for n in self.nodes}
        for node, (members, _) in zip(self.nodes[1:], views[1:]):
            if first.name not in members or node.name not in views[0][0]:
                self._join(node, views[0][0])
                changed = True
        for node, ok in zip(self.nodes, self._each(self.plugin_running)):
            if not ok:
                self.say(f"{node.name}: enabling {PLUGIN}")
                self._run("rabbitmq-plugins", "-n", node.name, "enable", PLUGIN)
                if not self.plugin_running(node.number):
                    raise ClusterError(f"{node.name}: {PLUGIN} does not run; see {self.log_file(node.number)}")
                changed = True
        if changed or views[0][1] != everyone:
            try:
                self._wait("all nodes running in one cluster", lambda: self.members(1)[1] == everyone,
                           min(timeout, HEAL_WAIT_S))
            except ClusterError:
                self._heal(timeout)
                changed = True
        return changed

    def _heal(self, timeout: float) -> None:
        """A partition autoheal left in place (seen after a frozen node's thaw): restart the nodes
        that see fewer running peers than the largest side does, then wait for one cluster."""
        views = self._each(self.members)
        largest = max(len(running) for _members, running in views)
        for node, (_members, running) in zip(self.nodes, views):
            if len(running) < largest:
                self.say(f"{node.name}: sees {len(running)} of {len(self.nodes)} nodes running (a partition "
                         "autoheal did not heal); restarting it")
                self.restart(node.number, timeout)
        everyone = {n.name for n in self.nodes}
        self._wait("all nodes running in one cluster", lambda: self.members(1)[1] == everyone, timeout)

    def down(self, wipe: bool = False) -> None:
        """Stops every node; ``wipe`` then deletes the base directory (only one this tool made)."""
        self.preflight()
        self._each(self.stop)
        if wipe and self.base.exists():
            if not (self.base / MARKER).exists():
                raise ClusterError(f"{self.base} has no {MARKER}: not a directory this tool made, not deleting it")
            shutil.rmtree(self.base)
            self.say(f"deleted {self.base}")

    def status_lines(self, states: list[str] | None = None) -> list[str]:
        states = states or self._each(self.state)
        return [f"{n.name:<22} {n.url}  {s}" for n, s in zip(self.nodes, states)]
