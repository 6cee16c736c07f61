"""``fastdiff bench``: fastdiff against plain PyTorch, side by side in one run, on the machine at hand.

    fastdiff bench                                   # every suite, on the CPU (float32)
    fastdiff bench network sampling --device cuda    # bf16 on the GPU, EDM2-S shapes at batch 64

Each case times its implementations in turns (``fastdiff.bench.timing``) and reports the median time per call,
throughput, its share of the device's peak where known, the speed-up over the plain-PyTorch baseline and, on
CUDA, peak memory. The suites are in ``fastdiff.bench.suites``.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable

import torch

from fastdiff.bench.suites import CASES, SUITES, Case, Options, check_suites
from fastdiff.bench.timing import Device, device_info, peak_memory, summarize, time_interleaved

__all__ = ["SUITES", "Case", "Options", "Device", "device_info", "run_case", "run", "format_case"]


def _throughput(case: Case, seconds: float) -> float:
    scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "img/s": 1.0}[case.unit]
    return case.work / seconds / scale


def _percent_of_peak(case: Case, seconds: float, dev: Device) -> tuple[str, float] | None:
    """('MFU' | 'of peak BW' | 'of peak', percent) where a peak is known."""
    if case.unit == "GB/s" and dev.peak_gbps:
        return "BW", 100.0 * _throughput(case, seconds) / dev.peak_gbps
    if case.unit == "TFLOP/s" and dev.peak_tflops:
        return "peak", 100.0 * _throughput(case, seconds) / dev.peak_tflops
    if case.unit == "img/s" and case.flops and dev.peak_tflops:
        return "MFU", 100.0 * case.flops / seconds / 1e12 / dev.peak_tflops
    return None


def run_case(case: Case, dev: Device, *, rounds: int = 10, min_time: float = 0.2, max_time: float = 60.0,
             warmup: int = 2) -> dict:
    """Time one case; returns its JSON record (see ``format_case`` for the table)."""
    times = time_interleaved(case.impls, dev, warmup=warmup, rounds=rounds, min_time=min_time, max_time=max_time)
    record = {"suite": case.suite, "case": case.name, "unit": case.unit, "work": case.work, "flops": case.flops,
              "notes": list(case.notes), "results": []}
    base = None
    for name, fn in case.impls.items():
        s = summarize(times[name])
        base = base or s["median_s"]
        row = {"impl": name, **s, "throughput": _throughput(case, s["median_s"]),
               "speedup": base / s["median_s"], "times_s": times[name]}
        pct = _percent_of_peak(case, s["median_s"], dev)
        if pct:
            row["pct_of"], row["pct"] = pct
        if case.flops:
            row["tflops"] = case.flops / s["median_s"] / 1e12
        if case.memory and dev.is_cuda:
            row["peak_mem_bytes"] = peak_memory(fn, dev)
        record["results"].append(row)
    if case.check is not None:
        try:
            record["agreement"] = case.check()
        except Exception as exc:  # report, don't hide: the numbers are still worth having
            record["agreement"] = f"check failed: {type(exc).__name__}: {exc}"
    return record


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.3f} s")


def format_case(record: dict) -> str:
    """A markdown table of one case's record."""
    unit = record["unit"]
    has_pct = any("pct" in r for r in record["results"])
    has_tf = unit == "img/s" and any("tflops" in r for r in record["results"])
    has_mem = any(r.get("peak_mem_bytes") is not None for r in record["results"])
    head = ["impl", "median", "IQR", unit] + (["TFLOP/s"] if has_tf else []) + (["% peak"] if has_pct else []) + \
           ["speed-up"] + (["peak mem"] if has_mem else [])
    lines = [f"**{record['suite']}: {record['case']}**", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in record["results"]:
        cells = [r["impl"], _fmt_time(r["median_s"]), _fmt_time(r["iqr_s"]), f"{r['throughput']:.4g}"]
        if has_tf:
            cells.append(f"{r['tflops']:.3g}" if "tflops" in r else "")
        if has_pct:
            cells.append(f"{r['pct']:.1f}% {r['pct_of']}" if "pct" in r else "")
        cells.append(f"{r['speedup']:.2f}x")
        if has_mem:
            m = r.get("peak_mem_bytes")
            cells.append(f"{m / 2**30:.2f} GiB" if m is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    extra = ([record["agreement"]] if record.get("agreement") else []) + record.get("notes", [])
    if extra:
        lines += ["", "; ".join(extra)]
    return "\n".join(lines)


def run(suites: Iterable[str], opt: Options, dev: Device, *, progress: bool = True,
        on_record: Callable[[dict], None] | None = None, **timing) -> list[dict]:
    """Build and time every case of ``suites``; ``on_record`` is called after each (print, save)."""
    suites = check_suites(suites)
    records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="bench", unit="case", leave=False, dynamic_ncols=True)
    try:
        for suite in suites:
            for case in CASES[suite](opt):
                if bar is not None:
                    bar.set_postfix_str(f"{suite}: {case.name[:60]}")
                record = run_case(case, dev, **timing)
                records.append(record)
                if on_record is not None:
                    on_record(record)
                if bar is not None:
                    bar.update(1)
                del case
                gc.collect()
                if dev.is_cuda:
                    torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return records
