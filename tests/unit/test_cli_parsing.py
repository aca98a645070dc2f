"""Unit tests of pool.cli that need no broker: every invalid input ends in one line and exit code 2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pool.cli import main
from pool.exits import EXIT_CONFIG
from pool.text import escape
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CTLPOOL_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("CTLPOOL_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging():
    """``ctlpool run`` configures the root logger before loading controllers; undo it."""
    root, pika = logging.getLogger(), logging.getLogger("pika")
    saved = (root.handlers[:], root.level, pika.level)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    pika.setLevel(saved[2])


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of ``ctlpool argv``, whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "--prefetch", "abc"], "--prefetch"),
        (["run", "--controllers", "x:Y", "--workers", "0"], "--workers"),
        (["run", "--controllers", "x:Y", "--queue-type", "stream"], "--queue-type"),
        (["run", "--controllers", "x:Y", "--tiers-s", "16,4"], "--tiers-s"),
        (["run", "--controllers", "x:Y", "--amqp-url", "http://h/"], "--amqp-url"),
        (["run", "--controllers", "no-colon"], "--controllers"),
        (["publish", "deployments", "web", "--partitions", "4"], "--partitions"),
        (["topology", "deployments", "--partitions", "-1"], "--partitions"),
        (["doctor", "--prefix", "a/b"], "--prefix"),
    ],
)
def test_bad_flag_value_is_one_line_and_exit_2(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a command line with one bad flag value (no broker is needed to notice)
    # When ctlpool runs it
    code, out, err = run_cli(argv, capsys)
    # Then it exits 2 with one line on stderr naming the flag, and prints nothing else
    assert code == EXIT_CONFIG == 2
    assert flag in one_line(err)
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--prefetch"], "--prefetch"),
        (["run", "--no-such-flag"], "--no-such-flag"),
        (["bogus-command"], "bogus-command"),
        ([], "COMMAND"),
        (["publish"], "controller"),
        (["topology"], "CONTROLLER"),
        (["publish", "deployments", "web", "--workers", "2"], "--workers"),
        (["demo", "--replicas", "three"], "--replicas"),
    ],
)
def test_argparse_errors_are_one_line_and_exit_2(argv: list[str], needle: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Given a command line argparse itself refuses
    # When ctlpool runs it
    code, out, err = run_cli(argv, capsys)
    # Then it exits 2 with one line naming what is wrong (no usage dump)
    assert code == 2
    line = one_line(err)
    assert line.startswith("ctlpool")
    assert "error:" in line and needle in line
    assert out == ""


def test_bad_env_value_is_one_line_naming_flag_and_variable(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Given a bad value in the environment
    monkeypatch.setenv("CTLPOOL_PREFETCH", "lots")
    # When ctlpool run starts
    code, _, err = run_cli(["run", "--controllers", "x:Y"], capsys)
    # Then it exits 2 naming both the flag and the variable
    assert code == 2
    line = one_line(err)
    assert "--prefetch" in line and "CTLPOOL_PREFETCH" in line


def test_bad_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a config file with an unknown key
    config = tmp_path / "ctlpool.toml"
    config.write_text("prefech = 10\n")
    # When ctlpool run reads it
    code, _, err = run_cli(["run", "--config", str(config)], capsys)
    # Then it exits 2 naming --config and the key
    assert code == 2
    line = one_line(err)
    assert "--config" in line and "prefech" in line


def test_missing_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a config path with no file
    # When ctlpool run reads it
    code, _, err = run_cli(["run", "--config", str(tmp_path / "absent.toml")], capsys)
    # Then it exits 2 naming --config
    assert code == 2
    assert "--config" in one_line(err)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the installed package
    # When asked for --version
    code, out, err = run_cli(["--version"], capsys)
    # Then it prints the package version and exits 0
    assert code == 0
    assert out.strip() == f"ctlpool {version('ctlpool')}"
    assert err == ""


def test_run_without_controllers(capsys: pytest.CaptureFixture[str]) -> None:
    # Given no --controllers and no CTLPOOL_CONTROLLERS
    # When ctlpool run starts
    code, _, err = run_cli(["run"], capsys)
    # Then it exits 2 saying how to name them
    assert code == 2
    line = one_line(err)
    assert "--controllers" in line and "CTLPOOL_CONTROLLERS" in line


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("nosuchmod:X", "cannot import 'nosuchmod'"),
        ("os:path", "is not a Controller subclass"),
        ("pool.controller:NoSuchClass", "is not a Controller subclass"),
        ("pool.controller:Controller", "needs a class attribute name"),
    ],
)
def test_unloadable_controller_is_one_line(ref: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a controller reference that cannot be loaded
    # When ctlpool run starts
    code, _, err = run_cli(["run", "--controllers", ref, "--log-format", "text"], capsys)
    # Then it exits 2 before touching the broker, one line saying what is wrong
    assert code == 2
    line = one_line(err)
    assert line.startswith("ctlpool: error: --controllers: ")
    assert needle in line


def test_publish_with_invalid_json_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Given an event body that is not JSON
    # When ctlpool publish is asked to send it
    code, _, err = run_cli(["publish", "deployments", "web", "{not json"], capsys)
    # Then it exits 2 before connecting, naming the JSON argument
    assert code == 2
    assert "JSON argument" in one_line(err)


def test_publish_without_key_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Given publish without a key and without --batch
    # When ctlpool publish runs
    code, _, err = run_cli(["publish", "deployments"], capsys)
    # Then it exits 2 saying the key is required
    assert code == 2
    assert "KEY is required" in one_line(err)


def test_a_bad_url_in_the_environment_is_not_echoed(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Given a broker URL with a password and a broken port
    monkeypatch.setenv("CTLPOOL_AMQP_URL", "amqp://svc:hunter2@rabbit:56x72/")
    # When ctlpool run starts
    code, out, err = run_cli(["run", "--controllers", "x:Y"], capsys)
    # Then it exits 2 naming the variable, and the password appears nowhere
    assert code == 2
    assert "CTLPOOL_AMQP_URL" in one_line(err)
    assert "hunter2" not in err + out


# ---- the same promise, as an operator meets it: a subprocess, one line, exit 2, nothing leaked ----

DEAD_URL = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there: a command that connects fails fast (69)


def ctlpool(*args: str, path: tuple[Path, ...] = (), env: dict[str, str | None] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    """``python -m pool.cli ARGS`` with no CTLPOOL_* of the developer's (``env`` None values unset one);
    ``path`` joins PYTHONPATH."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTLPOOL_")}
    merged = {**clean, "CTLPOOL_AMQP_URL": DEAD_URL,
              "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, path)]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pool.cli", *args], cwd=ROOT, capture_output=True, timeout=60,
                          env={k: v for k, v in merged.items() if v is not None}, stdin=subprocess.DEVNULL)


