"""Training state (the checkpoints training resumes from): a safetensors file of tensors plus a JSON file of state.

``training-state-<nimg>.safetensors`` holds the network, the EMAs, the optimizer's tensors and the torch RNG
states; ``training-state-<nimg>.json`` holds the step, the image count, the optimizer's hyper-state, the
numpy / Python RNG states, the data sampler's position and the run's configuration, and names the weights
file with its size and SHA-256. Both are written to temporary files and renamed, the JSON last: a checkpoint
is complete when its JSON exists and the weights file it names has the recorded size and checksum. A crash
at any moment leaves at worst an orphan weights file (no JSON) and a temporary file, which the training loop
removes when it next starts in that folder (under the run directory's lock).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re

import numpy as np
import torch

from fastdiff.training.snapshots import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoints", "latest_checkpoint", "prune_checkpoints",
           "capture_rng", "restore_rng", "CheckpointError", "checkpoint_records", "orphan_weights"]

FORMAT = "fastdiff.training-state/1"
_NAME = re.compile(r"^training-state-(\d+)\.json$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- RNG states


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) with the torch CPU / CUDA, numpy and Python RNG states."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, state


def restore_rng(tensors: dict[str, torch.Tensor], state: dict) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8).cpu())
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                      key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.to(torch.uint8).cpu() for c in cuda])
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in state:
        version, st, gauss = state["python"]
        random.setstate((version, tuple(st), gauss))


# ---------------------------------------------------------------------------------------------- files


def checkpoint_paths(outdir, nimg: int) -> tuple[str, str]:
    base = os.path.join(os.fspath(outdir), f"training-state-{int(nimg):010d}")
    return base + ".safetensors", base + ".json"


def save_checkpoint(outdir, nimg: int, tensors: dict[str, torch.Tensor], state: dict) -> str:
    """Write a checkpoint (weights first, then the JSON that makes it complete); returns the JSON path."""
    from safetensors.torch import save_file

    weights_path, json_path = checkpoint_paths(outdir, nimg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp))
    record = dict(format=FORMAT, nimg=int(nimg), weights=os.path.basename(weights_path),
                  weights_size=os.path.getsize(weights_path), weights_sha256=_sha256(weights_path))
    record.update({k: v for k, v in state.items() if k not in record})

    def write_json(tmp):
        with open(tmp, "w") as f:  # one line per top-level key
            f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")

    atomic_write(json_path, write_json)
    return json_path


def _record_problem(outdir: str, path: str) -> tuple[int | None, str | None]:
    """``(nimg, None)`` for a checkpoint JSON whose weights file exists with the recorded size, else
    ``(None, why)``."""
    try:
        with open(path) as f:
            record = json.load(f)
    except OSError as exc:
        return None, f"cannot read the record ({exc})"
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"the record is not valid JSON (truncated or corrupt: {exc})"
    if not isinstance(record, dict):
        return None, "the record is not a JSON object"
    if record.get("format") != FORMAT:
        return None, f"unknown format {record.get('format')!r} (expected {FORMAT!r})"
    try:
        weights = os.path.join(outdir, os.path.basename(str(record["weights"])))
        size, nimg = int(record["weights_size"]), int(record["nimg"])
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"the record lacks weights / weights_size / nimg ({type(exc).__name__}: {exc})"
    if not os.path.isfile(weights):
        return None, f"its weights file {weights} is missing"
    actual = os.path.getsize(weights)
    if actual != size:
        return None, f"its weights file {weights} has {actual} bytes, the record says {size} (truncated)"
    return nimg, None


def checkpoint_records(outdir) -> list[str]:
    """Every ``training-state-<nimg>.json`` in ``outdir``, complete or not, newest name first."""
    outdir = os.fspath(outdir)
    paths = [p for p in glob.glob(os.path.join(glob.escape(outdir), "training-state-*.json"))
             if _NAME.match(os.path.basename(p))]
    return sorted(paths, reverse=True)


def find_checkpoints(outdir, log=None) -> list[tuple[int, str]]:
    """``(nimg, json_path)`` of every checkpoint JSON in ``outdir`` whose weights file exists with the
    recorded size, newest first (the checksum is verified by :func:`load_checkpoint`). Each skipped record
    is reported through ``log`` (a callable taking a message), with the reason."""
    outdir = os.fspath(outdir)
    out = []
    for path in checkpoint_records(outdir):
        nimg, why = _record_problem(outdir, path)
        if why is not None:
            if log:
                log(f"skipping checkpoint {path}: {why}")
            continue
        out.append((nimg, path))
    out.sort(reverse=True)
    return out


def load_checkpoint(json_path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint; ``CheckpointError`` if it is incomplete or corrupt."""
    from safetensors.torch import load_file

    json_path = os.fspath(json_path)
    try:
        with open(json_path) as f:
            state = json.load(f)
        weights = os.path.join(os.path.dirname(json_path), os.path.basename(str(state["weights"])))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{json_path}: unreadable checkpoint record ({exc})") from exc
    if not os.path.isfile(weights) or os.path.getsize(weights) != state.get("weights_size"):
        raise CheckpointError(f"{json_path}: weights file {weights} missing or of the wrong size")
    if _sha256(weights) != state.get("weights_sha256"):
        raise CheckpointError(f"{weights}: checksum does not match {json_path} (corrupt checkpoint)")
    try:
        tensors = load_file(weights, device=str(device))
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot read ({exc})") from exc
    return tensors, state


def latest_checkpoint(outdir, device="cpu", log=None):
    """The newest checkpoint in ``outdir`` that loads and verifies, as ``(tensors, state, json_path)``, or None
    when there is no checkpoint record at all. Every skipped one (truncated, missing weights, unreadable JSON,
    checksum mismatch) is reported through ``log``; when records exist but none is usable, ``CheckpointError``
    (resuming is impossible, and starting over would overwrite them: the caller must be told to)."""
    outdir = os.fspath(outdir)
    for _nimg, path in find_checkpoints(outdir, log=log):
        try:
            tensors, state = load_checkpoint(path, device=device)
        except CheckpointError as exc:
            if log:
                log(f"skipping checkpoint: {exc}")
            continue
        return tensors, state, path
    records = checkpoint_records(outdir)
    if records:
        names = ", ".join(os.path.basename(p) for p in records[:4]) + (" ..." if len(records) > 4 else "")
        raise CheckpointError(
            f"{outdir}: none of its {len(records)} checkpoint(s) is usable ({names}; reasons logged above); "
            f"refusing to start over from 0 images and overwrite them. Repair or move them away, or start over "
            f"on purpose (--restart / TrainConfig(resume=False))")
    return None


def orphan_weights(outdir) -> list[str]:
    """``training-state-<nimg>.safetensors`` files without their JSON record: left by a run killed between
    writing a checkpoint's weights and its record (such a checkpoint was never complete)."""
    outdir = os.fspath(outdir)
    out = []
    for path in glob.glob(os.path.join(glob.escape(outdir), "training-state-*.safetensors")):
        if re.match(r"^training-state-\d+\.safetensors$", os.path.basename(path)):
            if not os.path.exists(path[: -len(".safetensors")] + ".json"):
                out.append(path)
    return sorted(out)


def prune_checkpoints(outdir, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    complete = find_checkpoints(outdir)
    for _nimg, path in complete[keep:]:
        weights_path = path[: -len(".json")] + ".safetensors"
        for p in (path, weights_path):  # the JSON first: never a JSON without its weights
            try:
                os.remove(p)
            except OSError:
                pass
