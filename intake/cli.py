"""``intake [--config FILE] COMMAND``: the daemon and the tools around it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from channels.email import receive
from channels.files import collect, parsed
from channels.imap import Cursors, MailboxError, check_mailbox
from intake import ops
from intake import tickets as ticket_changes
from intake.config import Settings, load_settings
from intake.daemon import Daemon, Parts, prepare
from intake.errors import ConfigError, IntakeError
from intake.logs import LogFormat, SecretMask, settings_secrets, setup_logging
from notifier import outbox as sending
from notifier import resolution
from notifier.digest import render as render_digest
from notifier.digest import render_report
from notifier.scheduler import Jobs, deliver_now
from store import metrics, queries
from store.models import Quarantine

log = logging.getLogger("intake")
T = TypeVar("T")
# Messages per transaction on import: one disk flush pays for them all.
IMPORT_BATCH = 50
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    # Escaped: messages name settings like [smtp], which Rich reads as markup.
    err.print(f"[bold red]intake:[/] {escape(message)}")
    sys.exit(code)


class Context:
    """Settings loaded once; the store opened only by commands that need it."""

    def __init__(self, config: Path | None, mask: SecretMask | None = None) -> None:
        self.config = config
        self.mask = mask or SecretMask()
        self._settings: Settings | None = None
        self._parts: Parts | None = None

    @property
    def settings(self) -> Settings:
        return self.parts.settings

    def load(self) -> Settings:
        """The settings alone, validated, their secrets masked in the log."""
        if self._settings is None:
            try:
                self._settings = load_settings(self.config)
            except ConfigError as exc:
                fail(f"{exc}\n(fix it in the settings file or the INTAKE_ variable)")
            self.mask.hide(settings_secrets(self._settings))
        return self._settings

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            self._parts = prepare(self.load())
        return self._parts

    def read(self, work: Callable[[Session], T]) -> T:
        with self.parts.intake.session_factory.begin() as session:
            return work(session)


pass_context = click.make_pass_decorator(Context)


def emit(data: Any, as_json: bool, table: Callable[[Any], Table]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        out.print(table(data))


@click.group()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="INTAKE_CONFIG",
    help="Settings file (TOML). Also INTAKE_CONFIG. Without it, defaults serve.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one object per line, for log shippers.",
)
@click.pass_context
def cli(
    ctx: click.Context, config: Path | None, log_level: str, log_format: LogFormat
) -> None:
    """Intake: every customer email becomes a ticket, never lost or doubled."""
    mask = setup_logging(log_level, log_format)
    ctx.obj = Context(config, mask)


@cli.command()
@pass_context
def init(ctx: Context) -> None:
    """Create the state directory and migrate the database."""
    settings = ctx.settings
    out.print(f"state directory: {settings.state_dir.resolve()}")
    out.print(f"database: {_mask_url(settings.database_url)} (migrated)")


@cli.command()
@pass_context
def run(ctx: Context) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    parts = ctx.parts
    try:
        asyncio.run(Daemon(parts).run())
    except OSError as exc:
        fail(
            f"cannot start: {exc} (are [smtp] listen = "
            f"{parts.settings.smtp.listen!r} and [http] listen = "
            f"{parts.settings.http.listen!r} free?)",
            code=1,
        )


@cli.command("import")
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)
@click.option(
    "--acknowledge/--no-acknowledge",
    default=False,
    show_default=True,
    help="Queue acknowledgements to customers for new tickets.",
)
@pass_context
def import_(ctx: Context, paths: tuple[Path, ...], acknowledge: bool) -> None:
    """Import .eml files, folders of them, maildirs and mbox files."""
    intake = ctx.parts.intake
    items = collect(paths)
    outcomes: Counter[str] = Counter()
    reasons: list[tuple[str, str]] = []
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("importing", total=len(items))
        workers = min(2, os.cpu_count() or 1)
        for batch in parsed(
            items, acknowledge=acknowledge, batch=IMPORT_BATCH, workers=workers
        ):
            stored = intake.accept_batch([arrival for _, arrival in batch])
            for (item, _), outcome in zip(batch, stored, strict=True):
                outcomes[outcome.status] += 1
                if outcome.status == "quarantined":
                    reasons.append((item.label, outcome.detail))
            progress.advance(task, len(batch))

    table = Table("outcome", "messages", title=f"imported {len(items)} messages")
    for status in (
        "created",
        "appended",
        "reopened",
        "machine",
        "flooded",
        "agent",
        "duplicate",
        "quarantined",
    ):
        table.add_row(status, str(outcomes[status]))
    out.print(table)
    for label, reason in reasons:
        out.print(f"[yellow]quarantined[/] {label}: {reason}", soft_wrap=True)


@cli.group()
def tickets() -> None:
    """List, show and resolve tickets."""


@tickets.command("list")
@click.option(
    "--status",
    type=click.Choice(["open", "resolved", "all"]),
    default="open",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def tickets_list(ctx: Context, status: str, as_json: bool) -> None:
    """Tickets, oldest opened first."""
    rows = ctx.read(lambda session: queries.tickets(session, status))

    def table(rows: list[dict[str, Any]]) -> Table:
        view = Table("#", "status", "opened", "customer", "email", "subject", "msgs")
        for row in rows:
            view.add_row(
                str(row["number"]),
                row["status"],
                row["opened_at"],
                row["customer"],
                row["email"],
                row["subject"],
                str(row["messages"]),
            )
        return view

    emit(rows, as_json, table)


@tickets.command("show")
@click.argument("number", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def tickets_show(ctx: Context, number: int, as_json: bool) -> None:
    """One ticket with its messages."""
    found = ctx.read(lambda session: queries.ticket(session, number))
    if found is None:
        fail(f"no ticket {number}", code=1)
    if as_json:
        click.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return

    out.print(f"[bold]#{found['number']}[/] {found['subject']}  ({found['status']})")
    out.print(
        f"customer: {found['customer']} <{found['email']}>  opened {found['opened_at']}"
    )
    for message in found["messages"]:
        arrow = "<-" if message["direction"] == "in" else "->"
        out.rule(
            f"{arrow} {message['kind']} {message['from']} {message['received_at']}"
        )
        out.print(message["text"].strip()[:2000], markup=False)
        if message["attachments"]:
            out.print(f"attachments: {', '.join(message['attachments'])}")


@tickets.command("resolve")
@click.argument("number", type=int)
@pass_context
def tickets_resolve(ctx: Context, number: int) -> None:
    """Resolve a ticket; the customer gets the resolution note (and survey)."""
    parts = ctx.parts

    def work(session: Session) -> bool:
        connection = session.connection()
        ticket = ticket_changes.by_number(connection, number)
        if ticket is None:
            return False
        if ticket.status == "resolved":
            fail(f"ticket {number} is already resolved", code=1)
        ticket_changes.resolve(connection, ticket, parts.clock.now(), actor="cli")
        resolution.notify_resolved(
            connection, parts.settings, parts.clock, ticket.id, parts.clock.now()
        )
        return True

    if not ctx.read(work):
        fail(f"no ticket {number}", code=1)
    out.print(f"ticket {number} resolved")


@cli.group()
def messages() -> None:
    """Stored inbound messages."""


@messages.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_context
def messages_list(ctx: Context, as_json: bool) -> None:
    """Every stored inbound message with its ticket and classification."""
    rows = ctx.read(queries.messages)

    def table(rows: list[dict[str, Any]]) -> Table:
        view = Table(
            "id", "channel", "ticket", "class", "received", "from", "message-id"
        )
        for row in rows:
            view.add_row(
                str(row["id"]),
                row["channel"],
                str(row["ticket"] or "-"),
                row["classification"],
                row["received_at"],
                row["from"],
                row["message_id"] or "-",
            )
        return view

    emit(rows, as_json, table)


@cli.group()
def quarantine() -> None:
    """Messages held back with a reason, for a person to look at and replay."""


@quarantine.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also released entries.")
@click.option("--json", "as_json", is_flag=True)
@pass_context
def quarantine_list(ctx: Context, show_all: bool, as_json: bool) -> None:
    """Held messages and why."""
    rows = ctx.read(
        lambda session: queries.quarantined(session, "all" if show_all else "held")
    )

    def table(rows: list[dict[str, Any]]) -> Table:
        view = Table("id", "status", "source", "size", "held since", "reason")
        for row in rows:
            view.add_row(
                str(row["id"]),
                row["status"],
                row["source"],
                str(row["size"]),
                row["created_at"],
                row["reason"],
            )
        return view

    emit(rows, as_json, table)


@quarantine.command("show")
@click.argument("entry", type=int)
@click.option("--raw", is_flag=True, help="Write the raw bytes to stdout.")
@pass_context
def quarantine_show(ctx: Context, entry: int, raw: bool) -> None:
    """One held message: the reason and the raw bytes."""

    def work(session: Session) -> tuple[dict[str, Any], bytes] | None:
        row = session.get(Quarantine, entry)
        if row is None:
            return None
        return queries.quarantined_row(row), row.raw

    found = ctx.read(work)
    if found is None:
        fail(f"no quarantine entry {entry}", code=1)
    info, content = found
    if raw:
        sys.stdout.buffer.write(content)
        return
    for key, value in info.items():
        out.print(f"{key}: {value}", markup=False)
    out.rule("first 4 KB")
    out.print(content[:4096].decode("utf-8", "replace"), markup=False)


@quarantine.command("retry")
@click.argument("entry", type=int, required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every held entry.")
@pass_context
def quarantine_retry(ctx: Context, entry: int | None, retry_all: bool) -> None:
    """Process held messages again; those that still fail stay held."""
    if (entry is None) == (not retry_all):
        fail("give an entry ID or --all")
    intake = ctx.parts.intake

    def load(session: Session) -> list[tuple[int, str, bytes]]:
        query = select(Quarantine).where(Quarantine.status == "held")
        if entry is not None:
            query = select(Quarantine).where(Quarantine.id == entry)
        return [(row.id, row.source, row.raw) for row in session.scalars(query)]

    held = ctx.read(load)
    if entry is not None and not held:
        fail(f"no quarantine entry {entry}", code=1)
    for held_id, source, content in held:
        outcome = receive(intake, content, source=source)
        if outcome.status == "quarantined":
            out.print(f"{held_id}: still held: {outcome.detail}", markup=False)
        else:
            ticket = f" ticket {outcome.ticket_number}" if outcome.ticket_number else ""
            out.print(f"{held_id}: {outcome.status}{ticket}")


@cli.group()
def outbox() -> None:
    """What Intake sends, and what it failed to send."""


@outbox.command("list")
@click.option(
    "--status",
    type=click.Choice(["all", "pending", "sent", "failed"]),
    default="all",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def outbox_list(ctx: Context, status: str, as_json: bool) -> None:
    """Outgoing messages with their state and last error."""
    rows = ctx.read(lambda session: queries.outbox(session, status))

    def table(rows: list[dict[str, Any]]) -> Table:
        view = Table("id", "status", "kind", "to", "tries", "subject", "error")
        for row in rows:
            view.add_row(
                str(row["id"]),
                row["status"],
                row["kind"],
                ", ".join(row["to"]),
                str(row["attempts"]),
                row["subject"],
                row["last_error"],
            )
        return view

    emit(rows, as_json, table)


@outbox.command("retry")
@click.argument("entry", type=int, required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed row.")
@pass_context
def outbox_retry(ctx: Context, entry: int | None, retry_all: bool) -> None:
    """Send failed rows again, now; attempts start over."""
    if (entry is None) == (not retry_all):
        fail("give an outbox ID or --all")
    parts = ctx.parts
    factory = parts.intake.session_factory
    queued = sending.retry(factory, parts.clock, None if retry_all else [entry or 0])
    if not queued:
        fail(f"no failed outbox row {entry}" if entry else "no failed outbox rows", 1)

    settings = parts.settings
    results = asyncio.run(
        sending.send_due(
            factory,
            parts.clock,
            settings.outbound,
            settings.outbox_maildir,
            queued,
        )
    )
    for outbox_id in queued:
        status, error = results.get(outbox_id, ("?", ""))
        shown = f"{status}: {error}" if error and status != "sent" else status
        out.print(f"{outbox_id}: {shown}", markup=False)


@cli.group()
def contacts() -> None:
    """Customer addresses, and whether mail reaches them."""


@contacts.command("clear")
@click.argument("address")
@pass_context
def contacts_clear(ctx: Context, address: str) -> None:
    """Send to ADDRESS again after it bounced for good."""
    cleared = sending.clear_undeliverable(ctx.parts.intake.session_factory, address)
    if not cleared:
        fail(f"{address} is not marked undeliverable", code=1)
    out.print(
        f"{address}: mail goes to it again "
        "(failed rows stay failed; `intake outbox retry` sends them)",
        markup=False,
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_context
def stats(ctx: Context, as_json: bool) -> None:
    """Counts: received, tickets, quarantined, duplicates, machine mail."""
    counts = ctx.read(queries.stats)

    def table(counts: dict[str, int]) -> Table:
        view = Table("what", "count")
        for key, value in counts.items():
            view.add_row(key, str(value))
        return view

    emit(counts, as_json, table)


@cli.group()
def mailboxes() -> None:
    """The IMAP mailboxes Intake reads."""


@mailboxes.command("check")
@click.argument("names", nargs=-1)
@pass_context
def mailboxes_check(ctx: Context, names: tuple[str, ...]) -> None:
    """Log in to each mailbox and show what is waiting; changes nothing."""
    parts = ctx.parts
    configured = parts.settings.imap.mailboxes
    chosen = [m for m in configured if not names or m.name in names]
    if not chosen:
        wanted = ", ".join(names) if names else "any"
        fail(escape(f"no [[imap.mailboxes]] table named {wanted} in the settings"))
    cursors = Cursors(parts.intake.session_factory, parts.clock)

    failures = []
    for mailbox in chosen:
        try:
            found = check_mailbox(mailbox, cursors)
        except MailboxError as exc:
            failures.append(escape(str(exc)))
            continue
        last = "-" if found.last_uid is None else str(found.last_uid)
        lines = [
            f"mailbox {found.mailbox}: logged in",
            f"  folder: {found.folder} ({found.messages} messages)",
            f"  UIDVALIDITY: {found.uidvalidity}",
            f"  waiting (above the cursor): {found.waiting}",
            f"  last imported UID: {last}",
            f"  IDLE: {'yes' if found.idle else 'no, polling'}",
        ]
        if found.note:
            lines.append(f"  note: {found.note}")
        out.print("\n".join(lines), markup=False)
    if failures:
        fail("\n".join(failures), code=1)


@cli.command()
@pass_context
def check(ctx: Context) -> None:
    """Validate the settings, resolve every host, try every connection."""
    settings = ctx.load()
    out.print("ok   settings: valid", markup=False)
    failed = 0
    for found in ops.run_checks(settings):
        out.print(found.line(), markup=False, soft_wrap=True)
        failed += not found.ok
    if failed:
        fail(f"{failed} check(s) failed", code=1)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path, dir_okay=False))
@pass_context
def backup(ctx: Context, target: Path) -> None:
    """Copy the SQLite database to TARGET while the daemon runs."""
    counts = ops.backup(ctx.load().database_url, target)
    out.print(f"backed up to {target}:", markup=False)
    for table, rows in counts.items():
        out.print(f"  {table}: {rows}", markup=False)


@cli.command("migrate-to")
@click.argument("url")
@pass_context
def migrate_to(ctx: Context, url: str) -> None:
    """Copy every row into the database at URL (migrated first), verified
    by counts. Stop the daemon first."""
    settings = ctx.load()
    ctx.mask.hide(_url_secret(url))  # the new database's password, too
    copied = ops.migrate_to(settings.database_url, url)
    table = Table("table", "source rows", "copied rows", title="copied, counts match")
    for row in copied:
        table.add_row(row.table, str(row.source), str(row.target))
    out.print(table)
    out.print(
        f"Now set [store] url = {_mask_url(url)!r} (or INTAKE_STORE__URL) "
        "and start the daemon.",
        markup=False,
        soft_wrap=True,
    )


def _url_secret(url: str) -> list[str]:
    password = make_url(url).password
    return [str(password)] if password else []


@cli.command()
@click.option("--preview", is_flag=True, help="Render the digest; send nothing.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --preview: also write the HTML part to FILE.",
)
@click.option("--send", is_flag=True, help="Send a digest now, outside the schedule.")
@pass_context
def digest(ctx: Context, preview: bool, html_file: Path | None, send: bool) -> None:
    """The owner's digest: preview it, or send one now."""
    if preview == send:
        fail("give --preview or --send")
    parts = ctx.parts
    jobs = Jobs(parts.intake.session_factory, parts.clock, parts.settings)
    if preview:
        text, html = render_digest(jobs.preview())
        click.echo(text, nl=False)
        if html_file is not None:
            html_file.write_text(html, encoding="utf-8")
            err.print(f"HTML part written to {html_file}", markup=False)
        return

    outbox_id = jobs.digest_now()
    if outbox_id is None:
        fail("no recipients: set [digest] to or owner_email", code=1)
    status = asyncio.run(
        deliver_now(
            parts.intake.session_factory, parts.clock, parts.settings, outbox_id
        )
    )
    out.print(f"digest {status} (outbox {outbox_id})")


@cli.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="First local day.")
@click.option(
    "--until", type=click.DateTime(["%Y-%m-%d"]), help="Last local day, included."
)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def report(
    ctx: Context, since: datetime | None, until: datetime | None, as_json: bool
) -> None:
    """First response, resolution, touches, volume, reopens, NPS and CSAT.

    Without dates: the 30 days up to today, in [digest] timezone.
    """
    zone = ctx.settings.digest.zone
    last = until.date() if until else ctx.parts.clock.now().astimezone(zone).date()
    first = since.date() if since else last - timedelta(days=29)
    if first > last:
        fail("--since is after --until")
    start = datetime.combine(first, time(0), zone)
    end = datetime.combine(last + timedelta(days=1), time(0), zone)
    data = ctx.read(
        lambda session: metrics.report(session.connection(), start, end, zone)
    )

    if as_json:
        click.echo(json.dumps({**data, "timezone": zone.key}, indent=2))
    else:
        click.echo(render_report(data, first=first, last=last, zone=zone.key), nl=False)


def _mask_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    try:
        cli()
    except IntakeError as exc:
        fail(str(exc))
