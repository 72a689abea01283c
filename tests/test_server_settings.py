"""maxent-server's settings: one definition per flag (command line,
environment variable, README table), one boolean parser, one default."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from maxent_server.settings import (
    ConfigError,
    ServerSettings,
    build_parser,
    default_of,
    env_of,
    flag_of,
    flag_table,
    parse_bool,
    settings_from,
)

ROOT = Path(__file__).resolve().parents[1]


def _settings(argv: list[str], environ: dict[str, str] | None = None) -> ServerSettings:
    return settings_from(build_parser(environ=environ or {}).parse_args(argv))


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- flags:start -->\n(.*?)<!-- flags:end -->", readme, re.S)
    assert found, "README.md lacks the <!-- flags:start --> ... <!-- flags:end --> markers"
    assert found.group(1) == flag_table(), "README flag table drifted: paste `maxent-server --print-flag-table`"


def test_print_flag_table_command():
    done = subprocess.run([sys.executable, "-m", "maxent_server", "--print-flag-table"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == flag_table()


def test_command_line_defaults_are_the_dataclass_defaults():
    assert _settings([]) == ServerSettings()
    assert ServerSettings().metrics_port == 9464


def test_existing_flag_names_are_kept():
    flags = {flag_of(f) for f in dataclasses.fields(ServerSettings)}
    contract = {"--host", "--port", "--data-dir", "--state-store", "--device", "--max-message-mb", "--grace-seconds",
                "--reward-workers", "--reward-timeout-seconds", "--no-plugins", "--torch-threads", "--log-level",
                "--log-format", "--no-access-log", "--metrics-port", "--metrics-host", "--metrics-max-runs",
                "--metrics-auth", "--auth-tokens", "--insecure-allow-remote", "--tls-cert", "--tls-key",
                "--tls-client-ca"}
    assert contract <= flags
    assert {"--enable-code-execution", "--code-execution-sandbox", "--reward-backend", "--ray-address",
            "--max-concurrent-rpcs", "--max-inflight-mb", "--allow-plaintext-tokens"} <= flags


@pytest.mark.parametrize("text, value", [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                         ("0", False), ("false", False), ("No", False), ("OFF", False)])
def test_one_boolean_parser(text, value):
    assert parse_bool(text, "MAXENT_X") is value


def test_a_boolean_that_is_not_one_names_the_variable():
    with pytest.raises(ConfigError, match="MAXENT_NO_PLUGINS: expected 1/0, true/false, yes/no or on/off"):
        _settings([], {"MAXENT_NO_PLUGINS": "maybe"})


def test_negative_flags_and_their_variables():
    # The old parser read MAXENT_NO_PLUGINS=no as "no plugins".
    assert _settings([], {"MAXENT_NO_PLUGINS": "no"}).load_plugins is True
    assert _settings([], {"MAXENT_NO_PLUGINS": "yes"}).load_plugins is False
    assert _settings(["--no-plugins"]).load_plugins is False
    assert _settings([], {"MAXENT_NO_ACCESS_LOG": "on"}).access_log is False
    assert _settings([], {"MAXENT_METRICS_AUTH": "off"}).metrics_auth is False


def test_environment_then_command_line():
    environ = {"MAXENT_PORT": "6000", "MAXENT_GRACE_SECONDS": "2.5", "MAXENT_REWARD_WORKERS": "3",
               "MAXENT_REWARD_BACKEND": "ray", "MAXENT_STATE_STORE": ""}
    settings = _settings([], environ)
    assert (settings.port, settings.grace_seconds, settings.reward_workers, settings.reward_backend) == \
        (6000, 2.5, 3, "ray")
    assert settings.state_store == ""
    assert _settings(["--port", "7000"], environ).port == 7000


@pytest.mark.parametrize("environ, complaint", [
    ({"MAXENT_PORT": "fifty"}, "MAXENT_PORT: expected an integer"),
    ({"MAXENT_METRICS_MAX_RUNS": "0"}, "MAXENT_METRICS_MAX_RUNS: must be >= 1"),
    ({"MAXENT_REWARD_BACKEND": "spark"}, "MAXENT_REWARD_BACKEND: expected one of local, ray"),
])
def test_bad_environment_values_name_the_variable(environ, complaint):
    with pytest.raises(ConfigError, match=complaint):
        _settings([], environ)


def test_bad_environment_value_stops_the_command_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "maxent_server", "--data-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**__import__("os").environ, "MAXENT_NO_ACCESS_LOG": "maybe"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "maxent-server: MAXENT_NO_ACCESS_LOG: expected 1/0, true/false, yes/no or on/off, got 'maybe'"]


def test_bad_flag_values_are_refused():
    for argv in (["--metrics-port", "-1"], ["--code-execution-sandbox", "docker"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            _settings(argv)


def test_every_setting_has_help_and_a_variable():
    for f in dataclasses.fields(ServerSettings):
        assert f.metadata["help"] and env_of(f) == "MAXENT_" + flag_of(f)[2:].upper().replace("-", "_")
        default_of(f)  # callable without arguments
