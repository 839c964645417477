#!/usr/bin/env bash
# The test suite, from a fresh Debian machine with only Python 3.11 and root:
# installs what the tests need (a virtualenv, Dovecot for the IMAP tests,
# systemd-analyze for the unit files), starts PostgreSQL, then runs pytest
# twice: on SQLite, then on PostgreSQL (every test on a fresh database).
# Under CI=true a PostgreSQL that does not answer fails the run.
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

# Chromium renders the digest's HTML in a headless browser test.
if ! command -v chromium >/dev/null; then
    apt_install chromium || echo "tests/run.sh: Chromium missing; the browser test is skipped (fails under CI)" >&2
fi

# The unit files are checked with systemd-analyze.
if ! command -v systemd-analyze >/dev/null; then
    apt_install systemd || echo "tests/run.sh: systemd-analyze missing; unit tests will fail" >&2
fi

# PostgreSQL tests use 127.0.0.1:5432 when a server is installed.
if ! command -v pg_lsclusters >/dev/null && [ "${CI:-}" = true ]; then
    apt_install postgresql || echo "tests/run.sh: PostgreSQL missing" >&2
fi
if command -v pg_lsclusters >/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
    done
fi

PG_URL=${TEST_STORE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
pg_answers() {
    # A server just started may take a few seconds to take connections.
    .venv/bin/python -c '
import sys, time
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1])
for _ in range(30):
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(1)
' "$PG_URL" 2>/dev/null
}

status=0
start=$SECONDS
echo "== pytest on SQLite"
TEST_STORE_URL='' .venv/bin/python -m pytest "$@" || status=$?
echo "== SQLite run: $((SECONDS - start)) s"

start=$SECONDS
if pg_answers; then
    echo "== pytest on PostgreSQL ($PG_URL)"
    TEST_STORE_URL=$PG_URL .venv/bin/python -m pytest "$@" || status=$?
    echo "== PostgreSQL run: $((SECONDS - start)) s"
elif [ "${CI:-}" = true ]; then
    echo "tests/run.sh: PostgreSQL at $PG_URL does not answer; CI needs it" >&2
    status=1
else
    echo "tests/run.sh: no PostgreSQL at $PG_URL; the PostgreSQL run is skipped" >&2
fi
exit "$status"
