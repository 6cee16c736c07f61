"""``fastdiff bench``: run the benchmark suites on this machine (see ``fastdiff.bench``)."""

from __future__ import annotations

import json
import sys
import time

import torch

from fastdiff._runtime import DTYPE_NAMES
from fastdiff.bench.suites import SUITES

_DTYPES = [name for name, dtype in DTYPE_NAMES.items() if dtype != torch.float64]


def add_arguments(parser) -> None:
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"which suites to run, of: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="activation dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every suite (default: per suite)")
    parser.add_argument("--presets", default=None,
                        help="comma-separated network presets for the network / training suites; for sampling the "
                             "first is the main network and the last the guide (default: per device)")
    parser.add_argument("--steps", type=int, default=32, help="sampler steps (default: 32)")
    parser.add_argument("--compile", default=None,
                        help="also time torch.compile of the plain-PyTorch baseline with this mode: none, default, "
                             "max-autotune, reduce-overhead (default: 'default' on CUDA, none on the CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test that runs in seconds")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per case at least (default: 10)")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds each implementation is timed at least (default: 0.2)")
    parser.add_argument("--max-time", type=float, default=60.0,
                        help="stop timing a case after this many seconds (at least two rounds; default: 60)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, TFLOP/s, for utilization (default: known GPUs' datasheet)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's memory bandwidth, GB/s (default: known GPUs' datasheet)")
    parser.add_argument("--peers", default=None,
                        help="network suite: also time the plain network exported to ONNX in these runtimes, of: "
                             "onnxruntime, openvino (comma-separated; needs `pip install 'fastdiff[peers]'`; a "
                             "missing one is skipped with the install hint)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every record (all samples) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from fastdiff.bench import Options, device_info, format_case, run
    from fastdiff.bench.suites import check_suites

    suites = list(args.suites) or list(SUITES)
    try:
        check_suites(suites)
    except ValueError as exc:
        print(f"fastdiff bench: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("fastdiff bench: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        dev = device_info(args.device, args.peak_tflops, args.peak_gbps)
    except (RuntimeError, ValueError) as exc:
        print(f"fastdiff bench: {exc}", file=sys.stderr)
        return 2
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else (torch.bfloat16 if dev.is_cuda else torch.float32)
    compile_mode = args.compile or ("default" if dev.is_cuda else "none")
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip()) if args.presets else None
    if presets:
        from fastdiff.nn import get_preset

        for p in presets:
            try:
                get_preset(p)
            except (KeyError, ValueError) as exc:
                print(f"fastdiff bench: --presets: {exc}", file=sys.stderr)
                return 2
    if args.batch is not None and args.batch < 1:
        print("fastdiff bench: --batch must be at least 1", file=sys.stderr)
        return 2
    from fastdiff.bench.peers import missing, parse_peers

    try:
        peers = parse_peers(args.peers)
    except ValueError as exc:
        print(f"fastdiff bench: --peers: {exc}", file=sys.stderr)
        return 2
    for peer in peers:
        why = missing(peer)
        if why:
            print(f"fastdiff bench: {why}", file=sys.stderr)
    opt = Options(device=args.device, dtype=dtype, batch=args.batch, presets=presets, compile=compile_mode,
                  quick=args.quick, steps=args.steps, peers=peers)
    from fastdiff import __version__, ops

    kernels = "fused kernels" if ops.HAS_EXTENSION else "NO compiled extension (reference ops only)"
    header = (f"fastdiff {__version__} bench on {dev.describe()}; {kernels}; dtype {str(dtype).replace('torch.', '')}"
              f"; torch.compile baseline: {compile_mode}")
    print(header + "\n", flush=True)
    records: list[dict] = []

    def save() -> None:
        if args.json:
            from fastdiff._atomic import atomic_open

            doc = {"fastdiff": __version__, "options": vars(args),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": dev.to_json(),
                   "dtype": str(dtype), "compile": compile_mode, "records": records}
            with atomic_open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    def on_record(record: dict) -> None:
        records.append(record)
        print(format_case(record) + "\n", flush=True)
        save()  # after every case: a crash or a timeout loses nothing measured so far

    run(suites, opt, dev, progress=not args.no_progress, on_record=on_record, rounds=args.rounds,
        min_time=args.min_time, max_time=args.max_time)
    if args.json:
        print(f"wrote {args.json}")
    return 0
