"""Other CPU inference runtimes as peers of the ``network`` suite: the plain EDM2 network of
``fastdiff.bench.plain_edm2`` exported to ONNX once per shape, then run by ONNX Runtime and OpenVINO.

Those runtimes fold the per-call weight normalization into constants and fuse what they can, so they are what
a user who wants fast CPU inference would reach for; ``fastdiff bench network --peers onnxruntime,openvino``
times them in turns with fastdiff and the plain network, on the same weights and inputs, and checks each
against the plain network's output.

- ONNX Runtime: CPU execution provider, every graph optimization (``ORT_ENABLE_ALL``), ``intra_op_num_threads``
  = torch's thread count (``--threads``), one inter-op thread.
- OpenVINO: device CPU, ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_PRECISION_HINT=f32`` (no silent bf16 on CPUs
  that have it), ``INFERENCE_NUM_THREADS`` = torch's thread count.

The export uses ``torch.onnx.export(dynamo=True)`` when ``onnxscript`` is installed, else the TorchScript
exporter (``dynamo=False``); both need ``onnx``. Install everything with ``pip install 'fastdiff[peers]'``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from typing import Callable

import torch

from fastdiff.bench import plain_edm2

PEERS = ("onnxruntime", "openvino")
INSTALL = {
    "onnxruntime": "pip install 'fastdiff[peers]'  (or: pip install onnxruntime onnx)",
    "openvino": "pip install 'fastdiff[peers]'  (or: pip install openvino onnx)",
}

__all__ = ["PEERS", "INSTALL", "parse_peers", "missing", "OnnxPlainEDM2", "export_onnx", "onnxruntime_runner",
           "openvino_runner", "peer_runners"]


def parse_peers(text: str | None) -> tuple[str, ...]:
    """``'onnxruntime,openvino'`` -> the tuple of names; a ValueError naming the unknown ones and the choices."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; expected some of: {', '.join(PEERS)}")
    return names


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here (the packages it lacks and how to install them), or None when it can."""
    need = [m for m in (peer, "onnx") if not _has(m)]
    if not need:
        return None
    return f"{peer} skipped: {' and '.join(need)} not installed ({INSTALL[peer]})"


class OnnxPlainEDM2(torch.nn.Module):
    """The plain EDM2 network as a module for ``torch.onnx.export``: its tensors as buffers, the forward the
    plain network's (weight normalization included, which the runtimes fold into constants)."""

    def __init__(self, pnet: plain_edm2.PlainEDM2):
        super().__init__()
        self.cfg = dict(pnet.cfg)
        self.names = list(pnet.p)
        for i, k in enumerate(self.names):
            self.register_buffer(f"t{i}", pnet.p[k].detach())
        self.compute_dtype = pnet.compute_dtype

    def forward(self, x, sigma, labels=None):
        p = {k: getattr(self, f"t{i}") for i, k in enumerate(self.names)}
        return plain_edm2.PlainEDM2(self.cfg, p, compute_dtype=self.compute_dtype)(x, sigma, labels)


def export_onnx(pnet: plain_edm2.PlainEDM2, inputs: tuple, path: str) -> str:
    """Write the plain network at the shapes of ``inputs`` (``(x, sigma)`` or ``(x, sigma, labels)``) to ``path``
    as ONNX; returns the exporter used ('dynamo' or 'torchscript')."""
    module = OnnxPlainEDM2(pnet).eval()
    names = ["x", "sigma", "labels"][: len(inputs)]
    dynamo = _has("onnxscript")
    kw = {} if dynamo else {"opset_version": 17}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            import contextlib
            import io

            # The dynamo exporter reports its progress on stdout; keep the benchmark's tables clean.
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(module, tuple(inputs), path, dynamo=True, input_names=names, output_names=["d"],
                                  external_data=False)
        else:
            torch.onnx.export(module, tuple(inputs), path, dynamo=False, input_names=names, output_names=["d"], **kw)
    return "dynamo" if dynamo else "torchscript"


def _feeds(inputs: tuple) -> dict:
    return {name: t.detach().contiguous().numpy() for name, t in zip(("x", "sigma", "labels"), inputs)}


def onnxruntime_runner(path: str, inputs: tuple, threads: int) -> Callable[[], torch.Tensor]:
    """A call that runs the ONNX file on ``inputs`` with ONNX Runtime (CPU EP, all optimizations, ``threads``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = _feeds(inputs)
    return lambda: torch.from_numpy(sess.run(None, feeds)[0])


def openvino_runner(path: str, inputs: tuple, threads: int) -> Callable[[], torch.Tensor]:
    """A call that runs the ONNX file on ``inputs`` with OpenVINO (CPU, latency hint, f32 precision, ``threads``)."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": int(threads)}
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    request = compiled.create_infer_request()
    feeds = _feeds(inputs)

    def call() -> torch.Tensor:
        request.infer(feeds)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return call


def _version(peer: str) -> str:
    """The runtime's release number ('2026.4.1', not OpenVINO's full build string)."""
    mod = __import__(peer)
    v = getattr(mod, "__version__", None) or getattr(mod, "get_version", lambda: "")()
    return str(v).split("-")[0]


def peer_runners(pnet: plain_edm2.PlainEDM2, inputs: tuple, peers, threads: int | None = None
                 ) -> tuple[dict[str, Callable], list[str]]:
    """``({display name: call}, notes)`` for each peer that can run here; the network is exported once (to a
    temporary file, removed once every runtime has loaded it). Missing peers and failures become notes."""
    threads = threads or torch.get_num_threads()
    runners: dict[str, Callable] = {}
    notes: list[str] = []
    ready = []
    for peer in peers:
        why = missing(peer)
        if why:
            notes.append(why)
        else:
            ready.append(peer)
    if not ready:
        return runners, notes
    with tempfile.TemporaryDirectory(prefix="fastdiff-peers-") as tmp:
        path = os.path.join(tmp, "plain_edm2.onnx")
        try:
            exporter = export_onnx(pnet, inputs, path)
        except Exception as exc:  # report it, keep timing fastdiff and the plain network
            notes.append(f"ONNX export failed, peers skipped: {type(exc).__name__}: {exc}"[:300])
            return runners, notes
        make = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
        for peer in ready:
            try:
                call = make[peer](path, inputs, threads)
                runners[f"{peer} {_version(peer)}".strip()] = call
            except Exception as exc:
                notes.append(f"{peer} failed: {type(exc).__name__}: {exc}"[:300])
    if runners:
        notes.append(f"peers run the plain network exported to ONNX (torch.onnx {exporter} exporter), "
                     f"{threads} intra-op thread(s), float32")
    return runners, notes
