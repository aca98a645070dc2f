"""Unit tests of pool.cli that need no broker: every invalid input ends in one line and exit code 2."""

from __future__ import annotations

import logging
import os
from importlib.metadata import version
from pathlib import Path

import pytest

from pool.cli import main
from pool.supervisor import EXIT_CONFIG


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
        (["topology"], "controller"),
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
