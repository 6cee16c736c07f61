"""The targeted GPU benchmark set of tools/gpu_session.sh (issue 23), sized for one device call.

    python tools/gpu_bench.py --out DIR [--device cuda] [--group ops,attention,network,sampling] [--quick]

Groups (each case times its implementations side by side, interleaved, with fastdiff.bench):
  ops        every fused elementwise op vs the plain-PyTorch reference, GB/s against a device copy of the
             same size (the bandwidth yardstick)
  attention  cosine attention at the EDM2-S shapes: fastdiff (auto: q/k/v norm kernel + SDPA on CUDA),
             our tiled kernel, SDPA after a separate norm, the einsum reference; TFLOP/s
  network    edm2-img64-s and edm2-img512-s denoiser forward, batch 64, bf16: fastdiff vs plain EDM2 and
             plain under torch.compile(mode="max-autotune-no-cudagraphs"); img/s
  sampling   32-step Heun + autoguidance + guidance interval (EDM2-S main, XS guide): plain vs fastdiff vs
             fastdiff with both networks replayed from CUDA graphs; img/s

Writes DIR/bench.json (every record, atomically) and prints one summary row per case last: the baseline,
fastdiff's time and throughput, and the speed-up. ``--device cpu --quick`` runs the same logic in seconds
(tests/test_gpu_session.py does, so the script cannot rot). ``--budget`` (seconds) stops starting new cases
once spent; a case not run is listed as such, and the exit status is 3.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GROUPS = ("ops", "attention", "network", "sampling")
COMPILE_MODE = "max-autotune-no-cudagraphs"


def cases(group: str, opt):
    from fastdiff.bench import suites

    if group == "ops":
        yield from suites.ops_cases(opt)
    elif group == "attention":
        yield from suites.attention_cases(opt)
    elif group == "network":
        from dataclasses import replace

        yield from suites.network_cases(replace(opt, compile="none" if opt.quick else COMPILE_MODE))
    elif group == "sampling":
        yield next(iter(suites.sampling_cases(opt)))  # the Heun case only (not every sampler)


def summary_row(record: dict) -> str:
    res = record["results"]
    base = res[0]
    ours = [r for r in res if r["impl"].startswith("fastdiff")]
    best = min(ours, key=lambda r: r["median_s"]) if ours else base
    return (f"| {record['suite']} | {record['case'][:70]} | {base['impl']} {base['throughput']:.4g} | "
            f"{best['impl']} {best['throughput']:.4g} {record['unit']} | {base['median_s'] / best['median_s']:.2f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for bench.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--group", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a logic check, seconds)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds; no new case starts after (default 240)")
    p.add_argument("--dry-run", action="store_true", help="list the groups and settings, run nothing")
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.group.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        print(f"gpu_bench: unknown group(s) {bad}; expected some of {GROUPS}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"gpu_bench: would run {groups} on {args.device} (quick={args.quick}, budget {args.budget:.0f} s, "
              f"network compile mode {COMPILE_MODE}), writing {os.path.join(args.out, 'bench.json')}")
        return 0

    from fastdiff._atomic import atomic_open
    from fastdiff.bench import Options, device_info, format_case, run_case

    torch.backends.cuda.matmul.allow_tf32 = False  # timings of what the code does, not of TF32 shortcuts
    torch.backends.cudnn.allow_tf32 = False
    dev = device_info(args.device)
    dtype = torch.bfloat16 if dev.is_cuda else torch.float32
    opt = Options(device=args.device, dtype=dtype, compile="none", quick=args.quick, steps=32)
    timing = dict(rounds=3, min_time=0.02, max_time=2.0) if args.quick else dict(rounds=5, min_time=0.1, max_time=15.0)
    t0 = time.monotonic()
    records, skipped = [], []
    for group in groups:
        for case in cases(group, opt):
            if time.monotonic() - t0 > args.budget:
                skipped.append(f"{group}: {case.name}")
                continue
            record = run_case(case, dev, **timing)
            records.append(record)
            print(format_case(record) + "\n", flush=True)
            del case
            gc.collect()
            if dev.is_cuda:
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with atomic_open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"device": dev.to_json(), "dtype": str(dtype), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "records": records, "not_run": skipped}, f, indent=1)
    print("| suite | case | baseline | best fastdiff | speed-up |\n|---|---|---|---|---|")
    for r in records:
        print(summary_row(r))
    for s in skipped:
        print(f"| not run (budget) | {s} | | | |")
    print(f"gpu_bench: {len(records)} case(s) in {time.monotonic() - t0:.0f} s")
    return 3 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
