"""Agent replies to notifications as mail clients write them, with what the
customer should receive from each.

Each sample is the text part as ``parse_email`` hands it over (line ends
normalised). ``kept`` is what must remain after quoted text and signatures
are stripped. Lines in ``either`` (sign-offs such as "Best," or the agent's
first name) may stay or go; every other line must match exactly.

Written for these tests in the shapes Gmail, Outlook (desktop, web,
mobile), Apple Mail (macOS, iOS), Thunderbird and Yahoo produce; the
quoted part is an Intake notification.
"""

from __future__ import annotations

from typing import NamedTuple


class Sample(NamedTuple):
    name: str
    text: str
    kept: str
    either: tuple[str, ...] = ()


QUOTED_NOTIFICATION = """\
> Ticket [#12] Printer on fire: new, open, unassigned
> From: Ann Customer <ann@customer.example>
>
> Hello, my printer is on fire.
>
> --
> Reply above this line; the customer gets your words, not the quote."""

NOTIFICATION = "\n".join(line[2:] for line in QUOTED_NOTIFICATION.splitlines())

SAMPLES: list[Sample] = [
    Sample(
        "gmail, top-posted",
        "Hi Ann,\n\nI have sent a replacement fuser; it should arrive on "
        "Thursday.\n\nBest,\nBob\n\nOn Mon, Mar 2, 2026 at 10:04\u202fAM Example "
        "Support <support+12.3f9a2c41@example.com> wrote:\n\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "Hi Ann,\n\nI have sent a replacement fuser; it should arrive on Thursday.",
        ("Best,", "Bob"),
    ),
    Sample(
        "gmail, attribution wrapped over two lines",
        "Thanks Ann, the refund is on its way.\n\nOn Mon, 2 Mar 2026 at 10:04, "
        "Example Support <\nsupport+12.3f9a2c41@example.com> wrote:\n\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "Thanks Ann, the refund is on its way.",
    ),
    Sample(
        "outlook desktop, -----Original Message-----",
        "Ann's order shipped this morning, tracking number 1Z999AA10123456784."
        "\n\nCarol\n\n-----Original Message-----\nFrom: Example Support "
        "<support+12.3f9a2c41@example.com> \nSent: Monday, March 2, 2026 10:04 AM"
        "\nTo: Carol Agent <carol@example.com>\nSubject: [#12] Printer on fire\n\n"
        + NOTIFICATION
        + "\n",
        "Ann's order shipped this morning, tracking number 1Z999AA10123456784.",
        ("Carol",),
    ),
    Sample(
        "outlook mobile, rule and header block",
        "We can replace it under warranty.\n\nGet Outlook for iOS"
        "<https://aka.ms/o0ukef>\n________________________________\nFrom: "
        "Example Support <support+12.3f9a2c41@example.com>\nSent: Monday, March 2,"
        " 2026 10:04:11 AM\nTo: Dan Agent <dan@example.com>\nSubject: [#12] "
        "Printer on fire\n\n" + NOTIFICATION + "\n",
        "We can replace it under warranty.",
    ),
    Sample(
        "outlook web, header block without a separator",
        "I have asked the courier to collect the parcel tomorrow.\n\nKind "
        "regards,\nCarol\n\nFrom: Example Support <support@example.com>\nSent: 02 "
        "March 2026 10:04\nTo: Carol Agent <carol@example.com>\nSubject: [#12] "
        "Printer on fire\n\n" + NOTIFICATION + "\n",
        "I have asked the courier to collect the parcel tomorrow.",
        ("Kind regards,", "Carol"),
    ),
    Sample(
        "outlook, signature block with contact details",
        "I've escalated this to our courier and will write again by Friday.\n\n"
        "Kind regards,\n\nCarol Agent\nCustomer Care | Example Ltd\nT: +44 20 7946"
        " 0000\nwww.example.com\n\n-----Original Message-----\nFrom: Example "
        "Support <support@example.com>\nSent: Monday, March 2, 2026 10:04 AM\nTo:"
        " Carol Agent <carol@example.com>\nSubject: [#12] Printer on fire\n\n"
        + NOTIFICATION
        + "\n",
        "I've escalated this to our courier and will write again by Friday.",
        (
            "Kind regards,",
            "Carol Agent",
            "Customer Care | Example Ltd",
            "T: +44 20 7946 0000",
            "www.example.com",
        ),
    ),
    Sample(
        "apple mail, iPhone",
        "Yes, we open at 9 tomorrow.\n\nSent from my iPhone\n\n> On 2 Mar 2026, "
        "at 10:04, Example Support <support+12.3f9a2c41@example.com> wrote:\n>\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "Yes, we open at 9 tomorrow.",
    ),
    Sample(
        "apple mail, macOS",
        "The invoice is attached again; sorry for the trouble.\n\nDan\n\nOn Mar 2,"
        " 2026, at 10:04 AM, Example Support <support+12.3f9a2c41@example.com> "
        "wrote:\n\n" + QUOTED_NOTIFICATION + "\n",
        "The invoice is attached again; sorry for the trouble.",
        ("Dan",),
    ),
    Sample(
        "thunderbird, signature after dash-dash-space",
        "Please print a test page and tell me what it shows.\n\n-- \nEve Agent\n"
        "Example Ltd, Support\n\nOn 02/03/2026 10:04, Example Support wrote:\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "Please print a test page and tell me what it shows.",
    ),
    Sample(
        "yahoo",
        "Your replacement ships today.\n\n    On Monday, March 2, 2026 at 10:04:00"
        " AM GMT, Example Support <support+12.3f9a2c41@example.com> wrote:\n\n"
        + "\n".join("  " + line[2:] for line in QUOTED_NOTIFICATION.splitlines())
        + "\n",
        "Your replacement ships today.",
    ),
    Sample(
        "no quote at all",
        "Thanks, that is done.\n",
        "Thanks, that is done.",
    ),
    Sample(
        "a list with hyphens is not a signature",
        "Please try these steps:\n- unplug the printer\n- wait ten seconds\n- plug "
        "it back in\n\nOn Mon, Mar 2, 2026 at 10:04 AM Example Support "
        "<support@example.com> wrote:\n" + QUOTED_NOTIFICATION + "\n",
        "Please try these steps:\n- unplug the printer\n- wait ten seconds\n- plug "
        "it back in",
    ),
    Sample(
        "command only, gmail",
        "#resolve\n\nOn Mon, Mar 2, 2026 at 10:04 AM Example Support "
        "<support+12.3f9a2c41@example.com> wrote:\n\n" + QUOTED_NOTIFICATION + "\n",
        "#resolve",
    ),
    Sample(
        "commands then text, outlook",
        "#assign carol\n#priority high\nCarol will take this one today.\n\n"
        "-----Original Message-----\nFrom: Example Support <support@example.com>\n"
        "Sent: Monday, March 2, 2026 10:04 AM\nSubject: [#12] Printer on fire\n\n"
        + NOTIFICATION
        + "\n",
        "#assign carol\n#priority high\nCarol will take this one today.",
    ),
    Sample(
        "internal note, apple mail",
        "#note\nCalled Ann; she says it works now.\n\nSent from my iPad\n\n> On 2 "
        "Mar 2026, at 10:04, Example Support <support@example.com> wrote:\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "#note\nCalled Ann; she says it works now.",
    ),
    Sample(
        "german outlook",
        "Ich kümmere mich heute darum.\n\nViele Grüße\nFrank\n\nVon: Example "
        "Support <support@example.com>\nGesendet: Montag, 2. März 2026 10:04\nAn:"
        " Frank Agent <frank@example.com>\nBetreff: [#12] Printer on fire\n\n"
        + NOTIFICATION
        + "\n",
        "Ich kümmere mich heute darum.",
        ("Viele Grüße", "Frank"),
    ),
    Sample(
        "german gmail",
        "Das Ersatzteil ist unterwegs.\n\nAm Mo., 2. März 2026 um 10:04 Uhr "
        "schrieb Example Support <support@example.com>:\n\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "Das Ersatzteil ist unterwegs.",
    ),
    Sample(
        "french gmail",
        "Le remboursement est en cours.\n\nLe lun. 2 mars 2026 à 10:04, Example "
        "Support <support@example.com> a écrit :\n\n" + QUOTED_NOTIFICATION + "\n",
        "Le remboursement est en cours.",
    ),
    Sample(
        "gmail, text with a quoted line of its own after the answer",
        "Ann wrote earlier that it happened twice:\n\n> it happened twice\n\nI "
        "have asked the vendor.\n\nOn Mon, Mar 2, 2026 at 10:04 AM Example "
        "Support <support@example.com> wrote:\n" + QUOTED_NOTIFICATION + "\n",
        "Ann wrote earlier that it happened twice:\n\n> it happened twice\n\nI "
        "have asked the vendor.",
    ),
    Sample(
        "android gmail, sent-from line",
        "On my way to the customer now.\n\nSent from my Android phone\n\nOn Mon, "
        "Mar 2, 2026, 10:04 Example Support <support@example.com> wrote:\n\n"
        + QUOTED_NOTIFICATION
        + "\n",
        "On my way to the customer now.",
    ),
]
