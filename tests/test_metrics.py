"""The owner's numbers against values computed by hand on a fixed data set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from intake.clock import FrozenClock
from intake.config import load_settings
from intake.daemon import Parts, prepare
from store import metrics
from tests.conftest import run_cli
from tests.owner import Story, owner_config

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SINCE = T0 - timedelta(days=1)
UNTIL = T0 + timedelta(days=10)
HOUR = 3600.0
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([], 0.5, None),
        ([7.0], 0.9, 7.0),
        ([1.0, 2.0], 0.5, 1.5),
        ([3.0, 1.0, 2.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0.9, 3.7),  # position 0.9 × 3 = 2.7
        ([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0], 0.9, 91.0),
    ],
)
def test_percentiles_interpolate_between_ranks(
    values: list[float], fraction: float, expected: float | None
) -> None:
    assert metrics.percentile(values, fraction) == pytest.approx(expected)


def test_nps_with_five_promoters_three_passives_and_two_detractors_is_30() -> None:
    nps = metrics.Nps.of([9, 10, 9, 10, 9, 7, 8, 7, 3, 6])

    assert (nps.promoters, nps.passives, nps.detractors) == (5, 3, 2)
    assert nps.score == pytest.approx(30.0)


def test_csat_counts_four_and_five_as_satisfied_with_the_mean_beside_it() -> None:
    csat = metrics.Csat.of([5, 4, 3, 5, 1])

    assert (csat.count, csat.satisfied) == (5, 3)
    assert csat.percent == pytest.approx(60.0)
    assert csat.mean == pytest.approx(3.6)


def test_no_answers_give_no_score_rather_than_zero() -> None:
    assert metrics.Nps.of([]).score is None
    assert metrics.Csat.of([]).percent is None


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[tuple[Parts, Path]]:
    """The fixed data set; the comments give the values each ticket adds.

    Dana answers ticket 1 in 1 h and ticket 4 in 4 h; Eli ticket 2 in 2 h
    (his internal note and an auto-reply before that do not count). Ticket 3
    only ever got the acknowledgement. Ticket 2 is resolved, reopened and
    resolved again 48 h after it was opened.
    """
    config = owner_config(tmp_path, digest={"timezone": "Europe/Berlin"})
    parts = prepare(load_settings(config, environ={}), FrozenClock(T0))
    story = Story(parts)
    dana = story.agent("Dana Agent", "dana@example.com")
    eli = story.agent("Eli Agent", "eli@example.com")
    ann = story.customer("Ann Customer", "ann@customer.example", at=T0)
    h = timedelta(hours=1)

    # Ticket 1: first response 1 h, resolved after 5 h, 2 touches.
    one = story.ticket(ann, T0, assignee=dana)
    story.acknowledged(one, T0 + timedelta(minutes=1))
    story.agent_replies(one, T0 + h, dana)
    story.command(one, T0 + 5 * h, "dana@example.com")
    story.resolve(one, T0 + 5 * h)

    # Ticket 2: first response 2 h, resolved 48 h after opening, reopened once.
    two = story.ticket(ann, T0 + h, assignee=eli)
    story.acknowledged(two, T0 + h)
    story.note(two, T0 + 1.5 * h, eli)
    story.machine_mail(two, T0 + timedelta(hours=1, minutes=40))
    story.agent_replies(two, T0 + 3 * h, eli)
    story.resolve(two, T0 + 26 * h)
    story.customer_writes(two, T0 + 30 * h)
    story.reopen(two, T0 + 30 * h)
    story.agent_replies(two, T0 + 31 * h, eli)
    story.resolve(two, T0 + 49 * h)

    # Ticket 3: only the acknowledgement went out; still open.
    three = story.ticket(ann, T0 + 2 * h)
    story.acknowledged(three, T0 + 2 * h)

    # Ticket 4, by SMS: a failed reply, then one sent after 4 h; resolved
    # after 6 h with two commands: 3 touches.
    four = story.ticket(ann, T0 + 3 * h, channel="sms", assignee=dana)
    story.agent_replies(four, T0 + 4 * h, dana, status="failed")
    story.agent_replies(four, T0 + 7 * h, dana)
    story.command(four, T0 + 8 * h, "dana@example.com")
    story.command(four, T0 + 9 * h, "dana@example.com")
    story.resolve(four, T0 + 9 * h)

    # Survey answers in the period, on tickets resolved long before it.
    old = T0 - timedelta(days=10)
    for scale, scores in (
        ("nps", [9, 10, 9, 10, 9, 7, 8, 7, 3, 6]),
        ("csat", [5, 4, 3, 5, 1]),
    ):
        for score in scores:
            surveyed = story.ticket(ann, old)
            story.resolve(surveyed, old + h)
            story.survey(surveyed, scale, score, T0 + 50 * h)

    yield parts, config
    parts.engine.dispose()


def figures(report: dict[str, Any], agent: str | None = None) -> dict[str, Any]:
    if agent is None:
        return dict(report["overall"])
    return next(row for row in report["agents"] if row["agent"] == agent)


def run_report(parts: Parts) -> dict[str, Any]:
    with parts.engine.connect() as connection:
        return metrics.report(connection, SINCE, UNTIL, BERLIN)


def test_first_response_counts_agent_replies_only(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    overall = figures(report)["first_response"]
    assert overall["count"] == 3  # ticket 3 has only an acknowledgement
    assert overall["median"] == pytest.approx(2 * HOUR)
    assert overall["p90"] == pytest.approx(3.6 * HOUR)  # 2 h + 0.8 × (4 h − 2 h)
    dana = figures(report, "Dana Agent")["first_response"]
    assert (dana["median"], dana["p90"]) == pytest.approx((2.5 * HOUR, 3.7 * HOUR))
    assert figures(report, "Eli Agent")["first_response"]["median"] == 2 * HOUR


def test_resolution_time_runs_to_the_last_resolution_across_a_reopen(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    resolution = figures(report)["resolution"]
    assert resolution["count"] == 3
    assert resolution["median"] == pytest.approx(6 * HOUR)
    assert resolution["p90"] == pytest.approx(39.6 * HOUR)  # 6 h + 0.8 × 42 h
    assert figures(report, "Eli Agent")["resolution"]["median"] == 48 * HOUR


def test_touches_are_agent_replies_plus_commands(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    overall = figures(report)
    assert overall["touches"]["median"] == pytest.approx(2.0)
    assert overall["touches"]["p90"] == pytest.approx(2.8)
    assert overall["touches_mean"] == pytest.approx(7 / 3)
    assert figures(report, "Dana Agent")["touches"]["median"] == pytest.approx(2.5)


def test_reopen_rate_is_the_share_of_resolved_tickets_reopened(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    overall = figures(report)
    assert (overall["resolved"], overall["reopened"]) == (3, 1)
    assert overall["reopen_rate"] == pytest.approx(100 / 3)
    assert figures(report, "Eli Agent")["reopen_rate"] == pytest.approx(100.0)


def test_nps_and_csat_come_with_their_answer_counts(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    overall = figures(report)
    assert overall["nps"] == {
        "count": 10,
        "promoters": 5,
        "passives": 3,
        "detractors": 2,
        "score": pytest.approx(30.0),
    }
    assert overall["csat"]["count"] == 5
    assert overall["csat"]["percent"] == pytest.approx(60.0)
    assert overall["csat"]["mean"] == pytest.approx(3.6)
    assert figures(report, "(unassigned)")["nps"]["count"] == 10


def test_volume_is_counted_per_local_day_and_channel(
    dataset: tuple[Parts, Path],
) -> None:
    report = run_report(dataset[0])

    assert report["volume"] == [
        {"day": "2026-03-02", "channel": "email", "tickets": 3},
        {"day": "2026-03-02", "channel": "sms", "tickets": 1},
    ]


def test_a_period_without_tickets_reports_counts_of_zero(
    dataset: tuple[Parts, Path],
) -> None:
    with dataset[0].engine.connect() as connection:
        report = metrics.report(
            connection, T0 + timedelta(days=30), T0 + timedelta(days=31), BERLIN
        )

    overall = figures(report)
    assert overall["first_response"] == {"count": 0, "median": None, "p90": None}
    assert overall["nps"]["score"] is None
    assert report["volume"] == []


def test_intake_report_prints_the_same_numbers_as_json_and_as_text(
    dataset: tuple[Parts, Path],
) -> None:
    _, config = dataset
    period = ("--since", "2026-03-01", "--until", "2026-03-11")

    as_json = json.loads(run_cli(config, "report", *period, "--json").stdout)
    text = run_cli(config, "report", *period).stdout

    assert as_json["overall"]["first_response"]["median"] == 2 * HOUR
    assert as_json["overall"]["nps"]["score"] == pytest.approx(30.0)
    assert as_json["timezone"] == "Europe/Berlin"
    assert "first response    median 2h 0m, 90th percentile 3h 36m (3 tickets)" in text
    assert "NPS               +30 (10 answers: 5 promoters" in text
    assert "CSAT              60% satisfied, mean 3.60 (5 answers)" in text
    assert "reopen rate       33% (1 of 3 resolved)" in text
    assert "Dana Agent <dana@example.com>" in text
