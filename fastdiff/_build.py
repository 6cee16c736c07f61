"""What fastdiff's compiled extension was built against, and whether it may be loaded under the running torch.

A build writes ``fastdiff/_build_info.py`` next to ``_C`` (see setup.py). A C++ extension of torch only loads
under the torch major.minor it was compiled against (its ABI is not stable across minor releases: loading it
under another one ends in an undefined-symbol error, or worse, a crash), so ``fastdiff.ops`` asks
:func:`extension_problem` *before* it imports ``_C`` and, when there is a problem, runs on the reference ops
with one warning that names both versions. A checkout built before build info existed has no file: then
nothing is checked and ``_C`` is loaded as before.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["build_info", "extension_problem", "describe"]


def build_info() -> dict | None:
    """The build's record (``torch``, ``cuda``, ``extension``, ``reason``, ``debug``), or None without one."""
    try:
        mod = importlib.import_module("fastdiff._build_info")
    except ImportError:
        return None
    return {"torch": getattr(mod, "TORCH_VERSION", None), "cuda": getattr(mod, "CUDA_VERSION", None),
            "extension": bool(getattr(mod, "EXTENSION", True)),
            "reason": getattr(mod, "EXTENSION_MISSING_REASON", ""), "debug": bool(getattr(mod, "DEBUG", False))}


def _major_minor(version: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(version).split("+")[0].split(".")[:2])
    except ValueError:
        return None


def extension_problem(info: dict | None = None, torch_version: str | None = None,
                      torch_cuda: str | None = "unset") -> str | None:
    """Why ``_C`` must not be loaded under this torch (one sentence naming both versions), or None when it may
    be. Defaults: this build's info, the running torch."""
    if info is None:
        info = build_info()
        if info is None:
            return None
    torch_version = torch.__version__ if torch_version is None else torch_version
    torch_cuda = torch.version.cuda if torch_cuda == "unset" else torch_cuda
    if not info["extension"]:
        return f"fastdiff was installed without its compiled extension ({info['reason'] or 'no reason recorded'})"
    built, now = _major_minor(info["torch"]), _major_minor(torch_version)
    if built is None or built != now:
        want = ".".join(map(str, built)) if built else "?"
        return (f"fastdiff's compiled extension was built against torch {info['torch']} but torch {torch_version} "
                f"is running, and a torch C++ extension only loads under the torch major.minor it was compiled "
                f"against; install torch=={want}.* or rebuild fastdiff for this torch (`pip install "
                f"--no-build-isolation --force-reinstall --no-deps` on the sdist or checkout)")
    if info["cuda"] and not torch_cuda:
        return (f"fastdiff's compiled extension holds CUDA {info['cuda']} kernels (built against torch "
                f"{info['torch']}) but torch {torch_version} has no CUDA; rebuild fastdiff for this torch")
    if info["cuda"] and torch_cuda and info["cuda"].split(".")[0] != torch_cuda.split(".")[0]:
        return (f"fastdiff's compiled extension was built with CUDA {info['cuda']} (torch {info['torch']}) but "
                f"torch {torch_version} uses CUDA {torch_cuda}; rebuild fastdiff for this torch")
    return None


def describe(info: dict | None = None) -> str:
    """One line for ``fastdiff info``: what the extension was built against."""
    info = build_info() if info is None else info
    if info is None:
        return "build: no build record (a checkout built before build records existed); torch version not checked"
    if not info["extension"]:
        return f"build: pure Python, no compiled extension ({info['reason']})"
    return (f"build: compiled against torch {info['torch']} ({'CUDA ' + info['cuda'] if info['cuda'] else 'CPU only'}"
            f", {'debug' if info['debug'] else 'release'} build); running torch {torch.__version__}")
