"""The layout of csrc/ stays as csrc/ops.cpp and csrc/cpu/isa.h describe it.

* The op map in ops.cpp names every schema that ops.cpp defines (m.def), once; every file it names exists; the
  CPU / CUDA glue it names is the file that registers the op's kernel (m.impl) for that backend, and no other
  file registers it; the Python wrapper it names exists in ``fastdiff.ops``.
* File names follow one rule on both backends: ``<family>_cpu.cpp`` / ``<family>_cuda.cpp`` glue (the only files
  that register kernels), ``<family>_kernels.*`` loops and kernels (no ATen, no registration), per-ISA units
  ``<name>_{avx2,avx512,baseline}.cpp``, plus a short list of shared helpers.
* One dispatch mechanism: ``#pragma GCC target`` only in the per-ISA units, no function-level target attributes
  or multiversioning macro; e^x's polynomial and mp_silu's divisor are written once (cpu/vmath.h).

Parses text only: needs no compiler and no built extension.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
OPS_CPP = CSRC / "ops.cpp"

ROW = re.compile(r"^//\s{3}(\w+)(?: \(private\))?\s*\|([^|]*)\|([^|]*)\|\s*([\w.]+)\s*$")


def schemas() -> list[str]:
    """Op names of every ``m.def("name(...)`` in ops.cpp (string literals may be split over lines)."""
    return re.findall(r'm\.def\(\s*"(\w+)\(', OPS_CPP.read_text())


@functools.lru_cache(maxsize=None)
def op_map() -> dict[str, tuple[list[str], list[str], str]]:
    """op -> (CPU files [glue, loops...], CUDA files [glue, kernels...] or [], Python attribute path)."""
    rows: dict[str, tuple[list[str], list[str], str]] = {}
    for line in OPS_CPP.read_text().splitlines():
        m = ROW.match(line)
        if m is None:
            continue
        op, cpu, cuda, py = m.group(1), m.group(2).strip(), m.group(3).strip(), m.group(4)
        assert op not in rows, f"ops.cpp's op map lists {op} twice"
        rows[op] = ([p.strip() for p in cpu.split(">")], [] if cuda == "-" else [p.strip() for p in cuda.split(">")], py)
    return rows


def registrations(folder: str) -> dict[str, list[str]]:
    """op -> the files of csrc/<folder> (and composite.cpp) whose m.impl registers it."""
    found: dict[str, list[str]] = {}
    files = sorted((CSRC / folder).glob("*.cpp")) + [CSRC / "composite.cpp"]
    for f in files:
        for op in re.findall(r'm\.impl\(\s*"(\w+)"', f.read_text()):
            found.setdefault(op, []).append(f.resolve().relative_to(CSRC).as_posix())
    return found


def test_the_map_names_every_schema_once():
    defs = schemas()
    assert len(defs) == len(set(defs)) and len(defs) > 30, defs
    assert sorted(op_map()) == sorted(defs), (
        f"missing from the map: {sorted(set(defs) - set(op_map()))}; "
        f"in the map but not defined: {sorted(set(op_map()) - set(defs))}")


def test_every_file_in_the_map_exists():
    for op, (cpu, cuda, _) in op_map().items():
        for rel in cpu:
            assert (CSRC / "cpu" / rel).is_file(), f"{op}: CPU file csrc/cpu/{rel} does not exist"
        for rel in cuda:
            assert (CSRC / "cuda" / rel).is_file(), f"{op}: CUDA file csrc/cuda/{rel} does not exist"


@pytest.mark.parametrize("folder", ["cpu", "cuda"])
def test_the_glue_named_is_the_file_that_registers_the_kernel(folder):
    regs = registrations(folder)
    functions = dict(re.findall(r'm\.def\(\s*"(\w+)\([^;]*?,\s*&[\w:]*?(\w+)\)', OPS_CPP.read_text()))
    for op, (cpu, cuda, _) in op_map().items():
        files = cpu if folder == "cpu" else cuda
        # relative to csrc/ ("cpu/../composite.cpp" is composite.cpp)
        where = [(Path(folder) / files[0]).as_posix().replace(f"{folder}/../", "")] if files else []
        if op in functions:  # defined with its function in ops.cpp: the glue named must define that function
            assert folder == "cuda" or functions[op] in (CSRC / where[0]).read_text(), (op, where)
            continue
        assert sorted(regs.get(op, [])) == sorted(where), (
            f"{op}: the map names {where or 'no file'} for {folder}, m.impl is in {regs.get(op, [])}")


def test_the_python_wrapper_exists():
    import fastdiff.ops as ops

    for op, (_, _, py) in op_map().items():
        obj = ops
        for part in py.split("."):
            assert hasattr(obj, part), f"{op}: fastdiff.ops.{py} does not exist"
            obj = getattr(obj, part)
        assert callable(obj), f"{op}: fastdiff.ops.{py} is not callable"


SHARED = {
    "cpu": {"isa.h", "isa.cpp", "vmath.h", "gemm.h", "gemm.inc", "workspace.h", "workspace.cpp",
            "elementwise_simd.h", "elementwise_simd.inc"},
    "cuda": {"launch.h", "dtype.h", "device.cuh"},
}
PER_ISA = re.compile(r"^\w+_(avx2|avx512|baseline)\.cpp$")


@pytest.mark.parametrize("folder", ["cpu", "cuda"])
def test_file_names_follow_one_rule(folder):
    for f in sorted((CSRC / folder).iterdir()):
        name, text = f.name, f.read_text()
        registers = "TORCH_LIBRARY" in text
        if re.fullmatch(rf"\w+_{folder}\.cpp", name):
            assert registers, f"{folder}/{name}: glue files register their ops (TORCH_LIBRARY_IMPL)"
            continue
        assert not registers, f"{folder}/{name}: only <family>_{folder}.cpp files register ops"
        if re.fullmatch(r"\w+_kernels\.(h|cuh|cu|inc|cpp)", name) or PER_ISA.match(name):
            assert not re.search(r"#\s*include\s*<(ATen|torch)/", text), f"{folder}/{name}: kernels include no ATen"
            continue
        assert name in SHARED[folder], f"{folder}/{name} follows no naming rule (glue, kernels, per-ISA, shared)"


def test_one_dispatch_mechanism_and_one_exp_and_mp_silu():
    cpu = {f.name: re.sub(r"//.*", "", f.read_text()) for f in sorted((CSRC / "cpu").iterdir())}  # code only
    for name, text in cpu.items():
        assert "FD_MULTIVERSION" not in text and "target_clones" not in text, name
        assert "__attribute__((target" not in text, f"cpu/{name}: per-ISA code goes in a <name>_<isa>.cpp unit"
        if re.search(r"^\s*#\s*pragma GCC target", text, re.MULTILINE):
            assert PER_ISA.match(name), f"cpu/{name}: #pragma GCC target outside a per-ISA unit"
    # e^x's polynomial (a Cephes expf coefficient), the silu divisor and the rounding shifter: vmath.h only.
    for token in ("1.9875691500e-4", "1.3981999507e-3", "0.596", "12582912"):
        holders = [n for n, t in cpu.items() if token in t]
        assert holders == ["vmath.h"], f"{token} is written in {holders}, expected only in vmath.h"
