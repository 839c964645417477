"""Running under systemd: the unit files, the notify protocol, socket
activation, and a SIGTERM in the middle of SMTP traffic."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.config import load_settings, split_host_port
from intake.errors import ConfigError
from intake.sdnotify import Notifier, listen_sockets, watchdog_interval
from tests.conftest import (
    REPO,
    DaemonProcess,
    crlf,
    free_port,
    make_mail,
    run_cli,
    write_config,
)

UNITS = REPO / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; tests/run.sh installs it")
        pytest.skip("systemd-analyze is not installed")
    return found


# -- the unit files -----------------------------------------------------------


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: this system's own units,
    ours in /etc/systemd/system, and the ``intake`` entry point that
    ``pip install`` makes, at the path ExecStart names."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for unit in ("intake.service", "intake-smtp.socket"):
        shutil.copy(UNITS / unit, installed / unit)
    return root


def install_entry_point(root: Path) -> None:
    entry_point = Path(sys.executable).parent / "intake"
    target = root / "usr/local/bin/intake"
    target.parent.mkdir(parents=True)
    shutil.copy(entry_point, target)


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            systemd_analyze(),
            "verify",
            f"--root={root}",
            "intake.service",
            "intake-smtp.socket",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_files_pass_systemd_analyze_verify(unit_root: Path) -> None:
    install_entry_point(unit_root)

    result = verify(unit_root)

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_verify_fails_when_the_executable_is_missing(unit_root: Path) -> None:
    result = verify(unit_root)

    assert result.returncode != 0
    assert "/usr/local/bin/intake is not executable" in result.stderr


def test_the_service_scores_2_0_or_lower_in_systemd_analyze_security() -> None:
    # --threshold is on a 0-100 scale: 20 means an exposure of 2.0.
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            "--threshold=20",
            str(UNITS / "intake.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    found = re.search(
        r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout
    )
    assert found is not None, result.stdout + result.stderr
    assert float(found[1]) <= 2.0
    assert found[2] == "OK"
    assert result.returncode == 0


# -- the notify protocol, piece by piece ---------------------------------------


class NotifySocket:
    """The service manager's end: a datagram socket that records messages."""

    def __init__(self) -> None:
        self.name = f"@intake-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.messages]

    def wait_for(self, line: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lines().count(line) >= count:
                return
            time.sleep(0.01)
        raise AssertionError(f"no {count} x {line!r} in {self.lines()}")

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def manager() -> Iterator[NotifySocket]:
    recorder = NotifySocket()
    yield recorder
    recorder.close()


def test_notifier_sends_one_datagram_to_an_abstract_socket(
    manager: NotifySocket,
) -> None:
    notifier = Notifier(manager.name)

    assert notifier.ready("up")

    manager.wait_for("READY=1")
    assert "STATUS=up" in manager.lines()


def test_without_notify_socket_nothing_is_sent() -> None:
    assert not Notifier.from_environment({}).ready()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=42) == expected


def test_sockets_for_another_process_are_ignored_and_the_variables_cleared() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "smtp"}

    found = listen_sockets(environ, pid=os.getpid())

    assert found == {}
    assert environ == {}


# -- the daemon under a fake service manager -----------------------------------


def daemon_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "intake", "--config", str(config), "run"]


def http_port(config: Path) -> int:
    return split_host_port(load_settings(config, environ={}).http.listen)[1]


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_ready_only_once_listening_then_watchdog_then_stopping(
    tmp_path: Path, manager: NotifySocket
) -> None:
    port = free_port()
    config = write_config(
        tmp_path, smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]}
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": manager.name,
        "WATCHDOG_USEC": "400000",  # keep-alive every 0.2 s
    }
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen(
        daemon_command(config), env=env, cwd=REPO, stdout=log, stderr=log
    )
    try:
        manager.wait_for("READY=1")
        # At READY both listeners already accept connections.
        smtp_up = can_connect(port)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port(config)}/health", timeout=5
        ) as answer:
            health = json.load(answer)
        manager.wait_for("WATCHDOG=1", count=4, timeout=5)

        process.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING=1")
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()

    assert smtp_up
    assert health["status"] == "ok"
    assert code == 0
    lines = manager.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert lines.index("READY=1") < lines.index("WATCHDOG=1")


@pytest.mark.slow
def test_socket_activation_serves_smtp_on_the_passed_socket(tmp_path: Path) -> None:
    passed = socket.create_server(("127.0.0.1", 0))
    port = passed.getsockname()[1]
    config = write_config(
        tmp_path,
        smtp={"listen": f"127.0.0.1:{free_port()}", "domains": ["example.com"]},
    )
    # What systemd does between fork and exec: the socket at fd 3, and
    # LISTEN_PID naming the process that will run the daemon.
    launcher = (
        "import os, sys\n"
        f"os.dup2({passed.fileno()}, 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='smtp',"
        " LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", launcher, *daemon_command(config)[1:]],
        pass_fds=[passed.fileno()],
        cwd=REPO,
        stdout=log,
        stderr=log,
    )
    passed.close()
    try:
        deadline = time.monotonic() + 20
        while "ready:" not in (tmp_path / "daemon.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            assert process.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(
                "ann@customer.example", ["support@example.com"], crlf(make_mail())
            )
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        log.close()

    assert code == 0
    assert "listening on a socket from systemd" in (tmp_path / "daemon.log").read_text()
    listing = json.loads(run_cli(config, "tickets", "list", "--json").stdout)
    assert len(listing) == 1


# -- SIGTERM under load ---------------------------------------------------------