def refused(r: subprocess.CompletedProcess[bytes], *needles: str, secret: str | None = None) -> str:
    """Assert: exit 2, one line on stderr, no traceback, nothing a terminal would act on; the line."""
    err = r.stderr.decode("utf-8", "surrogateescape")
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert escape(lines[0]) == lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    if secret is not None:
        assert secret.encode() not in r.stderr + r.stdout
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["run", "--controllers", "x:Y", "--prefetch", "70000"], ["--prefetch", "65535", "70000"]),
        (["run", "--controllers", "x:Y", "--heartbeat-s", "70000"], ["--heartbeat-s", "65535", "70000"]),
        (["status", "--heartbeat-s", "65536"], ["--heartbeat-s", "65535"]),
        (["status", "--listen-s", "nan"], ["--listen-s", "nan"]),
        (["status", "--listen-s", "-1"], ["--listen-s"]),
        (["demo", "--timeout-s", "nan"], ["--timeout-s", "nan"]),
        (["run", "--controllers", "x:Y", "--member-timeout-s", "0.001"], ["--member-timeout-s", "--heartbeat-interval-s"]),
        (["run", "--controllers", "x:Y", "--max-deliveries", "11"], ["--max-deliveries", "10", "20"]),
        (["run", "--controllers", "x:Y", "--concurrency", "10001"], ["--concurrency"]),
        (["run", "--controllers", "x:Y", "--drain-timeout-s", "1e300"], ["--drain-timeout-s"]),
        (["run", "--controllers", "x:Y", "--reconcile-timeout-s", "1e300"], ["--reconcile-timeout-s"]),
        (["publish", "web", "k" * 256], ["KEY", "256 bytes", "255"]),
        (["publish", "web", "é" * 128], ["KEY", "256 bytes"]),  # 128 characters, 256 bytes
        (["publish", "web", os.fsdecode(b"\xff\xfe")], ["KEY", "not valid UTF-8"]),  # not UTF-8 on the command line
        (["publish", "w" * 252, "key"], ["CONTROLLER", "256 bytes"]),  # ctl.www…: the exchange name
        (["run", "\x1b[2J\u202e"], ["unrecognized arguments", "\\x1b[2J\\u202e"]),
    ],
)
def test_out_of_range_input_is_one_line_and_exit_2(argv: list[str], needles: list[str]) -> None:
    # Given a command line with one value the broker or the pool cannot take
    # When ctlpool runs it as a process
    r = ctlpool(*argv)
    # Then it exits 2 before connecting, with one escaped line naming what is wrong
    refused(r, *needles)
    assert r.stdout == b""


