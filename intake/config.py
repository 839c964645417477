"""Settings: one TOML file, every key overridable by ``INTAKE_`` variables.

A wrong key or value stops start-up with a ``ConfigError`` naming the setting,
the rule and the value. Nothing here is global: the daemon and the CLI load a
``Settings`` once and pass it to whoever needs it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from intake.errors import ConfigError

ENV_PREFIX = "INTAKE_"
CONFIG_ENV = "INTAKE_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` to a host and a port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535")

    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (explicit ":25")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StoreSettings(Section):
    url: str = ""  # empty: SQLite in the state directory
    busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000


class SmtpSettings(Section):
    enabled: bool = True
    listen: str = "127.0.0.1:2525"
    domains: list[str] = Field(default_factory=lambda: ["localhost"])
    max_message_bytes: Annotated[int, Field(gt=0)] = 25 * 1024 * 1024
    hostname: str = "localhost"
    timeout_seconds: Annotated[int, Field(gt=0)] = 300

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("domains")
    @classmethod
    def _domains_lower(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one domain we receive mail for")
        return [domain.strip().lower() for domain in value]


class RelaySettings(Section):
    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str = ""
    password: SecretStr = SecretStr("")
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> RelaySettings:
        if self.tls == "none" and self.username and not is_loopback(self.host):
            raise ValueError(
                'tls = "none" with a password is only allowed to a loopback relay'
            )
        return self


class OutboundSettings(Section):
    relay: RelaySettings | None = None
    from_address: str = ""  # empty: support@ the first SMTP domain
    from_name: str = "Support"
    max_attempts: Annotated[int, Field(ge=1)] = 8
    retry_base_seconds: Annotated[float, Field(gt=0)] = 30.0
    poll_seconds: Annotated[float, Field(gt=0)] = 5.0

    @field_validator("from_address")
    @classmethod
    def _looks_like_address(cls, value: str) -> str:
        if value and "@" not in value:
            raise ValueError("must be an email address like support@example.com")
        return value.strip().lower()


class TicketSettings(Section):
    subject_prefix: str = "#"
    reopen_days: Annotated[int, Field(ge=0)] = 7
    acknowledge: bool = True

    @field_validator("subject_prefix")
    @classmethod
    def _no_brackets(cls, value: str) -> str:
        if any(char in value for char in "[]"):
            raise ValueError("must not contain [ or ]; the token is [PREFIX1234]")
        return value


class ImapMailbox(Section):
    """One ``[[imap.mailboxes]]`` table: a folder Intake reads and files."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] | None = None  # 993 or 143
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    username: str
    password: SecretStr | None = None
    password_file: Path | None = None
    # A command that prints an XOAUTH2 access token (Gmail, Microsoft 365).
    oauth2_token_command: Annotated[str | None, Field(validate_default=True)] = None
    folder: str = "INBOX"
    after: Literal["seen", "move"] = "seen"
    move_to: Annotated[str, Field(validate_default=True)] = ""
    poll_seconds: Annotated[float, Field(gt=0)] = 60.0
    import_existing: bool = True
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("tls")
    @classmethod
    def _clear_text_only_on_loopback(cls, value: str, info: ValidationInfo) -> str:
        host = info.data.get("host", "")
        if value == "none" and not is_loopback(host):
            raise ValueError(
                "sends the password in clear text, so it is only allowed to a "
                f'loopback host; use "implicit" or "starttls" {_where(info)}'
            )
        return value

    @field_validator("oauth2_token_command")
    @classmethod
    def _one_secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        given = [info.data.get("password"), info.data.get("password_file"), value]
        if sum(secret is not None for secret in given) != 1:
            raise ValueError(
                "give exactly one of password, password_file or "
                f"oauth2_token_command {_where(info)}"
            )
        return value

    @field_validator("move_to")
    @classmethod
    def _move_needs_a_folder(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("after") == "move" and not value:
            raise ValueError(f'after = "move" needs move_to = "FOLDER" {_where(info)}')
        if value and value == info.data.get("folder"):
            raise ValueError(f"must differ from folder {_where(info)}")
        return value

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 993 if self.tls == "implicit" else 143


def _where(info: ValidationInfo) -> str:
    return f"(mailbox {info.data.get('name')!r})"


class ImapSettings(Section):
    mailboxes: list[ImapMailbox] = Field(default_factory=list)

    @field_validator("mailboxes")
    @classmethod
    def _unique_names(cls, value: list[ImapMailbox]) -> list[ImapMailbox]:
        names = [mailbox.name for mailbox in value]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            # Raised as ConfigError, not ValueError, so that pydantic does not
            # attach the input, which holds every mailbox's password.
            raise ConfigError("imap.mailboxes", "names must be unique", doubled)
        return value


class Settings(Section):
    state_dir: Path = Path("./var")
    store: StoreSettings = Field(default_factory=StoreSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    tickets: TicketSettings = Field(default_factory=TicketSettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)

    @property
    def database_url(self) -> str:
        if self.store.url:
            return self.store.url
        return f"sqlite:///{self.state_dir.resolve() / 'intake.db'}"

    @property
    def support_address(self) -> str:
        return self.outbound.from_address or f"support@{self.smtp.domains[0]}"

    @property
    def message_id_domain(self) -> str:
        """Right-hand side of our Message-IDs; distinct from any person's."""
        return "intake." + self.support_address.rpartition("@")[2]

    @property
    def outbox_maildir(self) -> Path:
        return self.state_dir / "outbox"


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the file (if any), apply ``INTAKE_`` overrides, validate."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])

    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    _apply_environment(data, environ)

    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise _first_problem(exc) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", "file not found", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"not valid TOML: {exc}", str(path)) from None


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``INTAKE_SMTP__LISTEN=...`` sets ``[smtp] listen``; values parse as TOML.

    A double underscore separates levels, since keys contain single ones.
    """
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(name, "overrides a value that is not a table")
        target[path[-1]] = _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _first_problem(exc: ValidationError) -> ConfigError:
    error = exc.errors()[0]
    setting = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return ConfigError(setting, "unknown setting")

    value = error.get("input")
    if isinstance(value, dict) or _is_secret(setting):
        value = None  # a table may hold a password; never echo secrets

    return ConfigError(setting, error["msg"], value)


def _is_secret(setting: str) -> bool:
    return any(word in setting for word in ("password", "token", "secret"))
