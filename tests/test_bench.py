"""Every benchmark script still runs: each with a tiny load (``--small``),
exit status 0 and its table printed. No timing is asserted here; the
figures live in bench/README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))

pytestmark = pytest.mark.slow


def run_small(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), "--small"],
        capture_output=True,
        text=True,
        cwd=BENCH.parent,
        timeout=600,
        check=False,
    )


def test_there_is_a_script_for_every_figure() -> None:
    names = {path.stem for path in SCRIPTS}

    assert {
        "smtp_throughput",
        "smtp_latency",
        "import_speed",
        "imap_speed",
        "memory",
        "start_time",
        "two_daemons",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_the_script_runs_with_a_tiny_load_and_prints_its_table(
    script: Path,
) -> None:
    done = run_small(script)

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    if done.stdout.startswith("skipped:"):
        pytest.skip(done.stdout.strip())
    # print_table draws a rule of dashes under each table's header.
    assert any(
        line and set(line.replace(" ", "")) == {"-"}
        for line in done.stdout.splitlines()
    ), done.stdout
    assert "FAILED" not in done.stdout, done.stdout