CONTROLLER_SOURCES = {
    "name_is_int": ("from pool import Controller\nclass C(Controller):\n    name = 5\n", "needs a class attribute name"),
    "init_raises": ("from pool import Controller\nclass C(Controller):\n    name = 'ok'\n    def __init__(self):\n"
                    "        raise RuntimeError('db down\\n\\x1b[31mred')\n", "RuntimeError: db down\\n\\x1b[31mred"),
    "import_raises": ("raise KeyError('HOME')\n", "importing"),
    "syntax_error": ("def broken(:\n", "SyntaxError"),
}


@pytest.mark.parametrize("case", sorted(CONTROLLER_SOURCES))
def test_a_controller_that_cannot_load_stops_run_in_one_line(case: str, tmp_path: Path) -> None:
    # Given a controller module that breaks on import, on its name or in __init__
    source, needle = CONTROLLER_SOURCES[case]
    (tmp_path / f"{case}.py").write_text(source)
    # When ctlpool run is asked to run it
    r = ctlpool("run", "--controllers", f"{case}:C", "--log-format", "text", path=(tmp_path,))
    # Then it exits 2 with one line, no traceback, before touching the broker
    line = refused(r, "--controllers", needle)
    assert line.startswith("ctlpool: error: --controllers: ")


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("amqp://svc:hun/ter2@rabbit/", "ter2"),
        ("amqp://svc:hun?ter2@rabbit/", "ter2"),
        ("amqp://svc:12/hunter2@rabbit/", "hunter2"),  # urlsplit alone would see host "svc", port 12
        ("amqp://svc:pw@node1,amqp://svc:hunter2@node2:99999/", "hunter2"),
    ],
)
@pytest.mark.parametrize("command", [["run", "--controllers", "x:Y"], ["doctor"]])
def test_a_url_that_cannot_be_used_safely_is_refused_without_its_password(url: str, secret: str,
                                                                           command: list[str]) -> None:
    # Given a broker URL whose password holds an unencoded / or ?, or a list whose second node is broken
    # When ctlpool starts with it in the environment
    r = ctlpool(*command, env={"CTLPOOL_AMQP_URL": url})
    # Then it exits 2 in one line naming the variable, and the password is printed nowhere
    refused(r, "CTLPOOL_AMQP_URL", secret=secret)


def test_amqp_url_file_others_can_read_is_used_with_one_warning(tmp_path: Path) -> None:
    # Given a URL file that others may read
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqp://svc:hunter2@127.0.0.1:1/%2F\n")
    os.chmod(url_file, 0o644)
    # When ctlpool run reads it (and then stops at a controller that does not exist)
    r = ctlpool("run", "--amqp-url-file", str(url_file), "--controllers", "nosuchmod:X",
                env={"CTLPOOL_AMQP_URL": None})
    # Then the URL was accepted: a warning line names the file and chmod 600, then the controller error follows
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err
    warning, error = err.splitlines()
    assert str(url_file) in warning and f"chmod 600 {url_file}" in warning
    assert "nosuchmod" in error
    assert "hunter2" not in err
