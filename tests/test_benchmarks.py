"""Smoke tests: every benchmark script's --quick mode runs and prints its table.

No timing is asserted: the figures are for reading, not for passing or failing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


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
    rows = json.loads(out.read_text())
    assert rows, "the JSON output is empty"
