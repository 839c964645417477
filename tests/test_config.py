"""Settings: defaults, environment overrides, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.config import load_settings
from intake.errors import ConfigError
from tests.conftest import run_cli


def test_defaults_serve_without_a_file() -> None:
    settings = load_settings(None, environ={})

    assert settings.state_dir == Path("./var")
    assert settings.smtp.listen == "127.0.0.1:2525"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.outbound.relay is None
    assert settings.support_address == "support@localhost"


def test_environment_overrides_a_nested_key() -> None:
    settings = load_settings(
        None,
        environ={
            "INTAKE_SMTP__LISTEN": "127.0.0.1:2626",
            "INTAKE_SMTP__DOMAINS": '["shop.example"]',
            "INTAKE_TICKETS__REOPEN_DAYS": "3",
        },
    )

    assert settings.smtp.listen == "127.0.0.1:2626"
    assert settings.smtp.domains == ["shop.example"]
    assert settings.tickets.reopen_days == 3


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[smtp]\nlisten = 'nowhere'\n", "smtp.listen"),
        ("[smtp]\nlistne = '127.0.0.1:25'\n", "smtp.listne"),
        ("[tickets]\nreopen_days = -1\n", "tickets.reopen_days"),
        ("[outbound]\nfrom_address = 'support'\n", "outbound.from_address"),
        ("[outbound.relay]\nport = 587\n", "outbound.relay.host"),
        ("colour = 'blue'\n", "colour"),
    ],
)
def test_a_bad_setting_is_named(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "intake.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})

    assert error.value.setting == named
    assert named in str(error.value)


def test_a_bad_setting_stops_start_up_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "intake.toml"
    path.write_text("[smtp]\nmax_message_bytes = 'lots'\n")

    result = run_cli(path, "run", check=False)

    assert result.returncode != 0
    assert "smtp.max_message_bytes" in result.stderr


def test_a_password_in_a_bad_setting_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "intake.toml"
    path.write_text(
        "[outbound.relay]\nhost = 'smtp.example.com'\ntls = 'none'\n"
        "username = 'support'\npassword = 'hunter2'\n"
    )

    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})

    assert error.value.setting == "outbound.relay"
    assert "hunter2" not in str(error.value)


def test_a_bad_environment_variable_is_named_as_such() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, environ={"INTAKE_SMTP__LISTNE": "x"})

    assert "INTAKE_SMTP__LISTNE" in str(error.value)
    assert "unknown setting" in str(error.value)
