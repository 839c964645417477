"""Logging: configured once at the entry point, written to stderr.

Every record passes through one ``SecretMask`` before any formatter sees it,
so a password, token or signature never reaches the journal or a log
shipper, whichever module logged it and whether it was in the message, its
arguments or a traceback. ``--log-format json`` writes one JSON object per
line; ``key=value`` pairs in the message become fields of their own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import BaseModel, SecretStr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

LogFormat = Literal["text", "json"]
MASK = "***"

# Libraries that say too much at info: aiosmtpd logs every SMTP command,
# uvicorn every request; our own line per message says what matters.
CHATTY = ("mail.log", "alembic", "uvicorn", "uvicorn.error", "uvicorn.access")

# "password=...", "token: ...", "X-Twilio-Signature: ..." and the like.
NAMED_SECRET = re.compile(
    r"(?i)\b([\w-]*(?:password|passwd|secret|token|signature)[\w-]*"
    r"""["']?\s*[=:]\s*["']?)([^\s"',;&]+)"""
)
# The password in a URL's userinfo: scheme://user:password@host
URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
FIELD = re.compile(r"(?<![\w.-])([a-z_]+)=(\S+)")

# syslog priorities, for journald's "<N>" line prefix (sd-daemon(3))
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class SecretMask(logging.Filter):
    """Replaces secrets in a record with ``***``: the one place that does.

    Known values (from the settings) are replaced wherever they appear;
    values that merely look like secrets (``password=...``, the password in
    a URL) are replaced too, for secrets nobody registered.
    """

    def __init__(self) -> None:
        super().__init__()
        self._values: list[str] = []

    def hide(self, values: Iterable[str]) -> None:
        """Mask these exact values from now on; very short ones are skipped,
        since masking "a" everywhere would garble every line."""
        known = set(self._values)
        known.update(value for value in values if len(value) >= 4)
        self._values = sorted(known, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        text = URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)

        return NAMED_SECRET.sub(rf"\g<1>{MASK}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)

        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in FIELD.findall(message):
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text

        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Plain lines with a ``<N>`` priority prefix that journald understands;
    journald adds the time itself."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITY.get(record.levelno, 6)
        lines = super().format(record).splitlines() or [""]

        return "\n".join(f"<{priority}>{line}" for line in lines)


def setup_logging(
    level: str = "info",
    log_format: LogFormat = "text",
    *,
    stream: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> SecretMask:
    """Configure the root logger once; returns the mask to register secrets."""
    stream = stream or sys.stderr
    environ = dict(os.environ) if environ is None else environ
    handler = logging.StreamHandler(stream)
    mask = SecretMask()
    handler.addFilter(mask)
    handler.setFormatter(_formatter(log_format, stream, environ))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    quiet = max(logging.WARNING, root.level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(quiet)

    return mask


def _formatter(
    log_format: LogFormat, stream: TextIO, environ: dict[str, str]
) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if _is_journal(stream, environ.get("JOURNAL_STREAM", "")):
        return JournalFormatter()

    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def _is_journal(stream: TextIO, journal_stream: str) -> bool:
    """True when ``stream`` is the journal's socket ($JOURNAL_STREAM names
    its device and inode, systemd.exec(5))."""
    device, _, inode = journal_stream.partition(":")
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False

    return f"{found.st_dev}:{found.st_ino}" == f"{device}:{inode}"


def settings_secrets(settings: BaseModel) -> list[str]:
    """Every secret a settings object holds: secret strings, the contents of
    ``*_file`` secrets, and the password in a database URL."""
    return list(_secrets(settings))


def _secrets(value: object, name: str = "") -> Iterator[str]:
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _secrets(getattr(value, field), field)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secrets(item, name)
    elif isinstance(value, Path) and name.endswith("_file"):
        try:
            yield value.read_text().strip()
        except OSError:
            return
    elif isinstance(value, str) and name == "url" and value:
        try:
            password = make_url(value).password
        except ArgumentError:
            return
        if password:
            yield str(password)
