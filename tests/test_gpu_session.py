"""The one-call GPU script (tools/gpu_session.sh) and its benchmark driver (tools/gpu_bench.py), checked on the
CPU: the script parses, its plan fits the 8-minute budget, it stops at the first failed stage and prints the
summary table last, and the benchmark driver runs its logic on tiny shapes. FASTDIFF_REQUIRE_CUDA's rule
(tests/conftest.py) is checked too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(*args, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env), cwd=ROOT)


@needs_bash
def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@needs_bash
def test_dry_run_fits_the_budget():
    r = _run("--dry-run")
    assert r.returncode == 0, r.stderr
    stages = re.findall(r"^  (\w+)\s+expected\s+(\d+) s, limit\s+(\d+) s", r.stdout, re.M)
    assert [s for s, _, _ in stages] == ["env", "build", "test", "smoke", "sanitize", "bench"]
    total = sum(int(e) for _, e, _ in stages)
    assert total <= 480 and f"total expected {total} s" in r.stdout
    assert all(int(lim) <= 300 for _, _, lim in stages)


@needs_bash
def test_stops_at_first_failed_stage(tmp_path):
    r = _run(OUT=str(tmp_path), GPU_SESSION_STUB="1", GPU_SESSION_FAIL="test")
    assert r.returncode == 1
    assert "=== smoke" not in r.stdout  # nothing after the failed stage runs
    table = r.stdout[r.stdout.index("| stage | result |"):]
    assert "| build | ok |" in table and "| test | FAILED" in table
    for s in ("smoke", "sanitize", "bench"):
        assert f"| {s} | not run |" in table
    assert r.stdout.rstrip().endswith("gpu_session: stopped at the failed stage 'test'")  # the summary is last
    files = os.listdir(tmp_path)
    assert "summary.txt" in files and len(files) <= 8


@needs_bash
def test_all_stages_pass_and_real_failure(tmp_path):
    r = _run(OUT=str(tmp_path), GPU_SESSION_STUB="1")
    assert r.returncode == 0 and "every stage passed" in r.stdout
    # Not stubbed: a stage whose command fails (no such python) fails the session, unknown stages are refused.
    r = _run("smoke", "bench", OUT=str(tmp_path / "b"), PYTHON="false")
    assert r.returncode == 1 and "| bench | not run |" in r.stdout
    assert _run("nonsense").returncode == 2


def test_gpu_bench_dry_run_and_bad_group(tmp_path):
    tool = os.path.join(ROOT, "tools", "gpu_bench.py")
    r = subprocess.run([sys.executable, tool, "--out", str(tmp_path), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "max-autotune-no-cudagraphs" in r.stdout
    r = subprocess.run([sys.executable, tool, "--out", str(tmp_path), "--group", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown group" in r.stderr


def test_gpu_bench_quick_on_cpu(tmp_path):
    from fastdiff import ops

    if not ops.HAS_EXTENSION:
        pytest.skip("needs the compiled extension (the attention kernel)")
    tool = os.path.join(ROOT, "tools", "gpu_bench.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, tool, "--out", str(tmp_path), "--device", "cpu", "--quick", "--group",
                        "attention"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["records"] and data["not_run"] == []
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu_bench: ") and any(line.startswith("| attention |") for line in lines)


def test_require_cuda_turns_cuda_skips_into_failures(monkeypatch):
    monkeypatch.setattr(conftest, "REQUIRE_CUDA", False)
    assert not conftest.cuda_skip_is_failure("needs a CUDA GPU and the compiled extension")
    monkeypatch.setattr(conftest, "REQUIRE_CUDA", True)
    assert conftest.cuda_skip_is_failure("needs a CUDA GPU and the compiled extension")
    assert conftest.cuda_skip_is_failure("no GPU")
    assert not conftest.cuda_skip_is_failure("needs scipy")
    assert not conftest.cuda_skip_is_failure("needs two GPUs")


def test_require_cuda_refuses_to_start_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    env = dict(os.environ, FASTDIFF_REQUIRE_CUDA="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_gpu_session.py"),
                        "-k", "dry_run_fits"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "FASTDIFF_REQUIRE_CUDA=1" in r.stdout + r.stderr
