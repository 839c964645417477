"""Settings: one TOML file, every key overridable by ``INTAKE_`` variables.

A wrong key or value stops start-up with a ``ConfigError`` naming the setting,
the rule and the value. Nothing here is global: the daemon and the CLI load a
``Settings`` once and pass it to whoever needs it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

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


def _in_credentials(path: Path, info: ValidationInfo) -> Path:
    """A relative secret file is a name in ``$CREDENTIALS_DIRECTORY`` when
    systemd passed credentials (``LoadCredential=``)."""
    directory = (info.context or {}).get("credentials_directory")
    if directory and not path.is_absolute():
        return Path(directory) / path
    return path


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


# A file holding one secret; see _in_credentials for relative names.
SecretFile = Annotated[Path, AfterValidator(_in_credentials)]


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


# A listen address, checked once for every listener that has one.
HostPort = Annotated[str, AfterValidator(_host_port)]


class StoreSettings(Section):
    url: str = ""  # empty: SQLite in the state directory
    password_file: SecretFile | None = None  # the database password, kept apart
    busy_timeout_ms: Annotated[int, Field(ge=0)] = 5000


class SmtpSettings(Section):
    enabled: bool = True
    mode: Literal["smtp", "lmtp"] = "smtp"  # lmtp: behind Postfix (RFC 2033)
    listen: HostPort = "127.0.0.1:2525"
    domains: list[str] = Field(default_factory=lambda: ["localhost"])
    max_message_bytes: Annotated[int, Field(gt=0)] = 25 * 1024 * 1024
    hostname: str = "localhost"
    timeout_seconds: Annotated[int, Field(gt=0)] = 300

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
    password_file: SecretFile | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _password_from_file(self) -> RelaySettings:
        if self.password_file is None:
            return self
        if self.password.get_secret_value():
            raise ValueError("give password or password_file, not both")
        secret = SecretStr(_read_secret(self.password_file))
        return self.model_copy(update={"password": secret})

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


# The shortest reply secret taken; a shorter one could be guessed.
MIN_SECRET_CHARS = 16


class TicketSettings(Section):
    subject_prefix: str = "#"
    reopen_days: Annotated[int, Field(ge=0)] = 7
    acknowledge: bool = True
    # Keys the MAC in reply addresses (support+<number>.<mac>@domain).
    reply_secret: SecretStr = SecretStr("")
    reply_secret_file: SecretFile | None = None

    @model_validator(mode="after")
    def _one_long_secret(self) -> TicketSettings:
        if self.reply_secret_file and self.reply_secret.get_secret_value():
            raise ValueError("give reply_secret or reply_secret_file, not both")
        secret = self.reply_key
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                "tickets.reply_secret",
                f"must be at least {MIN_SECRET_CHARS} characters "
                "(openssl rand -hex 32 makes a good one)",
            )
        return self

    @property
    def reply_key(self) -> str:
        """The reply secret, from the setting or its file; "" when unset."""
        if self.reply_secret_file is not None:
            return _read_secret(self.reply_secret_file)
        return self.reply_secret.get_secret_value()

    @field_validator("subject_prefix")
    @classmethod
    def _no_brackets(cls, value: str) -> str:
        if any(char in value for char in "[]"):
            raise ValueError("must not contain [ or ]; the token is [PREFIX1234]")
        return value


class AgentSettings(Section):
    """One ``[[agents]]`` table: a person who answers by replying to mail."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    email: str

    @field_validator("email")
    @classmethod
    def _address(cls, value: str) -> str:
        return _addresses([value])[0]


class LimitSettings(Section):
    """Flood limits: past them, mail is stored but makes no ticket or reply."""

    per_sender: Annotated[int, Field(ge=1)] = 10
    per_ticket: Annotated[int, Field(ge=1)] = 10
    window_minutes: Annotated[int, Field(ge=1)] = 10


class ImapMailbox(Section):
    """One ``[[imap.mailboxes]]`` table: a folder Intake reads and files."""

    name: Annotated[str, Field(min_length=1, max_length=100)]
    host: str
    port: Annotated[int, Field(gt=0, lt=65536)] | None = None  # 993 or 143
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    username: str
    password: SecretStr | None = None
    password_file: SecretFile | None = None
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


