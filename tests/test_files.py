"""File imports: folders, maildirs and mbox files, parents before replies."""

from __future__ import annotations

import json
import mailbox
from datetime import timedelta
from pathlib import Path

from channels.files import Item, collect, parents_first
from tests.conftest import START, make_mail, run_cli, write_config


def thread_of_three() -> list[bytes]:
    root = make_mail(message_id="<root@customer.example>", date=START)
    child = make_mail(
        subject="Re: Printer on fire",
        message_id="<child@customer.example>",
        in_reply_to="<root@customer.example>",
        references="<root@customer.example>",
        date=START + timedelta(hours=1),
    )
    grandchild = make_mail(
        subject="Re: Printer on fire",
        message_id="<grandchild@customer.example>",
        references="<root@customer.example> <child@customer.example>",
        date=START + timedelta(hours=2),
    )
    return [root, child, grandchild]


def test_a_folder_is_imported_parents_first_whatever_the_file_names(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "mail"
    folder.mkdir()
    root, child, grandchild = thread_of_three()
    (folder / "a.eml").write_bytes(grandchild)
    (folder / "b.eml").write_bytes(child)
    (folder / "c.eml").write_bytes(root)

    order = [item.message_id for item in collect([folder])]

    assert order == [
        "root@customer.example",
        "child@customer.example",
        "grandchild@customer.example",
    ]


def test_a_reply_dated_before_its_parent_still_comes_after_it() -> None:
    late_parent = Item("parent", bytes, 0, "p@x", [], START + timedelta(days=1))
    early_child = Item("child", bytes, 1, "c@x", ["p@x"], START)

    order = parents_first([late_parent, early_child])

    assert [item.label for item in order] == ["parent", "child"]


def test_reference_cycles_do_not_hang_the_import() -> None:
    first = Item("a", bytes, 0, "a@x", ["b@x"], START)
    second = Item("b", bytes, 1, "b@x", ["a@x"], START)

    order = parents_first([first, second])

    assert sorted(item.label for item in order) == ["a", "b"]


def test_import_of_a_shuffled_thread_makes_one_ticket(tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    folder.mkdir()
    for name, raw in zip(["3.eml", "1.eml", "2.eml"], thread_of_three(), strict=True):
        (folder / name).write_bytes(raw)
    config = write_config(tmp_path, smtp={"domains": ["example.com"]})

    run_cli(config, "import", str(folder))

    tickets = json.loads(run_cli(config, "tickets", "list", "--json").stdout)
    assert len(tickets) == 1
    assert tickets[0]["messages"] == 3


def test_mbox_and_maildir_are_read(tmp_path: Path) -> None:
    root, child, grandchild = thread_of_three()
    box = mailbox.mbox(tmp_path / "archive.mbox")
    box.add(root)
    box.add(child)
    box.close()
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    maildir.add(grandchild)

    order = [
        item.message_id
        for item in collect([tmp_path / "Maildir", tmp_path / "archive.mbox"])
    ]

    assert order == [
        "root@customer.example",
        "child@customer.example",
        "grandchild@customer.example",
    ]


def test_a_file_deep_in_long_folders_imports_and_names_its_path(
    tmp_path: Path,
) -> None:
    folder = tmp_path / ("a-rather-long-folder-name-" * 3) / ("and-another-" * 4)
    folder.mkdir(parents=True)
    (folder / "message.eml").write_bytes(b"not mail at all\n")
    (folder / "mail.eml").write_bytes(make_mail())
    config = write_config(tmp_path, smtp={"domains": ["example.com"]})

    run_cli(config, "import", str(folder))

    stats = json.loads(run_cli(config, "stats", "--json").stdout)
    held = json.loads(run_cli(config, "quarantine", "list", "--json").stdout)
    assert stats["received"] == 1
    assert len(held) == 1
    assert held[0]["source"].startswith("import:")
    assert held[0]["source"].endswith("message.eml")
