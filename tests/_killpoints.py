"""Kill points without timing: run a ``fastdiff`` command in a subprocess that SIGKILLs itself at a chosen
point of its work (a patched function), as a crash or ``kill -9`` there would; then a test reruns the command
and checks what the rerun makes of the leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

_PRELUDE = """
import fnmatch, os, signal, sys
def _kill():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_at_replace(pattern: str, nth: int = 1) -> str:
    """Patch code: die at the ``nth`` ``os.replace`` whose destination's name matches ``pattern`` (fnmatch),
    before it renames: a temporary written in full but never given its name (what a kill mid-write leaves)."""
    return f"""
_replace, _seen = os.replace, [0]
def _patched(src, dst, *a, **k):
    if fnmatch.fnmatch(os.path.basename(os.fspath(dst).rstrip("/")), {pattern!r}):
        _seen[0] += 1
        if _seen[0] == {nth}:
            _kill()
    return _replace(src, dst, *a, **k)
os.replace = _patched
"""


def kill_at_call(module: str, attr: str, nth: int = 1, when: str = "True") -> str:
    """Patch code: die at the ``nth`` call of ``module.attr`` for which the expression ``when`` (over the call's
    ``args``) holds, before the call runs."""
    return f"""
import importlib
_mod = importlib.import_module({module!r})
_orig, _seen = getattr(_mod, {attr!r}), [0]
def _patched(*args, **kwargs):
    if {when}:
        _seen[0] += 1
        if _seen[0] == {nth}:
            _kill()
    return _orig(*args, **kwargs)
setattr(_mod, {attr!r}, _patched)
"""


def run_killed(argv, patch: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fastdiff argv...`` in a subprocess with ``patch`` applied first; asserts that it was killed there."""
    code = _PRELUDE + textwrap.dedent(patch) + "\nfrom fastdiff.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    return proc
