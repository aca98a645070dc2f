"""Unit tests of pool.settings: precedence, validation messages, TOML files, URL handling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pool.errors import ConfigError
from pool.retries import DEFAULT_TIERS_S
from pool.settings import (
    DEFAULT_AMQP_URL,
    OPTIONS,
    BrokerSettings,
    PoolSettings,
    TopologySettings,
    WorkerSettings,
    env_name,
    load_toml,
    redact_url,
    resolve,
)

# One bad raw value per option (as a flag, env var or TOML string would carry it).
BAD_VALUES: dict[str, str] = {
    "controllers": "no-colon-here",
    "workers": "0",
    "pin": "maybe",
    "node-id": "two words",
    "weight": "-1",
    "log-format": "xml",
    "log-level": "loud",
    "amqp-url": "http://host/",
    "amqp-url-file": "/nonexistent/ctlpool-url",
    "prefix": "a/b",
    "heartbeat-s": "1.5",
    "partitions": "many",
    "queue-type": "stream",
    "tiers-s": "4,1",
    "max-deliveries": "-2",
    "metrics-port": "70000",
    "metrics-host": "two words",
    "tls-ca-file": "/nonexistent/ca.pem",
    "tls-cert-file": "/nonexistent/cert.pem",
    "tls-key-file": "/nonexistent/key.pem",
    "prefetch": "abc",
    "concurrency": "",
    "reconcile-timeout-s": "nan",
    "drain-timeout-s": "inf",
    "reroute-on-acquire": "sometimes",
    "heartbeat-interval-s": "0",
    "member-timeout-s": "-5",
}


def settings_from(*, flags: dict[str, object] | None = None, env: dict[str, str] | None = None,
                  file: dict[str, object] | None = None) -> PoolSettings:
    return resolve(flags or {}, env=env or {}, file_values=file or {})


def test_bad_values_cover_every_option() -> None:
    # Given the option table
    # When compared with the bad values below
    # Then a new option cannot slip in untested
    assert set(BAD_VALUES) == {o.name for o in OPTIONS}


def test_defaults_when_nothing_is_given() -> None:
    # Given no flags, env or file
    # When settings are resolved
    s = settings_from()
    # Then every group has its documented defaults
    assert s.broker == BrokerSettings()
    assert s.topology == TopologySettings()
    assert s.worker == WorkerSettings()
    assert (s.broker.amqp_url, s.broker.prefix, s.topology.partitions) == (DEFAULT_AMQP_URL, "ctl", 64)
    assert (s.topology.queue_type, s.topology.tiers_s) == ("quorum", DEFAULT_TIERS_S)
    assert (s.worker.prefetch, s.worker.concurrency, s.worker.reroute_on_acquire) == (50, 64, True)
    assert s.controllers == () and s.workers >= 1 and s.node_id


@pytest.mark.parametrize(
    ("name", "flag", "env", "file", "read"),
    [
        ("prefetch", "7", "8", 9, lambda s: s.worker.prefetch),
        ("prefix", "fromflag", "fromenv", "fromfile", lambda s: s.broker.prefix),
        ("queue-type", "classic", "quorum", "classic", lambda s: s.topology.queue_type),
        ("reconcile-timeout-s", "1.5", "2.5", 3.5, lambda s: s.worker.reconcile_timeout_s),
        ("node-id", "a", "b", "c", lambda s: s.node_id),
        ("tiers-s", "1,2", "1,3", [1, 4], lambda s: s.topology.tiers_s),
        ("pin", "false", "true", False, lambda s: s.pin),
    ],
)
def test_flag_beats_env_beats_file_beats_default(name, flag, env, file, read) -> None:  # noqa: ANN001
    opt = next(o for o in OPTIONS if o.name == name)
    default = read(settings_from())
    parse = opt.parse
    # Given a value for the option in each source
    flags, envs, files = {name: flag}, {env_name(opt): env}, {name: file}
    # When sources are taken away one at a time, most important first
    results = [
        read(settings_from(flags=flags, env=envs, file=files)),
        read(settings_from(env=envs, file=files)),
        read(settings_from(file=files)),
        read(settings_from()),
    ]
    # Then the most important one left wins
    assert results == [parse(flag), parse(env), parse(file), default]
    assert all(a != b for a, b in zip(results, results[1:])), "each step must change the answer"


def test_a_none_flag_falls_through_to_env() -> None:
    # Given argparse's None for an unset flag, and an env var
    # When resolved
    s = settings_from(flags={"prefetch": None}, env={"CTLPOOL_PREFETCH": "5"})
    # Then the env var applies
    assert s.worker.prefetch == 5


def test_only_limits_which_options_are_read() -> None:
    # Given env vars for options a subcommand does not have, one of them invalid
    env = {"CTLPOOL_PREFETCH": "abc", "CTLPOOL_PREFIX": "mine"}
    # When resolved for just the prefix
    s = resolve({}, env=env, file_values={}, only=frozenset({"prefix"}))
    # Then the other option is ignored (default), not an error
    assert s.broker.prefix == "mine"
    assert s.worker.prefetch == WorkerSettings().prefetch


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given CTLPOOL_PARTITIONS in the real environment
    monkeypatch.setenv("CTLPOOL_PARTITIONS", "16")
    # When resolved without an explicit env mapping
    s = resolve({})
    # Then it is read
    assert s.topology.partitions == 16


def test_env_names() -> None:
    # Given options with dashes
    # When their env names are formed
    names = {o.name: env_name(o) for o in OPTIONS}
    # Then they are CTLPOOL_ plus the upper-cased name with underscores
    assert names["prefetch"] == "CTLPOOL_PREFETCH"
    assert names["reconcile-timeout-s"] == "CTLPOOL_RECONCILE_TIMEOUT_S"
    assert names["amqp-url-file"] == "CTLPOOL_AMQP_URL_FILE"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_flag_is_refused_naming_the_flag(name: str) -> None:
    # Given a bad value on the command line
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags={name: BAD_VALUES[name]})
    # Then the error starts with the flag and says why, without a "from" (the user just typed it)
    text = str(info.value)
    assert text.startswith(f"--{name}: ")
    assert "(from" not in text
    assert "\n" not in text


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_env_value_is_refused_naming_the_flag_and_the_variable(name: str) -> None:
    opt = next(o for o in OPTIONS if o.name == name)
    # Given a bad value in the environment
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(env={env_name(opt): BAD_VALUES[name]})
    # Then the error names the flag first, then where the value came from
    assert str(info.value).startswith(f"--{name} (from {env_name(opt)}): ")


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_file_value_is_refused_naming_the_flag_and_the_file(name: str) -> None:
    # Given a bad value in the config file
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(file={name: BAD_VALUES[name]})
    # Then the error names the flag first, then the config file
    assert str(info.value).startswith(f"--{name} (from {name} in the config file): ")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("workers", True),
        ("workers", 2.5),
        ("weight", True),
        ("reconcile-timeout-s", False),
        ("partitions", [64]),
        ("tiers-s", [1, "x"]),
        ("tiers-s", []),
        ("controllers", []),
        ("weight", 0),
    ],
)
def test_bad_toml_typed_values_are_refused(name: str, value: object) -> None:
    # Given a TOML value of the wrong type or range
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(file={name: value})
    # Then it is refused naming the flag
    assert str(info.value).startswith(f"--{name} (from {name} in the config file): ")


def test_good_toml_typed_values_are_accepted() -> None:
    # Given natively typed TOML values
    file = {"workers": 3, "weight": 2, "pin": False, "tiers-s": [2, 8, 32], "controllers": ["a.b:C", "d:E"],
            "reconcile-timeout-s": 10, "partitions": 8.0}
    # When resolved
    s = settings_from(file=file)
    # Then each is taken with its proper type
    assert (s.workers, s.weight, s.pin) == (3, 2.0, False)
    assert s.topology.tiers_s == (2, 8, 32)
    assert s.controllers == ("a.b:C", "d:E")
    assert s.worker.reconcile_timeout_s == 10.0
    assert s.topology.partitions == 8


@pytest.mark.parametrize("value", ["4,1", "1,1,4", "1,,4", "0,4", "-1,4", "1.5,4"])
def test_tiers_must_be_increasing_positive_whole_seconds(value: str) -> None:
    # Given a tier list that is not strictly increasing positive integers
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags={"tiers-s": value})
    # Then it is refused naming the flag
    assert str(info.value).startswith("--tiers-s: expected")


def test_tiers_from_a_comma_list() -> None:
    # Given a tier list with spaces
    # When resolved
    s = settings_from(flags={"tiers-s": "1, 4 ,16"})
    # Then the tiers are parsed in order
    assert s.topology.tiers_s == (1, 4, 16)


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_booleans_take_the_usual_spellings(raw: str, expected: bool) -> None:
    # Given a spelling of true or false
    # When resolved
    # Then it is understood
    assert settings_from(flags={"reroute-on-acquire": raw}).worker.reroute_on_acquire is expected


@pytest.mark.parametrize(("raw", "expected"), [("auto", None), ("AUTO", None), ("true", True), ("off", False)])
def test_pin_is_auto_true_or_false(raw: str, expected: bool | None) -> None:
    assert settings_from(flags={"pin": raw}).pin is expected
    assert settings_from(env={"CTLPOOL_PIN": raw}).pin is expected


def test_controllers_split_on_commas() -> None:
    # Given two controller refs with spaces and a trailing comma
    # When resolved
    s = settings_from(env={"CTLPOOL_CONTROLLERS": " a.b:C , d:E ,"})
    # Then both are kept, trimmed
    assert s.controllers == ("a.b:C", "d:E")


def test_settings_are_frozen() -> None:
    # Given resolved settings
    s = settings_from()
    # When someone tries to change them
    # Then it is refused
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.worker.prefetch = 1  # type: ignore[misc]


# ---- URLs ----

@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://user:secret@host:5672/%2F", "amqp://user:***@host:5672/%2F"),
        ("amqps://user:s3cr@t@host/vh", "amqps://user:***@host/vh"),
        ("amqp://:secret@host/", "amqp://:***@host/"),
        ("amqp://user:secret@[::1]:5672/", "amqp://user:***@[::1]:5672/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host/", "amqp://host/"),
        ("amqp://user:secret@[oops/", "amqp://***@[oops/"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_hides_the_password(url: str, redacted: str) -> None:
    # Given a URL with or without a password
    # When redacted
    out = redact_url(url)
    # Then the password is gone and the rest is intact
    assert out == redacted
    assert "secret" not in out and "s3cr" not in out


@pytest.mark.parametrize("url", ["amqp://user:secret@host:56x72/", "amqp://user:secret@[oops/", "http://user:secret@h/"])
def test_a_bad_url_is_refused_without_printing_its_password(url: str) -> None:
    # Given an invalid broker URL that carries a password, in the environment
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(env={"CTLPOOL_AMQP_URL": url})
    # Then the error names the flag and its source, but not the password
    text = str(info.value)
    assert text.startswith("--amqp-url (from CTLPOOL_AMQP_URL): ")
    assert "secret" not in text


def test_amqp_url_file_reads_the_url(tmp_path: Path) -> None:
    # Given a credentials file holding a URL and a trailing newline
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqps://svc:pw@rabbit.internal:5671/prod\n")
    # When --amqp-url-file points at it
    s = settings_from(flags={"amqp-url-file": str(url_file)})
    # Then the URL is used, trimmed
    assert s.broker.amqp_url == "amqps://svc:pw@rabbit.internal:5671/prod"


def test_amqp_url_beats_amqp_url_file(tmp_path: Path) -> None:
    # Given a URL file on the command line and a URL in the environment
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqp://file:pw@filehost/")
    # When resolved
    s = settings_from(flags={"amqp-url-file": str(url_file)}, env={"CTLPOOL_AMQP_URL": "amqp://env:pw@envhost/"})
    # Then the explicit URL wins, whatever its source
    assert s.broker.amqp_url == "amqp://env:pw@envhost/"


def test_amqp_url_file_with_a_bad_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    # Given a credentials file holding something that is not an AMQP URL
    url_file = tmp_path / "amqp-url"
    url_file.write_text("https://user:secret@host/")
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags={"amqp-url-file": str(url_file)})
    # Then the flag is named and the file's content is not printed
    text = str(info.value)
    assert text.startswith("--amqp-url-file: expected amqp://")
    assert "secret" not in text


# ---- TOML ----

def test_load_toml_reads_keys_with_dashes_or_underscores(tmp_path: Path) -> None:
    # Given a config file using both spellings
    path = tmp_path / "ctlpool.toml"
    path.write_text('prefetch = 10\nqueue_type = "classic"\nnode-id = "web-1"\ntiers_s = [2, 8]\n')
    # When loaded and resolved
    values = load_toml(str(path))
    s = settings_from(file=values)
    # Then keys come back with dashes and the settings take them
    assert values == {"prefetch": 10, "queue-type": "classic", "node-id": "web-1", "tiers-s": [2, 8]}
    assert (s.worker.prefetch, s.topology.queue_type, s.node_id, s.topology.tiers_s) == (10, "classic", "web-1", (2, 8))


def test_load_toml_accepts_a_ctlpool_table(tmp_path: Path) -> None:
    # Given a shared config file with a [ctlpool] table and another tool's table
    path = tmp_path / "shared.toml"
    path.write_text('[other-tool]\nanything = 1\n\n[ctlpool]\nprefix = "prod"\nworkers = 4\n')
    # When loaded
    values = load_toml(str(path))
    # Then only the ctlpool table is read
    assert values == {"prefix": "prod", "workers": 4}


def test_load_toml_refuses_unknown_keys(tmp_path: Path) -> None:
    # Given a config file with a misspelled key
    path = tmp_path / "ctlpool.toml"
    path.write_text("prefetch = 10\nprefech = 20\n")
    # When loaded
    with pytest.raises(ConfigError) as info:
        load_toml(str(path))
    # Then the error names --config, the key and the file
    assert str(info.value) == f"--config: unknown key 'prefech' in {path}"


def test_load_toml_refuses_invalid_toml(tmp_path: Path) -> None:
    # Given a file that is not TOML
    path = tmp_path / "ctlpool.toml"
    path.write_text("prefetch = = 10\n")
    # When loaded
    with pytest.raises(ConfigError) as info:
        load_toml(str(path))
    # Then the error names --config and the file, on one line
    text = str(info.value)
    assert text.startswith(f"--config: {path} is not valid TOML: ")
    assert "\n" not in text


def test_load_toml_refuses_a_missing_file(tmp_path: Path) -> None:
    # Given a path with no file
    path = tmp_path / "absent.toml"
    # When loaded
    with pytest.raises(ConfigError) as info:
        load_toml(str(path))
    # Then the error names --config, the path and the reason
    assert str(info.value) == f"--config: cannot read {path}: No such file or directory"


def test_empty_toml_file_sets_nothing(tmp_path: Path) -> None:
    # Given an empty config file
    path = tmp_path / "ctlpool.toml"
    path.write_text("")
    # When loaded and resolved
    # Then nothing changes from the defaults
    assert load_toml(str(path)) == {}
    assert settings_from(file=load_toml(str(path))).worker == WorkerSettings()
