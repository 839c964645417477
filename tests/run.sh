#!/usr/bin/env bash
# The test suite, from a fresh Debian machine with only Python 3.11 and root:
# installs what the tests need (a virtualenv, Dovecot for the IMAP tests),
# starts PostgreSQL when it is installed, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { [ "$(id -u)" = 0 ]; }
apt_ready=""
apt_install() {
    as_root || { echo "tests/run.sh: need root to apt-get install $*" >&2; return 1; }
    [ -n "$apt_ready" ] || { apt-get update -qq; apt_ready=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# Dovecot serves the IMAP tests; they start their own on a high port.
if ! command -v dovecot >/dev/null && [ ! -x /usr/sbin/dovecot ]; then
    apt_install dovecot-imapd || echo "tests/run.sh: Dovecot missing; IMAP tests will fail" >&2
fi

# PostgreSQL tests use 127.0.0.1:5432 when a server is installed.
if command -v pg_lsclusters >/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
    done
fi

exec .venv/bin/python -m pytest "$@"
