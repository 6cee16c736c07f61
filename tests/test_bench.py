"""``fastdiff bench``: the harness, the peak table, the records, the agreement of what it compares, bad input."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from fastdiff import cli
from fastdiff.bench import Options, device_info, format_case, run, run_case
from fastdiff.bench.suites import CASES, SUITES, Case
from fastdiff.bench.timing import Device, gpu_peaks, summarize, time_interleaved

FAST = ["--quick", "--rounds", "2", "--min-time", "0", "--max-time", "5", "--no-progress"]


def test_gpu_peak_table():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert gpu_peaks("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert gpu_peaks("NVIDIA H200") == (989.0, 4800.0)
    assert gpu_peaks("NVIDIA A100-SXM4-80GB") == (312.0, 2039.0)
    assert gpu_peaks("NVIDIA L40S")[0] == 362.0  # not the L40's row
    assert gpu_peaks("Some Future GPU") == (None, None)


def test_device_info_cpu_and_errors():
    dev = device_info("cpu", peak_gbps=50.0)
    assert dev.type == "cpu" and dev.peak_gbps == 50.0 and dev.threads >= 1
    with pytest.raises(ValueError, match="expected cpu or cuda"):
        device_info("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            device_info("cuda")


def test_interleaved_timing_counts_every_round():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    times = time_interleaved({"a": a, "b": b}, Device("cpu", "cpu"), warmup=1, rounds=3, block_s=0, settle_s=0)
    assert [len(t) for t in times.values()] == [3, 3]
    assert calls["a"] == calls["b"] == 1 + 1 + 3  # warm-up, the calibration call, three rounds
    s = summarize([3.0, 1.0, 2.0])
    assert s["median_s"] == 2.0 and s["min_s"] == 1.0 and s["samples"] == 3


def test_cpu_turns_pause_and_rewarm_before_each_block():
    """On the CPU each timed block follows a pause (other implementations' spinning thread pools settle) and one
    untimed call of its own; a single implementation gets neither by default."""
    import time

    log = []
    fns = {name: (lambda name=name: log.append((name, time.perf_counter()))) for name in ("a", "b")}
    times = time_interleaved(fns, Device("cpu", "cpu"), warmup=1, rounds=3, block_s=0, settle_s=0.01)
    assert [len(t) for t in times.values()] == [3, 3]
    assert [n for n, _ in log].count("a") == 1 + 1 + 2 * 3  # warm-up, calibration, (re-warm + timed) x 3
    rounds = log[4:]  # after both implementations' warm-up and calibration calls
    assert [n for n, _ in rounds] == ["a", "a", "b", "b"] * 3
    gaps = [t1 - t0 for (n0, t0), (n1, t1) in zip(rounds, rounds[1:]) if n0 != n1]
    assert len(gaps) == 5 and min(gaps) >= 0.01  # every switch of implementation waits settle_s
    calls = []
    time_interleaved({"a": lambda: calls.append(1)}, Device("cpu", "cpu"), warmup=1, rounds=3, block_s=0)
    assert len(calls) == 1 + 1 + 3
    # Short calls: a block lasts at least the pause (about 10 calls of 1 ms for a 10 ms pause), not 1 ms.
    sleepy = {name: (lambda name=name: (calls.append(name), time.sleep(1e-3))) for name in ("a", "b")}
    calls.clear()
    time_interleaved(sleepy, Device("cpu", "cpu"), warmup=1, rounds=3, block_s=1e-3, settle_s=0.01)
    assert 1 + 1 + 3 * (1 + 4) <= calls.count("a") <= 1 + 1 + 3 * (1 + 10)


def test_record_speedup_and_percent_of_peak():
    import time

    def slow():
        time.sleep(0.004)

    def fast():
        time.sleep(0.001)

    case = Case("ops", "sleep", {"slow": slow, "fast": fast}, "GB/s", work=1e9)
    rec = run_case(case, Device("cpu", "cpu", peak_gbps=1000.0), rounds=3, min_time=0, warmup=1)
    slow_r, fast_r = rec["results"]
    assert slow_r["speedup"] == 1.0 and fast_r["speedup"] > 1.5
    assert fast_r["pct_of"] == "BW" and fast_r["pct"] == pytest.approx(100 * fast_r["throughput"] / 1000.0)
    table = format_case(rec)
    assert "| slow |" in table and "% peak" in table and table.count("\n|") == 4  # header, rule, two rows


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_agrees_with_its_baseline(suite):
    """The quick cases compute the same thing on both sides (float32): a benchmark of a wrong kernel, or of a
    baseline that does other work, would show here."""
    opt = Options(quick=True)
    dev = device_info("cpu")
    records = run([suite], opt, dev, progress=False, rounds=1, min_time=0, max_time=5, warmup=1)
    assert records and all(r["suite"] == suite for r in records)
    for rec in records:
        assert [r["impl"] for r in rec["results"]][0] in ("reference", "plain", "torch clone")
        for r in rec["results"]:
            assert r["median_s"] > 0 and r["throughput"] > 0
        if "agreement" in rec:
            errs = [float(e) for e in re.findall(r" (\d\.\d+e[-+]\d+)", rec["agreement"])]
            assert errs and max(errs) < 1e-4, rec["agreement"]


def test_cli_writes_json_atomically(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "ops", "network", "--json", str(out), *FAST]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"]["type"] == "cpu" and doc["options"]["suites"] == ["ops", "network"]
    suites = {r["suite"] for r in doc["records"]}
    assert suites == {"ops", "network"}
    net = [r for r in doc["records"] if r["suite"] == "network"][0]
    assert net["unit"] == "img/s" and net["flops"] > 0  # FLOPs counted on the plain network
    assert [r["impl"] for r in net["results"]] == ["plain", "fastdiff"]
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]  # no temporary left behind
    assert "**network: denoiser forward tiny-16" in capsys.readouterr().out


def test_cli_bad_input(capsys):
    assert cli.main(["bench", "nosuchsuite", *FAST]) == 2
    assert "expected some of: ops, attention" in capsys.readouterr().err
    assert cli.main(["bench", "network", "--presets", "nosuchpreset", *FAST]) == 2
    assert "--presets" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--batch", "0", *FAST]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["bench", "ops", "--device", "cuda", *FAST]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err  # the one device check of every command


def test_cases_are_registered_for_every_suite():
    assert set(CASES) == set(SUITES)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_tools_do_not_rot():
    """tools/cuda_smoke.py (the compute-sanitizer driver) runs its calls on the CPU kernels here, and
    tools/gpu_session.sh at least parses; on a GPU machine both run for real (issue 9)."""
    import subprocess
    import sys

    from fastdiff import ops

    if not ops.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    env = dict(os.environ, FASTDIFF_SMOKE_DEVICE="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_smoke.py")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every kernel ran" in out.stdout and "cosine_attention" in out.stdout
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "gpu_session.sh")]).returncode == 0


# --- peers (fastdiff.bench.peers): the plain network exported to ONNX and run by other runtimes ------------------

def test_peers_parse_and_bad_names(capsys):
    from fastdiff.bench.peers import parse_peers

    assert parse_peers("onnxruntime, OpenVINO,onnxruntime") == ("onnxruntime", "openvino")
    assert parse_peers(None) == () and parse_peers("") == ()
    with pytest.raises(ValueError, match="expected some of: onnxruntime, openvino"):
        parse_peers("onnxruntime,tensorrt")
    assert cli.main(["bench", "network", "--peers", "tensorrt", *FAST]) == 2
    assert "--peers: unknown peer(s) tensorrt" in capsys.readouterr().err


def test_missing_peer_is_skipped_with_the_install_hint(monkeypatch):
    from fastdiff.bench import peers

    monkeypatch.setattr(peers, "_has", lambda module: False)
    runners, notes = peers.peer_runners(None, (), ("onnxruntime", "openvino"), threads=1)  # nothing exported
    assert runners == {}
    assert len(notes) == 2 and all("fastdiff[peers]" in n and "not installed" in n for n in notes)
    assert notes[0].startswith("onnxruntime skipped") and notes[1].startswith("openvino skipped")
    monkeypatch.setattr(peers, "_has", lambda module: module != "onnx")
    assert peers.missing("openvino") == "openvino skipped: onnx not installed (" + peers.INSTALL["openvino"] + ")"


@pytest.mark.parametrize("peer", ["onnxruntime", "openvino"])
def test_peer_runs_the_plain_network(peer, one_thread):
    """One peer, once through, on the tiny preset: its output is the plain network's (float32 rounding), and the
    case times it beside fastdiff and the plain network. Skips where the peer or onnx is not installed."""
    pytest.importorskip(peer, reason=f"{peer} not installed (pip install 'fastdiff[peers]')")
    pytest.importorskip("onnx", reason="onnx (the exporter's dependency) not installed")
    (case,) = list(CASES["network"](Options(quick=True, batch=1, peers=(peer,))))
    names = list(case.impls)
    assert names[:2] == ["plain", "fastdiff"] and len(names) == 3 and names[2].startswith(peer + " ")
    with torch.no_grad():
        want, got = case.impls["plain"](), case.impls[names[2]]()
    assert got.shape == want.shape and got.dtype == torch.float32
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert err < 1e-5, err
    rec = run_case(case, device_info("cpu"), rounds=1, min_time=0, warmup=1)
    assert [r["impl"] for r in rec["results"]] == names and all(r["median_s"] > 0 for r in rec["results"])
    assert f"{names[2]} " in rec["agreement"] and "ONNX" in "; ".join(rec["notes"])
