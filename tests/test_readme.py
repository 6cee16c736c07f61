"""Runs the README's tour: every fenced block right after a `<!-- readme-test -->` marker, in order, in
one scratch folder (later blocks use what earlier ones wrote), so the README cannot rot."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test -->\s*\n```(bash|python)\n(.*?)```", re.S)


def readme_blocks():
    blocks = BLOCK.findall(README.read_text())
    return [pytest.param(lang, code, id=f"{i}-{lang}-{code.split()[1] if lang == 'bash' else 'snippet'}")
            for i, (lang, code) in enumerate(blocks)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder shared by the blocks, and an environment whose PATH has `fastdiff` and `torchrun`
    from this Python (a shim runs `python -m fastdiff` where the package is not installed)."""
    root = tmp_path_factory.mktemp("readme")
    bindir = root / "_bin"
    bindir.mkdir()
    shim = bindir / "fastdiff"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fastdiff "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bindir), os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add overhead
    return root, env


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in text, f"README.md lost its {marker} block (.ci/run reads it)"
    assert len(BLOCK.findall(text)) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("lang,code", readme_blocks())
def test_readme_block(workdir, lang, code):
    root, env = workdir
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"README block failed:\n{code}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