# -- the owner's digest, resolution mail, check-ins, resolution targets ----

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(
    r"(\d+)\s*(m|min|minutes?|h|hours?|d|days?|business days?)", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time: clock time, or business days on the working days."""

    clock: timedelta = timedelta(0)
    business_days: int = 0


def parse_span(value: str, *, business: bool = False) -> Span:
    """``"24h"``, ``"90m"``, ``"2 days"``; with ``business``, ``"5 business days"``."""
    match = _SPAN.fullmatch(value.strip())
    if match is None or int(match[1]) == 0:
        shape = '"8h", "30m", "2 days"' + (' or "5 business days"' if business else "")
        raise ValueError(f"must be a positive duration like {shape}")
    amount, unit = int(match[1]), match[2].lower()
    if unit.startswith("business"):
        if not business:
            raise ValueError("business days are allowed only in [targets]")
        return Span(business_days=amount)
    if unit.startswith("m"):
        return Span(clock=timedelta(minutes=amount))
    if unit.startswith("h"):
        return Span(clock=timedelta(hours=amount))

    return Span(clock=timedelta(days=amount))


def _addresses(value: list[str]) -> list[str]:
    if any("@" not in address for address in value):
        raise ValueError("must be email addresses like owner@example.com")
    return [address.strip().lower() for address in value]


class DigestSettings(Section):
    timezone: str = "UTC"  # the business's IANA zone, for every local time
    at: str = "08:00"
    every: Literal["day", "weekday", "2 days", "week"] = "day"
    day: Weekday = "mon"  # the day of a weekly digest
    to: list[str] = Field(default_factory=list)  # empty: owner_email

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                "must be an IANA time zone name such as Europe/Berlin"
            ) from None
        return value

    @field_validator("at")
    @classmethod
    def _local_time(cls, value: str) -> str:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError('must be a local time "HH:MM" such as "08:00"')
        return value

    @field_validator("to")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        return _addresses(value)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def local_time(self) -> time:
        return time.fromisoformat(self.at)


class ResolutionSettings(Section):
    copy_owner: Literal["cc", "bcc", "none"] = "bcc"
    survey: Literal["none", "csat", "nps"] = "none"


class CheckinSettings(Section):
    enabled: bool = True
    after: str = "24h"

    @field_validator("after")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_span(value)
        return value

    @property
    def delay(self) -> timedelta:
        return parse_span(self.after).clock


class TargetSettings(Section):
    """How long each priority may take to resolve, unless a due date is set."""

    low: str = "5 business days"
    normal: str = "2 business days"
    high: str = "8h"
    urgent: str = "4h"
    working_days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS[:5]))

    @field_validator("low", "normal", "high", "urgent")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_span(value, business=True)
        return value

    @field_validator("working_days")
    @classmethod
    def _some_days(cls, value: list[Weekday]) -> list[Weekday]:
        if not value:
            raise ValueError("must name at least one day")
        return value

    def span(self, priority: str) -> Span:
        """The target for ``priority``; an unknown priority gets normal's."""
        known = {"low": self.low, "high": self.high, "urgent": self.urgent}
        return parse_span(known.get(priority, self.normal), business=True)


class HttpSettings(Section):
    """The HTTP listener: the health endpoint, later webhooks."""

    enabled: bool = True
    listen: HostPort = "127.0.0.1:8025"


class Settings(Section):
    state_dir: Path = Path("./var")
    store: StoreSettings = Field(default_factory=StoreSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    tickets: TicketSettings = Field(default_factory=TicketSettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    owner_email: str = ""  # gets the digest, resolution copies, check-ins
    digest: DigestSettings = Field(default_factory=DigestSettings)
    resolution: ResolutionSettings = Field(default_factory=ResolutionSettings)
    checkin: CheckinSettings = Field(default_factory=CheckinSettings)
    targets: TargetSettings = Field(default_factory=TargetSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    agents: list[AgentSettings] = Field(default_factory=list)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @field_validator("owner_email")
    @classmethod
    def _owner_address(cls, value: str) -> str:
        return _addresses([value])[0] if value else value

    @field_validator("agents")
    @classmethod
    def _distinct_agents(cls, value: list[AgentSettings]) -> list[AgentSettings]:
        for what in ("email", "name"):
            seen = [getattr(agent, what).casefold() for agent in value]
            doubled = sorted({item for item in seen if seen.count(item) > 1})
            if doubled:
                raise ConfigError(f"agents.{what}", "must be unique", doubled)
        return value

    @model_validator(mode="after")
    def _agents_need_a_secret(self) -> Settings:
        # Agents get notifications whose reply address carries a MAC.
        if self.agents and not self.tickets.reply_key:
            raise ConfigError(
                "tickets.reply_secret",
                "is required when [[agents]] are set: it signs the reply "
                "address of each notification (openssl rand -hex 32 makes one; "
                "or reply_secret_file)",
            )
        return self

    @property
    def database_url(self) -> str:
        if self.store.url and self.store.password_file is not None:
            password = _read_secret(self.store.password_file)
            url = make_url(self.store.url).set(password=password)
            return url.render_as_string(hide_password=False)
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
    from_environment = _apply_environment(data, environ)

    try:
        return Settings.model_validate(
            data,
            context={"credentials_directory": environ.get("CREDENTIALS_DIRECTORY")},
        )
    except ValidationError as exc:
        raise _first_problem(exc, from_environment) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", "file not found", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"not valid TOML: {exc}", str(path)) from None


def _apply_environment(
    data: dict[str, Any], environ: Mapping[str, str]
) -> dict[str, str]:
    """``INTAKE_SMTP__LISTEN=...`` sets ``[smtp] listen``; values parse as TOML.

    A double underscore separates levels, since keys contain single ones.
    Returns which variable set which setting, for error messages.
    """
    applied: dict[str, str] = {}
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
        applied[".".join(path)] = name

    return applied


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _first_problem(
    exc: ValidationError, from_environment: Mapping[str, str]
) -> ConfigError:
    error = exc.errors()[0]
    setting = ".".join(str(part) for part in error["loc"]) or "(top level)"
    variable = from_environment.get(setting)
    if variable is not None:
        # Name what the person set, not a key they will not find in a file.
        setting = f"{setting} (from the environment variable {variable})"
    if error["type"] == "extra_forbidden":
        return ConfigError(setting, "unknown setting")

    value = error.get("input")
    if isinstance(value, dict) or _is_secret(setting):
        value = None  # a table may hold a password; never echo secrets

    return ConfigError(setting, error["msg"], value)


def _is_secret(setting: str) -> bool:
    return any(word in setting for word in ("password", "token", "secret"))
