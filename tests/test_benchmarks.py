"""Smoke tests: every benchmark script's --quick mode runs, prints its table and writes JSON
with the columns the standards ask for (shape, implementation, median ms, GFLOP/s, peak MiB,
torch version, device).

No timing is asserted: the figures are for reading, not for passing or failing. These tests
are marked ``bench`` and left out of ``make test`` (which stays lean); ``make smoke`` runs them
and ``.ci/run`` runs both.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))

pytestmark = pytest.mark.bench


def test_every_benchmark_is_smoke_tested():
    assert "bench_attention.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_prints_a_table_and_json(script, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in proc.stdout and "ms" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    env, rows = report["environment"], report["results"]
    assert env["torch"].startswith("2.") and env["device"], env
    assert rows, "the JSON has no result rows"
    for row in rows:
        assert "impl" in row or "backend" in row, row
        assert "gflops" in row and "peak_mib" in row, row
        ms = row["median_ms"]
        assert ms is None or (math.isfinite(ms) and ms > 0), row
    assert any(row["median_ms"] for row in rows), "no row was timed"
