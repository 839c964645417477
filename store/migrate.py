"""Alembic migrations, run by ``intake init`` and on every start.

Alembic itself is imported only when there is work for it: on a database
already at the newest revision, the check is one query and a glance at the
migration files, which keeps start-up short.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key serialising migrations between daemons that
# start together on one database ("intake" in ASCII).
MIGRATION_LOCK = 0x696E74616B65
_REVISION = re.compile(
    r'^(down_revision|revision)\s*=\s*(None|"[^"]*"|\'[^\']*\')', re.M
)


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config  # noqa: PLC0415 (only when migrating)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema; a no-op when it is there."""
    if is_current(engine):
        return

    from alembic import command  # noqa: PLC0415 (only when migrating)

    with _one_at_a_time(engine):
        command.upgrade(alembic_config(engine), "head")


@contextmanager
def _one_at_a_time(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, where several daemons may start at once, the first to
    take the lock migrates; the others wait, then find nothing to do."""
    if engine.dialect.name != "postgresql":
        yield
        return

    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        try:
            yield
        finally:
            holder.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK}
            )
            holder.commit()


def is_current(engine: Engine) -> bool:
    """Whether the database is at the newest revision of the files."""
    return current_revision(engine) == head_revision()


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            found = connection.scalar(text("SELECT version_num FROM alembic_version"))
    except DBAPIError:
        return None  # no version table: a new database

    return None if found is None else str(found)


def head_revision() -> str:
    """The revision no other migration names as its parent."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in MIGRATIONS.glob("versions/*.py"):
        fields = dict(_REVISION.findall(path.read_text()))
        revisions.add(fields["revision"].strip("\"'"))
        if fields.get("down_revision", "None") != "None":
            parents.add(fields["down_revision"].strip("\"'"))

    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations must form one line; heads are {sorted(heads)}")
    return heads.pop()
