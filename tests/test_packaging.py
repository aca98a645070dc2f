"""Packaging for operators: the systemd unit, its env file, and the wheel the Docker image installs.

No Docker engine runs in CI, so the image's build stage is reproduced: the files its COPY lines
name are copied out, a wheel is built from them and installed into a fresh virtual environment,
and the ``ctlpool`` it installs is run from there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pool.settings import OPTIONS, WorkerSettings, env_name
from pool.supervisor import KILL_GRACE_S

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ctlpool.service"
ENV_EXAMPLE = ROOT / "systemd" / "ctlpool.env.example"
DOCKERFILE = ROOT / "Dockerfile"
EXEC_BINARY = "/opt/ctlpool/venv/bin/ctlpool"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", value):
        total += float(number) * units[unit or "s"]
    return total


@pytest.mark.timeout(60)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # Given the unit, with its ExecStart binary pointed at a stand-in (no venv in /opt here)
    fake = tmp_path / "ctlpool"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit = tmp_path / "ctlpool.service"
    text = UNIT.read_text()
    assert EXEC_BINARY in text
    unit.write_text(text.replace(EXEC_BINARY, str(fake)))
    # When systemd checks it
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Then it finds nothing to complain about
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_unit_drains_notifies_and_runs_unprivileged() -> None:
    # Given the unit's settings
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    # Then systemd waits for READY=1 from the supervisor alone, and feeds its watchdog
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert seconds(one["WatchdogSec"]) >= 10, "the supervisor pings every WatchdogSec/2; a worker is hung after 10 s"
    # and stopping signals the supervisor only, giving the drain time to finish before SIGKILL
    assert one["KillMode"] == "mixed" and one["KillSignal"] == "SIGTERM"
    assert seconds(one["TimeoutStopSec"]) > WorkerSettings().drain_timeout_s + KILL_GRACE_S
    assert one["Restart"] == "on-failure" and one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # and the password comes from a credential file, never the command line or the env file
    assert one["LoadCredential"].startswith("amqp-url:")
    assert "--amqp-url-file ${CREDENTIALS_DIRECTORY}/amqp-url" in one["ExecStart"]
    assert one["ExecStart"].startswith(EXEC_BINARY + " run")
    # and it runs as its own user with the usual hardening
    assert one["User"] == "ctlpool" and one["EnvironmentFile"] == "/etc/ctlpool/ctlpool.env"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
                       "CapabilityBoundingSet": "", "LimitNOFILE": "65536",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert one[key] == value, key
    assert "@system-service" in s["SystemCallFilter"]
    assert "sched_setaffinity" in s["SystemCallFilter"], "workers pin themselves to CPUs"


def test_env_example_names_only_real_settings() -> None:
    # Given every CTLPOOL_* variable the example env file mentions (set or commented out)
    names = set(re.findall(r"\b(CTLPOOL_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text()))
    # Then each is a setting of `ctlpool run` (or the example store's URL), so none is silently ignored
    known = {env_name(o) for o in OPTIONS} | {"CTLPOOL_STORE"}
    assert names and names <= known, names - known
    # and the password is not among them
    assert "CTLPOOL_AMQP_URL=" not in ENV_EXAMPLE.read_text()


def build_stage_sources() -> list[str]:
    """What the Dockerfile's build stage COPYs from the context."""
    build = DOCKERFILE.read_text().split("\nFROM ")[1]
    sources: list[str] = []
    for line in build.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--"):
            sources += parts[1:-1]
    return sources


@pytest.mark.timeout(120)
def test_the_wheel_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    # Given the files the image's build stage copies, and nothing else
    src = tmp_path / "src"
    src.mkdir()
    sources = build_stage_sources()
    assert set(sources) == {"pyproject.toml", "README.md", "pool", "controllers"}
    allowed = ROOT.joinpath(".dockerignore").read_text().splitlines()
    for name in sources:
        assert f"!{name}" in allowed or f"!{name}/" in allowed, f".dockerignore keeps {name} out of the context"
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # When a wheel is built from them and installed, with its dependencies, into a fresh venv
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "wheels"), str(src)], check=True, timeout=90)
    wheels = list((tmp_path / "wheels").glob("ctlpool-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", str(wheels[0])], check=True, timeout=90)
    away = tmp_path / "elsewhere"  # not the source tree: imports must come from the venv
    away.mkdir()

    def run(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=away, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    # Then the installed command answers, from the venv
    version = re.search(r'^version = "([^"]+)"', ROOT.joinpath("pyproject.toml").read_text(), re.M)
    assert version is not None
    assert run(str(venv / "bin" / "ctlpool"), "--version").strip() == f"ctlpool {version.group(1)}"
    help_text = run(str(venv / "bin" / "ctlpool"), "run", "--help")
    for flag in ("--controllers", "--amqp-url-file", "--metrics-port", "--tls-ca-file", "--drain-timeout-s"):
        assert flag in help_text
    where = run(str(python), "-c", "import pool, controllers, uvloop, orjson, msgspec, psutil, pika; print(pool.__file__)")
    assert where.startswith(str(venv)), where
