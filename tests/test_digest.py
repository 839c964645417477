"""The owner's digest: what it lists and in which order, the numbers above
the list, escaping, expected resolution, and how a real browser shows it."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert

from intake.clock import FrozenClock
from intake.config import TargetSettings, load_settings
from intake.daemon import Parts, prepare
from notifier.digest import Digest, Targets, build_digest, digest_email, render
from store.models import MailboxTally
from tests.conftest import run_cli
from tests.owner import Story, body, outgoing, owner_config

NOW = datetime(2026, 3, 4, 8, 0, tzinfo=UTC)  # a Wednesday, 09:00 in Berlin
BERLIN = ZoneInfo("Europe/Berlin")
SINCE = NOW - timedelta(days=1)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[tuple[Parts, Story, Path]]:
    config = owner_config(tmp_path, digest={"timezone": "Europe/Berlin"})
    parts = prepare(load_settings(config, environ={}), FrozenClock(NOW))
    yield parts, Story(parts), config
    parts.engine.dispose()


def digest_of(parts: Parts) -> Digest:
    with parts.engine.connect() as connection:
        return build_digest(connection, parts.settings, NOW, since=SINCE)


# -- expected resolution ------------------------------------------------------------


def targets(**changes: object) -> Targets:
    return Targets(TargetSettings.model_validate(changes), BERLIN)


@pytest.mark.parametrize(
    ("opened", "priority", "expected"),
    [
        # Friday 15:00 + 2 business days: Tuesday 15:00, over the weekend.
        (
            datetime(2026, 3, 6, 15, 0, tzinfo=BERLIN),
            "normal",
            datetime(2026, 3, 10, 15, 0),
        ),
        # Saturday: the count starts from Monday.
        (
            datetime(2026, 3, 7, 10, 0, tzinfo=BERLIN),
            "normal",
            datetime(2026, 3, 10, 10, 0),
        ),
        # 5 business days from a Monday: the next Monday.
        (datetime(2026, 3, 2, 9, 0, tzinfo=BERLIN), "low", datetime(2026, 3, 9, 9, 0)),
        # Hours are clock hours, weekends included.
        (
            datetime(2026, 3, 6, 20, 0, tzinfo=BERLIN),
            "high",
            datetime(2026, 3, 7, 4, 0),
        ),
        (
            datetime(2026, 3, 6, 20, 0, tzinfo=BERLIN),
            "urgent",
            datetime(2026, 3, 7, 0, 0),
        ),
        # An unknown priority gets normal's target.
        (
            datetime(2026, 3, 2, 9, 0, tzinfo=BERLIN),
            "whenever",
            datetime(2026, 3, 4, 9, 0),
        ),
        # Across the change to summer time the local time of day is kept.
        (
            datetime(2026, 3, 27, 9, 0, tzinfo=BERLIN),
            "normal",
            datetime(2026, 3, 31, 9, 0),
        ),
    ],
)
def test_expected_resolution_follows_the_priority_target(
    opened: datetime, priority: str, expected: datetime
) -> None:
    due = targets().due(opened.astimezone(UTC), priority, None)

    assert due.astimezone(BERLIN).replace(tzinfo=None) == expected


def test_a_due_date_set_by_hand_wins_over_the_target() -> None:
    by_hand = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)

    assert targets().due(NOW, "urgent", by_hand) == by_hand


def test_working_days_come_from_the_settings() -> None:
    # A shop open Tuesday to Saturday: Friday + 2 business days is Tuesday.
    shop = targets(working_days=["tue", "wed", "thu", "fri", "sat"])
    friday = datetime(2026, 3, 6, 15, 0, tzinfo=BERLIN)

    due = shop.due(friday.astimezone(UTC), "normal", None)

    assert due.astimezone(BERLIN).date() == date(2026, 3, 10)


# -- content ------------------------------------------------------------------------


def test_tickets_are_listed_oldest_opened_first(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, story, _ = owner
    ann = story.customer("Ann", "ann@customer.example", at=NOW)
    middle = story.ticket(ann, NOW - timedelta(days=2), subject="Middle")
    newest = story.ticket(ann, NOW - timedelta(hours=1), subject="Newest")
    oldest = story.ticket(ann, NOW - timedelta(days=9), subject="Oldest")

    digest = digest_of(parts)
    text, html = render(digest)

    numbers = [row.number for row in digest.rows]
    assert numbers == [story.number(t) for t in (oldest, middle, newest)]
    assert text.index("Oldest") < text.index("Middle") < text.index("Newest")
    assert html.index("Oldest") < html.index("Middle") < html.index("Newest")


def test_no_open_tickets_is_said_in_one_line(owner: tuple[Parts, Story, Path]) -> None:
    parts, _, _ = owner

    text, html = render(digest_of(parts))

    assert "No open tickets." in text
    assert "Open tickets, oldest first" not in text
    assert html.count("No open tickets.") == 1
    assert "<h2>Open tickets" not in html


def test_a_customer_name_with_html_in_it_is_escaped(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, story, _ = owner
    name = '<script>alert("x")</script> & <b>Co</b>'
    evil = story.customer(name, "evil@customer.example", company="<i>Inc</i>", at=NOW)
    story.ticket(evil, NOW, subject="<img src=x onerror=alert(1)>", text="<b>hi</b>")

    text, html = render(digest_of(parts))

    assert "<script>" not in html
    assert (
        "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;Co&lt;/b&gt;"
        in html
    )
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;i&gt;Inc&lt;/i&gt;" in html
    assert "&lt;b&gt;hi&lt;/b&gt;" in html
    assert name in text  # plain text shows the name as it is


def test_each_row_carries_customer_assignee_age_due_and_who_waits(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, story, _ = owner
    dana = story.agent("Dana Agent", "dana@example.com")
    ann = story.customer(
        "Ann Customer",
        "ann@customer.example",
        company="Ann GmbH",
        phone="+4930123",
        at=NOW,
    )
    answered = story.ticket(
        ann,
        NOW - timedelta(days=3, hours=2),
        assignee=dana,
        text="Line one\n\nLine two",
    )
    story.agent_replies(answered, NOW - timedelta(days=1), dana)
    story.ticket(ann, NOW - timedelta(hours=5), priority="urgent", subject="Fire")

    first, second = digest_of(parts).rows

    assert (first.customer, first.company) == ("Ann Customer", "Ann GmbH")
    assert (first.email, first.phone) == ("ann@customer.example", "+4930123")
    assert first.assignee == "Dana Agent"
    assert first.excerpt == "Line one / Line two"
    assert first.opened == "2026-03-01 07:00"  # Berlin time
    assert first.age == "3d 2h"
    assert first.due == "2026-03-03 07:00"  # Sunday + 2 business days
    assert first.overdue
    assert first.waiting == "waiting on the customer"
    assert (second.assignee, second.waiting, second.overdue) == (
        "unassigned",
        "waiting on us",
        True,  # urgent: 4 h
    )


def test_the_numbers_above_the_list(owner: tuple[Parts, Story, Path]) -> None:
    parts, story, _ = owner
    dana = story.agent("Dana Agent", "dana@example.com")
    ann = story.customer("Ann", "ann@customer.example", at=NOW)
    old = story.ticket(ann, NOW - timedelta(days=10))
    story.ticket(ann, NOW - timedelta(days=6))  # overdue before the last digest
    story.ticket(ann, NOW - timedelta(hours=3))  # new
    late = story.ticket(ann, NOW - timedelta(hours=10), priority="high")  # 8 h
    story.agent_replies(old, NOW - timedelta(days=9), dana)  # answered in 1 day
    story.resolve(old, NOW - timedelta(hours=2))  # resolved since the last digest
    del late

    digest = digest_of(parts)
    text, html = render(digest)

    assert (digest.open, digest.new, digest.resolved) == (3, 2, 1)
    assert (digest.overdue, digest.became_overdue) == (2, 1)
    assert digest.first_response.median == pytest.approx(86400)
    assert "Open: 3    Overdue: 2 (1 since the last digest)" in text
    assert "1 new" not in text
    assert "2 new, 1 resolved" in text
    assert "First response, last 30 days: median 1d 0h" in text
    assert "Resolution, last 30 days: median 9d 22h" in text
    assert "OVERDUE" in html


def test_the_age_chart_counts_open_tickets_per_bucket(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, story, _ = owner
    ann = story.customer("Ann", "ann@customer.example", at=NOW)
    for age in (
        timedelta(hours=2),
        timedelta(days=2),
        timedelta(days=2),
        timedelta(days=40),
    ):
        story.ticket(ann, NOW - age)

    digest = digest_of(parts)
    _, html = render(digest)

    assert [(b.label, b.count, b.percent) for b in digest.buckets] == [
        ("under 1 day", 1, 50),
        ("1-3 days", 2, 100),
        ("3-7 days", 0, 0),
        ("1-2 weeks", 0, 0),
        ("2-4 weeks", 0, 0),
        ("over 4 weeks", 1, 50),
    ]
    assert 'width="100%"><tr><td height="14"' in html
    assert "<img" not in html
    assert "<script" not in html


def test_the_mailbox_line_reconciles_arrived_and_imported(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, _, _ = owner
    with parts.engine.begin() as connection:
        connection.execute(
            insert(MailboxTally),
            [
                {
                    "mailbox": "support",
                    "day": "2026-03-03",
                    "on_server": 5,
                    "imported": 5,
                    "waiting": 0,
                    "checked_at": NOW,
                },
                {
                    "mailbox": "support",
                    "day": "2026-03-04",
                    "on_server": 3,
                    "imported": 1,
                    "waiting": 1,
                    "checked_at": NOW,
                },
                {
                    "mailbox": "old",
                    "day": "2026-02-01",
                    "on_server": 9,
                    "imported": 9,
                    "waiting": 0,
                    "checked_at": NOW,
                },
            ],
        )

    text, html = render(digest_of(parts))

    assert "Mailbox support since 03 Mar: 8 arrived, 6 imported, 1 waiting" in text
    assert "Mailbox support since 03 Mar: 8 arrived, 6 imported, 1 waiting" in html
    assert "Mailbox old" not in text


def test_without_mailboxes_the_line_says_so(owner: tuple[Parts, Story, Path]) -> None:
    parts, _, _ = owner

    text, _ = render(digest_of(parts))

    assert "Mailboxes: no mailboxes" in text


def test_the_digest_is_one_multipart_email_with_text_and_html(
    owner: tuple[Parts, Story, Path],
) -> None:
    parts, story, _ = owner
    story.ticket(story.customer("Ann", "ann@customer.example", at=NOW), NOW)

    mail = digest_email(parts.settings, parts.clock, digest_of(parts))

    parsed = message_from_bytes(mail.raw, policy=policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert mail.recipients == ["owner@example.com"]
    assert "Open: 1" in body(parsed)


def test_two_thousand_open_tickets_render(owner: tuple[Parts, Story, Path]) -> None:
    parts, story, _ = owner
    story.many(2000, NOW)

    started = time.perf_counter()
    digest = digest_of(parts)
    text, html = render(digest)
    took = time.perf_counter() - started

    assert digest.open == 2000
    assert html.count("<tr") > 2000
    assert text.count("\n#") == 2000
    assert took < 5, f"2,000 tickets took {took:.2f} s"


# -- the command line ---------------------------------------------------------------


def test_intake_digest_preview_writes_html_and_sends_nothing(
    owner: tuple[Parts, Story, Path], tmp_path: Path
) -> None:
    parts, story, config = owner
    story.ticket(story.customer("Ann", "ann@customer.example", at=NOW), NOW)
    html_file = tmp_path / "digest.html"

    shown = run_cli(config, "digest", "--preview", "--html", str(html_file))

    assert "Open: 1" in shown.stdout
    assert "<h1>Support digest</h1>" in html_file.read_text()
    assert outgoing(parts, "digest") == []


def test_intake_digest_send_delivers_it_now(owner: tuple[Parts, Story, Path]) -> None:
    parts, story, config = owner
    story.ticket(story.customer("Ann", "ann@customer.example", at=NOW), NOW)

    sent = run_cli(config, "digest", "--send")

    assert "digest sent" in sent.stdout
    [mail] = outgoing(parts, "digest")
    assert "Open: 1" in body(mail)
    delivered = list((parts.settings.outbox_maildir / "new").iterdir())
    assert len(delivered) == 1


# -- in a real browser --------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing; tests/run.sh installs it under CI")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def headless(
    browser: str, profile: Path, *arguments: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def png_rows(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and the raw scanlines of a PNG (8-bit RGB or RGBA)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        content = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = content
        elif kind == b"IDAT":
            chunks.append(content)
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert (depth, colour) in ((8, 2), (8, 6)), "unexpected PNG format"
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels + 1
    return width, height, [raw[i * stride : (i + 1) * stride] for i in range(height)]


def test_a_real_browser_renders_the_digest_with_the_oldest_ticket_first(
    owner: tuple[Parts, Story, Path], tmp_path: Path
) -> None:
    browser = chromium()
    parts, story, _ = owner
    ann = story.customer("Ann <b>Customer</b>", "ann@customer.example", at=NOW)
    for age in (1, 5, 12, 30):
        story.ticket(ann, NOW - timedelta(days=age), subject=f"Opened {age} days ago")
    oldest = digest_of(parts).rows[0].number
    page = tmp_path / "digest.html"
    page.write_text(render(digest_of(parts))[1], encoding="utf-8")
    picture = tmp_path / "digest.png"

    headless(
        browser,
        tmp_path / "profile",
        f"--screenshot={picture}",
        "--window-size=1200,900",
        page.as_uri(),
    )
    dom = headless(
        browser, tmp_path / "profile-dom", "--dump-dom", page.as_uri()
    ).stdout

    width, height, rows = png_rows(picture)
    assert (width, height) == (1200, 900)
    # Something is drawn: many distinct scanlines, not a blank page.
    assert len(set(rows)) > 100
    # As the browser parsed it: the first ticket row is the oldest ticket,
    # and the customer's markup stayed text.
    first_row = dom.split('<table class="tickets"', 1)[1].split("</tr>")[1]
    assert f"#{oldest}</td>" in first_row
    assert "Opened 30 days ago" in first_row
    assert "Ann &lt;b&gt;Customer&lt;/b&gt;" in first_row


@pytest.mark.parametrize(
    "days", [["mon", "tue", "wed", "thu", "fri"], ["sat"], ["tue", "sun"]]
)
def test_no_target_takes_longer_than_the_longest_bound(days: list[str]) -> None:
    plan = targets(working_days=days)
    start = datetime(2026, 3, 1, 0, 30, tzinfo=BERLIN)

    longest = max(
        plan.due(opened, priority, None) - opened
        for opened in (start + timedelta(hours=5 * step) for step in range(400))
        for priority in ("low", "normal", "high", "urgent")
    )

    assert longest <= plan.longest()
