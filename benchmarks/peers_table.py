"""fastdiff against the plain EDM2 network, ONNX Runtime and OpenVINO on the CPU: the table of BENCHMARKS.md.

Every case is ``fastdiff bench network --peers onnxruntime,openvino`` (fastdiff.bench.suites.network_cases):
the four implementations on the same weights and inputs, timed in turns in this one process, float32, each
checked against the plain network. Per thread count, ``torch.mm`` on 2048x2048 float32 matrices and
fastdiff's own micro-kernel in cache (a 512 -> 512 1x1 convolution over sixteen 8x8 maps, where it reaches the
core's FMA rate: on AMD Zen 2 MKL's product runs at about 3/4 of it) give the GEMM yardsticks that GFLOP/s are
read against (``bench_conv.blas_gflops`` / ``own_gemm_gflops``; FLOPs: torch's FLOP counter on the plain
network, i.e. the direct-convolution count).

    PYTHONPATH=. python benchmarks/peers_table.py                       # the issue's cases, 1 and 2 threads
    PYTHONPATH=. python benchmarks/peers_table.py --cases small-32:1 --threads 1 --json out.json

Needs ``pip install 'fastdiff[peers]'`` (a missing peer is left out of the table, with the install hint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

CASES = ("small-32:1", "small-32:8", "edm2-img64-s:1", "edm2-img512-s:1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="preset:batch,... (default: %(default)s)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    ap.add_argument("--peers", default="onnxruntime,openvino")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--max-time", type=float, default=120.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from bench_conv import blas_gflops, own_gemm_gflops  # this folder, first on the path as a script

    from fastdiff.bench import device_info, format_case, run_case
    from fastdiff.bench.peers import missing, parse_peers
    from fastdiff.bench.suites import Options, network_cases

    peers = parse_peers(args.peers)
    for p in peers:
        if missing(p):
            print(missing(p), file=sys.stderr)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    load = os.getloadavg()
    cpu = device_info("cpu").name
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"{cpu} ({platform.machine()}), torch {torch.__version__}, load average {load[0]:.1f} at start, "
          f"OMP_WAIT_POLICY {wait}\n")
    if load[0] > os.cpu_count() and wait.lower() != "passive":
        print("note: the machine is busy; torch's and fastdiff's OpenMP threads spin at every barrier, which on busy "
              "cores costs whole time slices (10-50x at 2 threads here): OMP_WAIT_POLICY=PASSIVE avoids that\n")
    rows, records = [], []
    for th in threads:
        torch.set_num_threads(th)
        peak = blas_gflops(rounds=5)
        own = own_gemm_gflops(torch.randn(16, 512, 8, 8), torch.randn(512, 512), rounds=5)
        own_s = f"; fastdiff's 1x1 product (512 -> 512, 16 x 8 x 8, in cache): {own:.0f}" if own else ""
        print(f"torch.mm 2048^3 float32, {th} thread(s): {peak:.0f} GFLOP/s{own_s}\n", flush=True)
        for preset, batch in cases:
            torch.set_num_threads(th)
            (case,) = list(network_cases(Options(presets=(preset,), batch=batch, peers=peers)))
            rec = run_case(case, device_info("cpu"), rounds=args.rounds, min_time=args.min_time,
                           max_time=args.max_time)
            rec.update(threads=th, mm_gflops=peak, kernel_gflops=own, load=os.getloadavg()[0])
            records.append(rec)
            print(format_case(rec) + "\n", flush=True)
            med = {r["impl"].split(" ")[0]: r["median_s"] for r in rec["results"]}
            fd = med["fastdiff"]
            gflops = rec["flops"] / fd / 1e9 if rec.get("flops") else float("nan")
            ratio = {k: (f"{v / fd:.2f}x" if k in med else "-") for k, v in med.items()}
            pct = f"{100 * gflops / peak:.0f}%" + (f" / {100 * gflops / own:.0f}%" if own else "")
            rows.append((f"{preset}, batch {batch}", th, f"{fd * 1e3:.1f} ms", f"{gflops:.0f} ({pct})",
                         ratio.get("plain", "-"), ratio.get("onnxruntime", "-"), ratio.get("openvino", "-")))
            del case
    print("| case | threads | fastdiff | GFLOP/s (% of torch.mm / of fastdiff's product) | vs plain eager | vs ONNX Runtime "
          "| vs OpenVINO |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        from fastdiff._atomic import atomic_open

        with atomic_open(args.json, "w") as f:
            json.dump({"cpu": cpu, "torch": torch.__version__, "omp_wait_policy": wait, "records": records}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
