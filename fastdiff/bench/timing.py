"""Timing and the yardsticks of ``fastdiff bench``: interleaved side-by-side timing, the device's peak
figures, and FLOP counting.

Timing: every implementation of a case is warmed up, then the implementations are timed in turns (round
robin), so that a change of load or clock on the machine hits them alike. On CUDA a timed call is bracketed
by CUDA events after a synchronize; on the CPU by ``time.perf_counter``. Very short calls are repeated
``inner`` times inside one timed block (chosen so a block lasts about a millisecond) and reported per call.

On the CPU each block starts after a short pause (``settle_s``) and, for calls under 50 ms, one untimed call:
thread pools keep spinning for milliseconds after a call (libgomp's default spin, ONNX Runtime's and
OpenVINO's pools), and without the pause the spinning threads of one implementation eat into the next one's
cores in the turn order. Measured on a 2-core host, small EDM2 network at batch 1 on 2 threads: ONNX Runtime
43 -> 33 ms and OpenVINO 46 -> 32 ms with a 50 ms pause; fastdiff unchanged. The untimed call wakes the
implementation's own sleeping threads, so a block measures back-to-back calls, as in a sampling loop; blocks
then last at least as long as the pause.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Datasheet figures: dense (no sparsity) bf16 tensor-core peak in TFLOP/s, and memory bandwidth in GB/s.
# Matched against torch.cuda.get_device_name() in order; the first entry whose words all occur wins.
# They are the vendor's numbers, not measurements; `fastdiff bench` also measures a device-to-device copy
# so that achieved bandwidth can be read against what the memory really delivers.
_GPU_PEAKS = [
    (("H200",), 989.0, 4800.0),
    (("H100", "NVL"), 835.0, 3900.0),
    (("H100", "PCIe"), 756.0, 2000.0),
    (("H100",), 989.0, 3350.0),
    (("GH200",), 989.0, 4000.0),
    (("A100", "80GB", "PCIe"), 312.0, 1935.0),
    (("A100", "80GB"), 312.0, 2039.0),
    (("A100",), 312.0, 1555.0),
    (("L40S",), 362.0, 864.0),
    (("L40",), 181.0, 864.0),
    (("L4",), 121.0, 300.0),
    (("A10",), 125.0, 600.0),
    (("RTX 4090",), 165.0, 1008.0),
    (("RTX 3090",), 71.0, 936.0),
]


@dataclass
class Device:
    """Where the benchmark runs, with the peaks that percentages are taken against (None: unknown)."""

    type: str
    name: str
    peak_tflops: float | None = None   # dense bf16 / fp16 tensor peak, TFLOP/s
    peak_gbps: float | None = None     # memory bandwidth, GB/s
    threads: int = 1

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def describe(self) -> str:
        peaks = []
        if self.peak_tflops:
            peaks.append(f"{self.peak_tflops:g} TFLOP/s bf16 dense")
        if self.peak_gbps:
            peaks.append(f"{self.peak_gbps:g} GB/s")
        extra = f" (peaks: {', '.join(peaks)})" if peaks else ""
        threads = f", {self.threads} CPU threads" if not self.is_cuda else ""
        return f"{self.name}{extra}{threads}, torch {torch.__version__}"

    def to_json(self) -> dict:
        return {"type": self.type, "name": self.name, "peak_tflops": self.peak_tflops, "peak_gbps": self.peak_gbps,
                "threads": self.threads, "torch": torch.__version__,
                "cuda": torch.version.cuda if self.is_cuda else None}


def gpu_peaks(name: str) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) datasheet peaks for a CUDA device name, or (None, None) when it is not in the table."""
    for words, tflops, gbps in _GPU_PEAKS:
        if all(w.lower() in name.lower() for w in words):
            return tflops, gbps
    return None, None


def device_info(device: str, peak_tflops: float | None = None, peak_gbps: float | None = None) -> Device:
    """Resolve ``device`` ('cpu', 'cuda', 'cuda:1'); a clear error when CUDA is asked for and absent."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__},"
                               f" built with CUDA {torch.version.cuda}); use --device cpu")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        name = torch.cuda.get_device_name(index)
        tf, gb = gpu_peaks(name)
        return Device("cuda", name, peak_tflops or tf, peak_gbps or gb)
    if dev.type != "cpu":
        raise ValueError(f"--device: expected cpu or cuda[:N], got {device!r}")
    import platform

    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Device("cpu", name, peak_tflops, peak_gbps, threads=torch.get_num_threads())


def synchronize(dev: Device) -> None:
    if dev.is_cuda:
        torch.cuda.synchronize()


def _block_seconds(fn: Callable, inner: int, dev: Device) -> float:
    """Seconds per call of ``fn`` over one block of ``inner`` calls."""
    if dev.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


SETTLE_S = 0.02  # CPU pause before each timed block (module doc); libgomp's default spin lasts milliseconds
REWARM_BELOW_S = 0.05  # calls shorter than this get one untimed call after the pause


def time_interleaved(fns: dict[str, Callable], dev: Device, *, warmup: int = 2, rounds: int = 10,
                     min_time: float = 0.0, max_time: float = 60.0, block_s: float = 1e-3,
                     settle_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per call for each of ``fns``, timed in turns: ``rounds`` rounds at least (and until each has
    run ``min_time`` seconds in total), stopping early once ``max_time`` seconds have passed after two
    rounds. ``settle_s``: the pause before each block (default ``SETTLE_S`` on the CPU with more than one
    implementation, else 0). Returns ``{name: [seconds per call, one per round]}``."""
    if settle_s is None:
        settle_s = SETTLE_S if not dev.is_cuda and len(fns) > 1 else 0.0
    if settle_s > 0 and block_s > 0:  # blocks at least as long as the pause, so it costs at most half the time
        block_s = max(block_s, settle_s)
    inner, rewarm = {}, {}
    for name, fn in fns.items():
        for _ in range(max(warmup, 1)):
            fn()
        one = _block_seconds(fn, 1, dev)
        inner[name] = max(1, min(1000, math.ceil(block_s / max(one, 1e-9))))
        rewarm[name] = settle_s > 0 and one < REWARM_BELOW_S
    times: dict[str, list[float]] = {name: [] for name in fns}
    t_start = time.perf_counter()
    done = 0
    while True:
        for name, fn in fns.items():
            if settle_s > 0:
                time.sleep(settle_s)
                if rewarm[name]:
                    fn()
            times[name].append(_block_seconds(fn, inner[name], dev))
        done += 1
        elapsed = time.perf_counter() - t_start
        if done >= 2 and elapsed > max_time:
            break
        if done >= rounds and all(sum(t) * inner[n] >= min_time for n, t in times.items()):
            break
    return times


def summarize(times: list[float]) -> dict:
    """Median, min and interquartile range (seconds) of one implementation's samples."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "iqr_s": q[2] - q[0], "samples": len(times)}


def count_flops(fn: Callable) -> float:
    """FLOPs of one call of ``fn`` as torch's FLOP counter sees them (matrix products, convolutions,
    attention: 2 per multiply-add); elementwise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_memory(fn: Callable, dev: Device) -> float | None:
    """Peak GPU memory (bytes) allocated during one call of ``fn`` above what was allocated before it."""
    if not dev.is_cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)
