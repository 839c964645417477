"""Every real-world message goes through SMTP and `intake import`: no crash,
none lost, and sending them all again creates nothing new."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    CORPUS,
    DaemonProcess,
    corpus_files,
    crlf,
    free_port,
    run_cli,
    write_config,
)

pytestmark = [pytest.mark.corpus, pytest.mark.slow]


def accounted(config: Path) -> dict[str, int]:
    """Every stored message is on a ticket, machine mail, or quarantined."""
    stats = json.loads(run_cli(config, "stats", "--json").stdout)
    messages = json.loads(run_cli(config, "messages", "list", "--json").stdout)
    held = json.loads(run_cli(config, "quarantine", "list", "--json").stdout)

    for message in messages:
        assert message["ticket"] is not None or message["classification"] != "human"
    for entry in held:
        assert entry["reason"].strip()
    assert stats["received"] == len(messages)
    assert stats["quarantined"] == len(held)
    return stats


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """The daemon on its default size limit: the corpus holds a 1.5 MB mail."""
    port = free_port()
    config = write_config(
        tmp_path, smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]}
    )
    process = DaemonProcess(config, port, tmp_path / "daemon.log")
    process.start()
    yield process
    process.stop()


def test_every_corpus_file_survives_smtp(daemon: DaemonProcess) -> None:
    files = corpus_files()

    def send_all() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as client:
            for path in files:
                reply = client.sendmail(
                    "corpus@customer.example",
                    ["support@example.com"],
                    crlf(path.read_bytes()),
                )
                assert reply == {}, path

    send_all()
    first = accounted(daemon.config)
    # Identical files in the corpus count as duplicates of each other.
    assert first["received"] + first["quarantined"] + first["duplicates"] == len(files)

    send_all()
    second = accounted(daemon.config)
    assert second["received"] == first["received"]
    assert second["tickets"] == first["tickets"]
    assert second["quarantined"] == first["quarantined"]
    assert second["duplicates"] >= len(files) - first["quarantined"]


def test_every_corpus_file_survives_import(tmp_path: Path) -> None:
    files = corpus_files()
    config = write_config(tmp_path, smtp={"domains": ["example.com"]})

    run_cli(config, "import", *map(str, files))
    first = accounted(config)
    # Identical files in the corpus count as duplicates of each other.
    assert first["received"] + first["quarantined"] + first["duplicates"] == len(files)

    run_cli(config, "import", str(CORPUS))
    second = accounted(config)
    assert second["received"] == first["received"]
    assert second["tickets"] == first["tickets"]
    assert second["quarantined"] == first["quarantined"]
