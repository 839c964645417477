"""A real Dovecot for the IMAP tests, on a free loopback port.

Each instance gets its own directory under /tmp (short, because Dovecot's
unix sockets live there and socket paths are limited to about 100 bytes),
its own configuration, a passwd-file with one user, and a maildir. Plaintext
login is allowed: the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.conftest import free_port

USER = "support"
PASSWORD = "correct horse"  # noqa: S105 (a test account on loopback)


def dovecot_binary() -> str:
    """Dovecot's path; skips, or fails under CI, when it is not installed."""
    found = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if os.access(found, os.X_OK):
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("Dovecot is missing; CI must install dovecot-imapd")
    pytest.skip("Dovecot is not installed (Debian package dovecot-imapd)")


def dovecot_version(binary: str) -> tuple[int, int]:
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    major, minor = output.split()[0].split(".")[:2]
    return int(major), int(minor)


class Dovecot:
    """One Dovecot master as a child process; ``stop`` and ``start`` again."""

    def __init__(self, binary: str, port: int, extra: str = "") -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port
        self.user = USER
        self.password = PASSWORD
        self.root = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.root.chmod(0o755)  # login and mail processes run as other users
        self.log_path = self.root / "dovecot.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._write_config(dovecot_version(binary), extra)

    # -- lifecycle ------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        with (self.root / "master.err").open("ab") as errors:
            self.process = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.root / "dovecot.conf")],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited early:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not listen in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every Dovecot process, as systemd stops the whole unit.

        Dovecot's master leaves running IMAP sessions alive when it exits,
        so the signal goes to the process group the master leads.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        with suppress(ProcessLookupError):  # sessions that outlived the master
            os.killpg(self.process.pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        parts = [self.root / "master.err", self.log_path]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    # -- as a mail client -----------------------------------------------

    @contextmanager
    def client(self) -> Iterator[IMAPClient]:
        """A logged-in connection, as another mail program would have."""
        client = IMAPClient(self.host, self.port, ssl=False, timeout=10)
        client.login(self.user, self.password)
        try:
            yield client
        finally:
            client.logout()

    def append(self, folder: str, messages: Iterable[bytes]) -> None:
        with self.client() as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            for raw in messages:
                client.append(folder, raw)

    def flags(self, folder: str) -> dict[int, tuple[bytes, ...]]:
        with self.client() as client:
            client.select_folder(folder, readonly=True)
            return dict(client.get_flags(client.search("ALL")))

    # -- configuration --------------------------------------------------

    def _write_config(self, version: tuple[int, int], extra: str) -> None:
        mail_user = _mail_user()
        home = self.root / "home"
        home.mkdir()
        os.chown(home, mail_user.pw_uid, mail_user.pw_gid)
        (self.root / "passwd").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{mail_user.pw_uid}:{mail_user.pw_gid}"
            f"::{home}::\n"
        )

        login_user, internal_user = _service_users()
        values = {
            "root": self.root,
            "port": self.port,
            "uid": mail_user.pw_uid,
            "login_user": login_user,
            "internal_user": internal_user,
        }
        template = CONFIG_24 if version >= (2, 4) else CONFIG_23
        config = template.format(**values) + extra
        (self.root / "dovecot.conf").write_text(config)


def _mail_user() -> pwd.struct_passwd:
    """Dovecot refuses mail access as root; as root, mail belongs to nobody."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    return pwd.getpwnam("nobody")


def _service_users() -> tuple[str, str]:
    if os.getuid() != 0:
        name = pwd.getpwuid(os.getuid()).pw_name
        return name, name
    return "dovenull", "dovecot"


COMMON = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
instance_name = intake-test-{port}
ssl = no
log_path = {root}/dovecot.log
auth_mechanisms = plain login xoauth2
first_valid_uid = {uid}
last_valid_uid = 0
default_login_user = {login_user}
default_internal_user = {internal_user}
mail_max_userip_connections = 100
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""

CONFIG_23 = (
    COMMON
    + """\
disable_plaintext_auth = no
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
"""
)

# Dovecot 2.4 renamed most settings; this layout follows its documentation
# and is used only where 2.4 is what the machine has.
CONFIG_24 = (
    "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n"
    + COMMON
    + """\
auth_allow_cleartext = yes
mail_driver = maildir
mail_path = ~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb passwd-file {{
  passwd_file_path = {root}/passwd
}}
userdb passwd-file {{
  passwd_file_path = {root}/passwd
}}
"""
)


@contextmanager
def running_dovecot(extra: str = "") -> Iterator[Dovecot]:
    """A started Dovecot; ``extra`` is appended to its configuration."""
    server = Dovecot(dovecot_binary(), free_port(), extra)
    server.start()
    try:
        yield server
    finally:
        server.remove()
