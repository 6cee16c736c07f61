"""The stand-alone scripts in benchmarks/ run end to end at toy sizes, so an API change cannot break them
unnoticed (the pytest benchmark files run in CI step 2)."""

import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampler_quality_digits_runs(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sampler_quality_digits.py"), "--outdir", str(tmp_path),
           "--kimg", "0.064", "--num", "8", "--steps", "2", "--rtol", "0.5", "--samplers", "euler", "dpm_adaptive",
           "--classifier-epochs", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| euler") or
            line.startswith("| dpm_adaptive")]
    assert [r[1].strip() for r in rows] == ["euler", "dpm_adaptive"]
    assert int(rows[0][3]) == 2  # network evaluations: one per Euler step
    assert int(rows[1][3]) > 2   # the adaptive sampler's rejected and accepted steps
    assert all(math.isfinite(float(r[4])) and float(r[4]) > 0 for r in rows)
