"""Crafted network files, end to end: the library (``load_any_network``, what every ``--net`` reads) and the
command line (``fastdiff convert x.pkl out.safetensors``, ``fastdiff generate --net x.pkl``) refuse each of
them with fastdiff's own one-line error, write nothing, run nothing, and neither crash nor allocate without
bound (the cases are in tests/_crafted.py: deep dict keys, BUILD on tensors, stride-0 / overlapping views,
a zip bomb, huge declared lengths, copy and expansion amplification, a network-size bomb, os.system).

All cases run in one child process under a 4 GiB address-space limit, so a segfault, an abort or an
allocation beyond that shows up as a failure of the case it happened in instead of taking pytest down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _crafted import CASES  # noqa: E402

MARK_ENV = "FASTDIFF_TEST_PICKLE_PAYLOAD_RAN"

_CHILD = textwrap.dedent(r"""
    import contextlib, io, json, os, pathlib, sys
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    sys.path.insert(0, sys.argv[2])
    import _crafted
    from fastdiff.cli import main
    from fastdiff.io import SafePickleError, load_any_network

    root = pathlib.Path(sys.argv[1])
    for name, (write, _regex) in _crafted.CASES.items():
        d = root / name
        d.mkdir()
        src = d / f"{name}.pkl"
        write(src)
        rec = {"case": name}
        try:
            load_any_network(src)
            rec["api"] = None
        except Exception as exc:
            rec["api"] = [type(exc).__name__, isinstance(exc, SafePickleError), str(exc)]
        for cmd, argv in (("convert", ["convert", str(src), str(d / "out" / "net.safetensors")]),
                          ("generate", ["generate", "--net", str(src), "--outdir", str(d / "imgs"), "--seeds", "0",
                                        "--steps", "1", "--batch", "1", "--device", "cpu", "--no-progress"])):
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = main(argv)
                except SystemExit as exc:
                    rc = exc.code
                except BaseException as exc:
                    rc = f"raised {type(exc).__name__}: {exc}"
            rec[cmd] = [rc, err.getvalue(), out.getvalue()]
        rec["written"] = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p != src)
        print(json.dumps(rec), flush=True)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, env=env, timeout=300)
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            got[rec["case"]] = rec
    return got, proc, root


def _child_report(proc):
    return f"child exited with {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("case", list(CASES))
def test_library_refuses_crafted_file(results, case):
    got, proc, _root = results
    assert case in got, f"{case}: the reader crashed or hung ({_child_report(proc)})"
    api = got[case]["api"]
    assert api is not None, f"{case}: load_any_network accepted the file"
    kind, ours, message = api
    assert ours, f"{case}: {kind} is not one of fastdiff's SafePickleError types: {message}"
    assert re.search(CASES[case][1], message), f"{case}: unexpected message: {message}"
    assert "\n" not in message and len(message) < 600


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["convert", "generate"])
def test_cli_refuses_crafted_file(results, case, command):
    got, proc, _root = results
    assert case in got, f"{case}: the command crashed or hung ({_child_report(proc)})"
    rc, err, out = got[case][command]
    assert rc == 2, f"{case}: fastdiff {command} returned {rc!r}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdiff {command}: error: "), err
    assert re.search(CASES[case][1], lines[0]), lines[0]
    assert "Traceback" not in err and not out.strip()
    assert got[case]["written"] == [], f"{case}: files were left behind: {got[case]['written']}"


def test_no_payload_ran(results):
    got, _proc, root = results
    assert "os_system" in got
    assert not (root / "os_system" / "MARKER_FILE").exists()
    assert MARK_ENV not in os.environ
