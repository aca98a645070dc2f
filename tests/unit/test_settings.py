"""Unit tests of pool.settings: precedence, validation messages, TOML files, URL handling."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from pool.errors import ConfigError
from pool.retries import DEFAULT_TIERS_S
from pool import topology
from pool.settings import (
    BROKER_DELIVERY_LIMIT,
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
    split_urls,
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
    "admin-node": "no-at-sign",
    "heartbeat-s": "1.5",
    "partitions": "many",
    "queue-type": "stream",
    "tiers-s": "4,1",
    "queue-replicas": "256",
    "max-deliveries": "-2",
    "metrics-port": "70000",
    "metrics-host": "two words",
    "state-dir": "  ",
    "tls-ca-file": "/nonexistent/ca.pem",
    "tls-cert-file": "/nonexistent/cert.pem",
    "tls-key-file": "/nonexistent/key.pem",
    "prefetch": "abc",
    "concurrency": "0",
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
    assert (s.broker.amqp_url, s.broker.prefix, s.topology.partitions) == (DEFAULT_AMQP_URL, "ctl", 16)
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


@pytest.mark.parametrize("value", ["4,1", "1,1,4", "1,,4", "0,4", "-1,4", "1.5,4", "1,99999999999"])
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
        ("amqp://user:secret@[oops/", "amqp://user:***@[oops/"),
        ("not a url", "not a url"),
        # an unencoded / ? # @ in the password: urlsplit ends the user part too early (or not at all)
        ("amqp://user:se/cret@host/", "amqp://user:***@host/"),
        ("amqp://user:12/secret@host/vh", "amqp://user:***@host/vh"),  # urlsplit: host "user", port 12
        ("amqp://user:se?cret@host/", "amqp://user:***@host/"),
        ("amqp://user:se#cret@host/", "amqp://user:***@host/"),
        ("amqp://user:se@cret@host/", "amqp://user:***@host/"),
        ("amqp://user:se,cret@host/", "amqp://user:***@host/"),  # a comma in a password is not a list
        ("user:secret@host", "user:***@host"),  # no scheme at all
        # a cluster list: every element redacted
        ("amqp://u:secret@h1,amqp://u:secret2@h2/", "amqp://u:***@h1,amqp://u:***@h2/"),
        ("amqp://u:secret@h1:5672/%2F, amqps://v:se/cret@h2", "amqp://u:***@h1:5672/%2F, amqps://v:***@h2"),
        ("amqp://h1,amqp://u:secret@h2/", "amqp://h1,amqp://u:***@h2/"),
    ],
)
def test_redact_url_hides_the_password(url: str, redacted: str) -> None:
    # Given a URL with or without a password
    # When redacted
    out = redact_url(url)
    # Then the password is gone and the rest is intact
    assert out == redacted
    assert "secret" not in out and "s3cr" not in out and "cret" not in out


@pytest.mark.parametrize("url", ["amqp://user:secret@host:56x72/", "amqp://user:secret@[oops/", "http://user:secret@h/",
                                 "amqp://user:se/cret@host/", "amqp://user:12/secret@host/",
                                 "amqp://u:pw@h1,amqp://u:secret@h2:99999/", "amqp://u:pw@h1,http://u:secret@h2/",
                                 "user:secret@host"])
def test_a_bad_url_is_refused_without_printing_its_password(url: str) -> None:
    # Given an invalid broker URL that carries a password, in the environment
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(env={"CTLPOOL_AMQP_URL": url})
    # Then the error names the flag and its source, but not the password
    text = str(info.value)
    assert text.startswith("--amqp-url (from CTLPOOL_AMQP_URL): ")
    assert "secret" not in text and "cret" not in text


@pytest.mark.parametrize("url", ["amqp://user:se/cret@host/", "amqp://user:se?cret@host/", "amqp://user:se#cret@host/",
                                 "amqp://user:12/secret@host/vh", "amqp://u:p@host/v@h"])
def test_a_url_that_parses_two_ways_is_refused_asking_for_percent_encoding(url: str) -> None:
    # Given a URL whose user part holds an unencoded / ? or # (or whose vhost holds an @)
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags={"amqp-url": url})
    # Then it is refused, saying how to write it, without the password
    text = str(info.value)
    assert text.startswith("--amqp-url: the user or password holds")
    assert "percent-encode" in text and "%2F" in text
    assert "cret" not in text


def test_an_at_sign_in_the_password_is_unambiguous_and_accepted() -> None:
    # Given a password with an unencoded @ (the user part ends at the last @, for pika as for us)
    url = "amqp://user:se@cret@host:5672/%2F"
    # When resolved
    s = settings_from(flags={"amqp-url": url})
    # Then it is taken as it is, and shown redacted
    assert s.broker.amqp_url == url
    assert redact_url(s.broker.amqp_url) == "amqp://user:***@host:5672/%2F"


def test_a_list_of_urls_is_split_before_each_scheme_only() -> None:
    # Given a cluster list, with a comma inside one password
    text = "amqp://u:p,w@h1,amqp://u:p2@h2, amqps://u:p3@h3/vh"
    # When split
    # Then each URL is whole, the password's comma included
    assert split_urls(text) == ["amqp://u:p,w@h1", "amqp://u:p2@h2", " amqps://u:p3@h3/vh"]
    assert split_urls("amqp://h/") == ["amqp://h/"]


def test_a_list_of_urls_is_accepted_and_each_checked() -> None:
    # Given a cluster list in the environment
    # When resolved
    s = settings_from(env={"CTLPOOL_AMQP_URL": "amqp://u:p@h1:5672/%2F, amqp://u:p@h2:5672/%2F"})
    # Then every node is kept, trimmed
    assert s.broker.amqp_url == "amqp://u:p@h1:5672/%2F,amqp://u:p@h2:5672/%2F"


def test_broker_delivery_limit_mirrors_the_topology() -> None:
    # Given the limit settings.py mirrors (topology imports settings, not the other way round)
    # When compared with the one the partitions are declared with
    # Then they are the same, and --max-deliveries stays at most half of it
    assert BROKER_DELIVERY_LIMIT == topology.BROKER_DELIVERY_LIMIT
    assert settings_from(flags={"max-deliveries": str(BROKER_DELIVERY_LIMIT // 2)}).topology.max_deliveries == 10
    with pytest.raises(ConfigError):
        settings_from(flags={"max-deliveries": str(BROKER_DELIVERY_LIMIT // 2 + 1)})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prefetch", "70000"), ("prefetch", "65536"), ("prefetch", "0"),
        ("heartbeat-s", "70000"), ("heartbeat-s", "0"),
        ("max-deliveries", "11"), ("max-deliveries", "0"),
        ("concurrency", "10001"), ("workers", "5000"),
        ("reconcile-timeout-s", "1e300"), ("reconcile-timeout-s", "86401"), ("reconcile-timeout-s", "-inf"),
        ("drain-timeout-s", "1e300"), ("drain-timeout-s", "0"),
        ("heartbeat-interval-s", "0.001"), ("heartbeat-interval-s", "nan"),
        ("member-timeout-s", "inf"), ("member-timeout-s", "nan"),
    ],
)
def test_numbers_out_of_their_range_are_refused(name: str, value: str) -> None:
    # Given a number the field or the pool cannot use (a 16-bit AMQP field, a timer, a fork count)
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags={name: value})
    # Then it is refused naming the flag, the range and the value
    text = str(info.value)
    assert text.startswith(f"--{name}: expected ")
    assert repr(value) in text


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("prefetch", "65535", lambda s: s.worker.prefetch),
        ("heartbeat-s", "65535", lambda s: s.broker.heartbeat_s),
        ("max-deliveries", "1", lambda s: s.topology.max_deliveries),
        ("concurrency", "10000", lambda s: s.worker.concurrency),
        ("drain-timeout-s", "86400", lambda s: s.worker.drain_timeout_s),
        ("heartbeat-interval-s", "0.01", lambda s: s.worker.heartbeat_interval_s),
    ],
)
def test_numbers_at_the_edge_of_their_range_are_accepted(name: str, value: str, read) -> None:  # noqa: ANN001
    # Given the largest (or smallest) value a field takes
    # When resolved
    # Then it is taken
    assert read(settings_from(flags={name: value})) == float(value)


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ({"member-timeout-s": "0.001"}, {}),
        ({"heartbeat-interval-s": "3"}, {}),  # the default member timeout (5 s) is then too short
        ({"member-timeout-s": "1.9"}, {"CTLPOOL_HEARTBEAT_INTERVAL_S": "1"}),
    ],
)
def test_member_timeout_must_cover_two_heartbeats(flags: dict[str, str], env: dict[str, str]) -> None:
    # Given a member timeout shorter than two heartbeat intervals
    # When resolved
    with pytest.raises(ConfigError) as info:
        settings_from(flags=flags, env=env)
    # Then it is refused naming both flags, on one line
    text = str(info.value)
    assert text.startswith("--member-timeout-s: ") and "--heartbeat-interval-s" in text
    assert "\n" not in text


def test_member_timeout_of_exactly_two_heartbeats_is_accepted() -> None:
    # Given the shortest member timeout allowed
    # When resolved
    s = settings_from(flags={"heartbeat-interval-s": "0.5", "member-timeout-s": "1"})
    # Then it is taken
    assert (s.worker.heartbeat_interval_s, s.worker.member_timeout_s) == (0.5, 1.0)


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


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_amqp_url_file_others_may_read_is_used_with_a_warning(tmp_path: Path, mode: int,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # Given a credentials file that group or others may read
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqp://svc:pw@rabbit/\n")
    os.chmod(url_file, mode)
    # When --amqp-url-file points at it
    with caplog.at_level(logging.WARNING, logger="ctlpool.settings"):
        s = settings_from(flags={"amqp-url-file": str(url_file)})
    # Then the URL is still used, and one warning line names the file and the fix, not the password
    assert s.broker.amqp_url == "amqp://svc:pw@rabbit/"
    [record] = caplog.records
    text = record.getMessage()
    assert str(url_file) in text and f"chmod 600 {url_file}" in text and f"{mode:03o}" in text
    assert "\n" not in text and "pw@" not in text


def test_amqp_url_file_only_its_owner_may_read_gets_no_warning(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # Given a credentials file with mode 600 (or 400, as systemd's LoadCredential= makes it)
    url_file = tmp_path / "amqp-url"
    url_file.write_text("amqp://svc:pw@rabbit/")
    os.chmod(url_file, 0o600)
    # When --amqp-url-file points at it
    with caplog.at_level(logging.WARNING, logger="ctlpool.settings"):
        settings_from(flags={"amqp-url-file": str(url_file)})
    # Then nothing is said
    assert caplog.records == []


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


def test_queue_replicas_set_the_quorum_group_size_only_when_given() -> None:
    from pool.settings import TopologySettings
    from pool.topology import Names, partition_args, tier_args

    names = Names("ctl", "c")
    assert "x-quorum-initial-group-size" not in partition_args(names, TopologySettings())  # the broker's default
    assert partition_args(names, TopologySettings(replicas=5))["x-quorum-initial-group-size"] == 5
    assert tier_args(names, TopologySettings(replicas=2), 4)["x-quorum-initial-group-size"] == 2
    assert "x-quorum-initial-group-size" not in partition_args(names, TopologySettings(queue_type="classic", replicas=3))


def test_an_empty_environment_variable_is_unset(tmp_path) -> None:
    # Given an empty CTLPOOL_AMQP_URL (a unit's Environment= line left blank) and a URL file
    url_file = tmp_path / "url"
    url_file.write_text("amqp://u:p@mq1:5672/v\n")
    # When resolved
    s = resolve({"amqp-url-file": str(url_file)}, env={"CTLPOOL_AMQP_URL": "", "CTLPOOL_WORKERS": ""})
    # Then the file's URL is used, as if the variable were not there, and empty numbers are defaults
    assert s.broker.amqp_url == "amqp://u:p@mq1:5672/v"
    assert s.workers == PoolSettings().workers


@pytest.mark.parametrize("env, expected", [
    ({"RUNTIME_DIRECTORY": "/run/ctlpool:/run/other", "XDG_RUNTIME_DIR": "/run/user/7"}, "/run/ctlpool"),
    ({"XDG_RUNTIME_DIR": "/run/user/7"}, "/run/user/7/ctlpool"),
    ({}, None),
])
def test_the_default_state_dir_is_private_first(env, expected) -> None:
    import os
    import tempfile

    from pool.settings import default_state_dir

    got = default_state_dir(env)
    assert got == (expected or os.path.join(tempfile.gettempdir(), f"ctlpool-{os.getuid()}"))


@pytest.mark.parametrize("flag, value, said", [
    ("partitions", "1001", "--partitions: expected a whole number from 1 to 1000"),
    ("weight", "1e6", "--weight: expected a number more than 0 and at most 1000"),
    ("tiers-s", "1,99999999999", "--tiers-s: expected delay tiers of at most 31622400 seconds"),
])
def test_counts_and_weights_have_upper_bounds(flag, value, said) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({flag: value}, env={})
    assert str(info.value).startswith(said), str(info.value)
