"""Bounded fuzzing of the safe reader (fastdiff.io.safe_pickle / edm2_pickle): random and mutated opcode
streams from real official-format pickles and torch.save files. For every input the reader must either
load it or raise one of its own errors (SafePickleError); no other exception, no crash, no code from the
file run (an env-marker payload and a marker file are among the seeds), no module imported on the file's
behalf. The loop is seeded (the same inputs on every run) and runs in a child process, so a segfault or
an abort is a test failure, not a dead pytest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_edm2_pickle import MARK_ENV, Evil, Persistent, mirror, official_globals  # noqa: E402

from fastdiff import nn as fnn  # noqa: E402

ITERATIONS = int(os.environ.get("FASTDIFF_FUZZ_ITERATIONS", "5000"))


def _seeds(marker) -> list[bytes]:
    """Small real files: official-format records (protocols 2, 4, 5), torch.save zip and legacy state dicts,
    and payloads that would run code (a module_src that sets MARK_ENV and writes ``marker``, os.system)."""
    torch.manual_seed(0)
    conv = fnn.MPConv(3, 4, kernel=(3, 3))
    fourier = fnn.MPFourier(8)
    payload = f"import os\nos.environ[{MARK_ENV!r}] = '1'\nopen({str(marker)!r}, 'w').write('ran')\n"
    out = []
    with official_globals() as g:
        for protocol in (2, 4, 5):
            tree = g.EasyDict(
                ema=mirror(conv, torch.float16, payload, {}),
                fourier=mirror(fourier, torch.float32, "# src\n", {}),
                loss_fn=Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs=dict(P_mean=-0.4), P_mean=-0.4)),
                dataset_kwargs=g.EasyDict(path="x.zip", use_labels=True, shape=(3, 16), tags={"a", "b"},
                                          frozen=frozenset({1, 2}), scale=np.float32([1.5, 2.5]),
                                          res=np.int64(64)),
                blob=b"\x00\x01" * 8, evil=Evil(os.system, f"touch {marker}"))
            out.append(pickle.dumps(tree, protocol=protocol))
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3, dtype=torch.float16),
             "view": torch.arange(10.0)[2:8:2], "n": torch.tensor(7)}
    for legacy in (False, True):
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
        out.append(buf.getvalue())
    return out


_CHILD = textwrap.dedent(r"""
    import json, os, pickletools, random, sys
    seeds = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
    path, iterations = sys.argv[1], int(sys.argv[2])
    from fastdiff.io import SafePickleError, load_any_network, load_edm2_pickle
    from fastdiff.io.safe_pickle import read_plain

    OPS = [op for op in pickletools.opcodes]

    def random_stream(rng):
        out = bytearray(b"\x80" + bytes([rng.choice([2, 3, 4, 5])]))
        for _ in range(rng.randint(1, 40)):
            op = rng.choice(OPS)
            out += op.code.encode("latin1")
            arg = op.arg
            if arg is None:
                continue
            n = arg.n
            if n > 0:
                out += bytes(rng.getrandbits(8) for _ in range(n))
            elif n == pickletools.UP_TO_NEWLINE:
                out += rng.choice([b"0", b"1", b"-3", b"torch", b"os", b"system", b"builtins", b"x" * 5]) + b"\n"
            elif n == pickletools.TAKEN_FROM_ARGUMENT1:
                k = rng.randint(0, 8); out += bytes([k]) + bytes(rng.getrandbits(8) for _ in range(k))
            elif n == pickletools.TAKEN_FROM_ARGUMENT4:
                k = rng.choice([0, 3, 8, 2**31 - 1]); out += k.to_bytes(4, "little") + b"abc"
            elif n == pickletools.TAKEN_FROM_ARGUMENT4U:
                k = rng.choice([0, 3, 2**32 - 1]); out += k.to_bytes(4, "little") + b"abc"
            elif n == pickletools.TAKEN_FROM_ARGUMENT8U:
                k = rng.choice([0, 3, 2**40, 2**63 - 1]); out += k.to_bytes(8, "little") + b"abc"
            else:  # string-ish with quotes: UP_TO_NEWLINE covers the rest
                out += b"'x'\n"
        return bytes(out + b".")

    def mutate(rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(7)
            i = rng.randrange(len(data)) if data else 0
            if kind == 0 and data:  # flip bytes
                data[i] ^= 1 << rng.randrange(8)
            elif kind == 1:  # insert random bytes
                data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
            elif kind == 2:  # delete a slice
                del data[i:i + rng.randint(1, 64)]
            elif kind == 3:  # duplicate a slice
                j = rng.randrange(len(data) + 1)
                data[j:j] = data[i:i + rng.randint(1, 256)]
            elif kind == 4:  # truncate
                del data[i:]
            elif kind == 5:  # splice in part of another seed
                other = rng.choice(seeds)
                k = rng.randrange(len(other))
                data[i:i + rng.randint(0, 64)] = other[k:k + rng.randint(1, 256)]
            elif kind == 6 and len(data) >= 8:  # overwrite what may be a length or an index with a big value
                data[i:i + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff"])
        return bytes(data)

    def attempt(data, full):
        with open(path, "wb") as f:
            f.write(data)
        try:
            if full:
                load_edm2_pickle(path)
            else:
                read_plain(path)
            return "loaded"
        except SafePickleError:
            return "refused"

    for s in seeds:  # warm-up: every seed loads or is refused, and imports what loading needs
        attempt(s, True)
    modules = set(sys.modules)
    rng = random.Random(1234)
    counts = {"loaded": 0, "refused": 0}
    for it in range(iterations):
        data = random_stream(rng) if rng.random() < 0.25 else mutate(rng, rng.choice(seeds))
        try:
            counts[attempt(data, full=rng.random() < 0.3)] += 1
        except BaseException as exc:
            print(json.dumps({"failure": it, "type": type(exc).__name__, "message": str(exc)[:500],
                              "data": data[:2000].hex()}), flush=True)
            raise SystemExit(3)
    print(json.dumps({"counts": counts, "new_modules": sorted(set(sys.modules) - modules)}), flush=True)
""")


@pytest.fixture
def isolated_env():
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_fuzzed_pickles_are_loaded_or_refused_never_crash(tmp_path, isolated_env):
    marker = tmp_path / "payload-ran.txt"
    seeds = _seeds(marker)
    child = ("import resource\n"
             "try: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
             "except (ValueError, OSError): pass\n" + _CHILD)
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "fuzz.pkl"), str(ITERATIONS)],
                          input=json.dumps([s.hex() for s in seeds]), capture_output=True, text=True,
                          env=isolated_env, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in lines if "failure" in r]
    assert not failures, f"a fuzzed input escaped as {failures[0]['type']}: {failures[0]['message']}\n" \
                         f"input (hex): {failures[0]['data'][:400]}"
    assert proc.returncode == 0 and lines, f"the child died ({proc.returncode}): {proc.stderr[-3000:]}"
    summary = lines[-1]
    counts = summary["counts"]
    assert counts["loaded"] + counts["refused"] == ITERATIONS
    assert counts["loaded"] > 0 and counts["refused"] > 0  # the mutations exercise both outcomes
    # nothing was imported on a file's behalf, no payload ran
    own = ("numpy", "torch", "fastdiff", "encodings")  # lazy imports of the reader itself (codecs, numpy dtypes)
    assert not [m for m in summary["new_modules"] if not m.startswith(own)], summary
    assert not marker.exists() and MARK_ENV not in os.environ