SENDERS = 6
PER_SENDER = 40
STOP_AFTER = 60


class Traffic:
    """What the senders saw: Message-IDs answered 250, and how they were
    turned away."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.refusals: list[str] = []
        self.enough = threading.Event()

    def sent(self, message_id: str) -> None:
        with self.lock:
            self.accepted.append(message_id)
            if len(self.accepted) >= STOP_AFTER:
                self.enough.set()

    def refused(self, how: str) -> None:
        with self.lock:
            self.refusals.append(how)


def send_until_refused(
    port: int, mails: list[tuple[str, bytes]], traffic: Traffic
) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for message_id, raw in mails:
                client.sendmail("c@customer.example", ["support@example.com"], raw)
                traffic.sent(message_id)
    except smtplib.SMTPResponseException as exc:
        traffic.refused(str(exc.smtp_code))
    except smtplib.SMTPRecipientsRefused as exc:
        traffic.refused(" ".join(str(c) for c, _ in exc.recipients.values()))
    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        traffic.refused(type(exc).__name__)


@pytest.mark.slow
def test_sigterm_under_smtp_load_stores_every_accepted_message_once(
    daemon: DaemonProcess,
) -> None:
    batches = [
        [
            (
                f"term-{s}-{n}@customer.example",
                crlf(
                    make_mail(
                        sender=f"Customer {s} <c{s}@customer.example>",
                        subject=f"Question {s}/{n}",
                        message_id=f"<term-{s}-{n}@customer.example>",
                    )
                ),
            )
            for n in range(PER_SENDER)
        ]
        for s in range(SENDERS)
    ]
    traffic = Traffic()
    threads = [
        threading.Thread(target=send_until_refused, args=(daemon.port, batch, traffic))
        for batch in batches
    ]

    for thread in threads:
        thread.start()
    assert traffic.enough.wait(120), "too little accepted before the stop"
    started = time.monotonic()
    code = daemon.stop(signal.SIGTERM, timeout=30)
    stop_seconds = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    accepted, refusals = traffic.accepted, traffic.refusals

    stored = Counter(
        row["message_id"]
        for row in json.loads(daemon.cli("messages", "list", "--json").stdout)
    )
    assert code == 0
    assert stop_seconds < 30  # the unit's TimeoutStopSec
    assert len(accepted) < SENDERS * PER_SENDER, "the stop came too late"
    assert all(stored[message_id] == 1 for message_id in accepted)
    assert set(stored.values()) == {1}
    # Senders were told to come back later, never that their mail failed.
    assert set(refusals) <= {"421", "SMTPServerDisconnected", "ConnectionResetError"}
    assert "421" in refusals or "SMTPServerDisconnected" in refusals


# -- secrets from LoadCredential= ------------------------------------------------


def relay_with_password_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "intake.toml"
    path.write_text(
        '[outbound.relay]\nhost = "smtp.example.com"\n'
        f'username = "support@example.com"\npassword_file = "{name}"\n'
    )
    return path


def test_a_relative_password_file_is_read_from_the_credentials_directory(
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "relay-password").write_text("from-systemd\n")
    path = relay_with_password_file(tmp_path, "relay-password")

    settings = load_settings(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})

    assert settings.outbound.relay is not None
    assert settings.outbound.relay.password.get_secret_value() == "from-systemd"


def test_a_missing_credential_names_the_setting_and_the_file(tmp_path: Path) -> None:
    path = relay_with_password_file(tmp_path, "relay-password")

    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})

    assert error.value.setting == "outbound.relay"
    assert "relay-password" in str(error.value)


# -- the stop, connection by connection -------------------------------------------


def reply(connection: socket.socket) -> bytes:
    """One SMTP reply, possibly of several lines."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.slow
def test_a_message_in_data_at_sigterm_is_stored_then_the_connection_gets_421(
    daemon: DaemonProcess,
) -> None:
    raw = crlf(make_mail(message_id="<in-flight@customer.example>"))
    half = len(raw) // 2
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as conn:
        reply(conn)
        for command in (
            b"EHLO sender.example",
            b"MAIL FROM:<ann@customer.example>",
            b"RCPT TO:<support@example.com>",
            b"DATA",
        ):
            conn.sendall(command + b"\r\n")
            reply(conn)
        conn.sendall(raw[:half])

        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the daemon is stopping; this DATA is in flight
        conn.sendall(raw[half:] + b".\r\n")
        after_data = reply(conn)
        conn.sendall(b"MAIL FROM:<ann@customer.example>\r\n")
        after_stop = reply(conn)
    code = daemon.stop()  # already stopping: waits and closes the log

    assert after_data.startswith(b"250 ")
    # The 421 comes as the answer to MAIL, or unsolicited right after the
    # 250 once nothing is in flight any more (RFC 5321 3.8 allows both).
    assert re.search(rb"(^|\n)421 4\.3\.2 ", after_data + after_stop)
    assert code == 0
    stored = json.loads(daemon.cli("messages", "list", "--json").stdout)
    assert [m["message_id"] for m in stored] == ["in-flight@customer.example"]


@pytest.mark.slow
def test_an_idle_connection_is_told_421_and_closed_when_the_daemon_stops(
    daemon: DaemonProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as conn:
        reply(conn)
        conn.sendall(b"EHLO sender.example\r\n")
        reply(conn)

        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        goodbye = reply(conn)
        closed = conn.recv(1) == b""

    assert goodbye.startswith(b"421 4.3.2")
    assert closed
    assert daemon.stop() == 0
