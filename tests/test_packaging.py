"""Packaging: the sdist is complete, the build degrades to pure Python (loudly) without a compiler or OpenMP,
an extension built for another torch is never loaded, and the POSIX-only pieces have portable fallbacks.

No macOS or Windows machine runs these: the missing pieces are simulated (a compiler that does not exist, a
compiler driver that rejects the OpenMP flags, ``fcntl`` / ``resource`` made unimportable, a build record
naming another torch)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_SOURCES = os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "csrc"))
needs_sources = pytest.mark.skipif(not HAVE_SOURCES, reason="needs the source tree (setup.py, csrc/), e.g. not an "
                                   "installed wheel's test copy")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup_py():
    if not HAVE_SOURCES:
        pytest.skip("needs the source tree")
    return _load("_fastdiff_setup_under_test", os.path.join(ROOT, "setup.py"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_")}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------- sdist


@needs_sources
def test_sdist_holds_every_compiled_and_included_file_and_no_build_record(tmp_path):
    check = _load("_check_sdist", os.path.join(ROOT, "tools", "check_sdist.py"))
    closure, unresolved = check.include_closure(check.compiled_sources(ROOT), ROOT)
    assert unresolved == []
    assert {"csrc/common.h", "csrc/attention_checks.h", "csrc/cpu/elementwise_simd.inc", "csrc/cuda/dtype.h"} <= closure
    # A copy of the tree as a build leaves it (a build record, an .so), packed by setup.py's own sdist.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build", "dist", ".venv*")
    for d in ("csrc", "fastdiff", "tests", "benchmarks", "tools"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
    for f in check.ALWAYS:
        shutil.copy(os.path.join(ROOT, f), src / f)
    (src / "fastdiff" / "_build_info.py").write_text("TORCH_VERSION = '0.0'\n")
    (src / "fastdiff" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\0")
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (sdist,) = (tmp_path / "dist").glob("fastdiff-*.tar.gz")
    members = check.sdist_members(str(sdist))
    missing, unresolved, graph = check.missing_from(members, str(src))
    assert missing == [] and unresolved == [] and graph == len(closure)
    assert "fastdiff/_build_info.py" not in members and not any(m.endswith(".so") for m in members)
    with tarfile.open(sdist) as tar:
        info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    # The sdist does not pin a torch (the wheel built from it does, for the torch it is built against).
    assert "Requires-Dist: torch>=2.4" in info and "Dynamic: requires-dist" in info
    assert "License-Expression: MIT" in info


@needs_sources
def test_include_walk_reports_an_include_that_names_no_file(tmp_path):
    check = _load("_check_sdist", os.path.join(ROOT, "tools", "check_sdist.py"))
    (tmp_path / "a.cpp").write_text('#include "sub/b.h"\n#include <vector>\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.h").write_text('#pragma once\n  #  include "../gone.h"\n')
    closure, unresolved = check.include_closure(["a.cpp"], str(tmp_path))
    assert closure == {"a.cpp", "sub/b.h"} and unresolved == ['sub/b.h: "../gone.h"']


# ------------------------------------------------------------------------------------ compiler and OpenMP


@pytest.mark.parametrize("banner,kind", [
    ("g++ (Debian 12.2.0-14) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.", "gcc"),
    ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", "clang"),
    ("Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.4.0", "apple-clang"),
    ("Microsoft (R) C/C++ Optimizing Compiler Version 19.38.33133 for x64", "msvc"),
    ("icpx something", "unknown"),
])
def test_compiler_kind_and_its_openmp_flags(setup_py, banner, kind):
    assert setup_py.compiler_kind(banner) == kind
    cflags, ldflags = setup_py.openmp_flags(kind)
    want = {"gcc": (["-fopenmp"], ["-fopenmp"]), "clang": (["-fopenmp"], ["-fopenmp"]),
            "apple-clang": (["-Xpreprocessor", "-fopenmp"], ["-lomp"]), "msvc": (["/openmp"], []),
            "unknown": (["-fopenmp"], ["-fopenmp"])}[kind]
    assert (cflags, ldflags) == want
    flags = setup_py.cxx_flags(kind, debug=False)
    assert ("/O2" in flags) == (kind == "msvc") and ("-O3" in flags) == (kind != "msvc")
    assert ("-g0" in flags) == (kind != "msvc") and "-g" not in flags
    assert "-g" in setup_py.cxx_flags("gcc", debug=True)


def _fake_apple_clang_without_libomp(tmp_path) -> str:
    """A compiler driver that says it is Apple clang and, like one without Homebrew's libomp, cannot link -lomp
    (everything else goes to the real c++)."""
    path = tmp_path / "fake-apple-clang"
    path.write_text(textwrap.dedent("""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "Apple clang version 15.0.0 (clang-1500.3.9.4)"; exit 0; fi
        for a in "$@"; do
          if [ "$a" = "-lomp" ]; then echo "ld: library 'omp' not found" >&2; exit 1; fi
        done
        exec c++ "$@"
        """))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@needs_sources
def test_probe_names_a_missing_compiler_and_missing_openmp(setup_py, tmp_path):
    problem, _, _ = setup_py.probe_compiler([str(tmp_path / "no-such-c++")])
    assert problem.startswith("no C++ compiler")
    if shutil.which("c++") is None or sys.platform != "linux":
        pytest.skip("the OpenMP part needs a real c++ on Linux to stand behind the fake driver")
    problem, kind, flags = setup_py.probe_compiler([_fake_apple_clang_without_libomp(tmp_path)])
    assert kind == "apple-clang" and flags == (["-Xpreprocessor", "-fopenmp"], ["-lomp"])
    assert "cannot build an OpenMP program" in problem and "omp" in problem
    assert setup_py.probe_compiler(["c++"])[0] is None  # the real one works


def _copy_sources(dst) -> str:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "_build_info.py")
    for d in ("csrc", "fastdiff"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dst, d), ignore=ignore)
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), os.path.join(dst, f))
    return str(dst)


def _build_ext_inplace(src, tmp_path, **env):
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-b", str(tmp_path / "lib"), "-t",
                           str(tmp_path / "tmp")], cwd=src, env=_env(**env), capture_output=True, text=True,
                          timeout=600)


@needs_sources
def test_no_compiler_gives_a_pure_python_build_that_says_why_and_require_makes_it_an_error(tmp_path):
    src = _copy_sources(tmp_path / "src")
    out = _build_ext_inplace(src, tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert out.returncode == 0, out.stderr
    assert "fastdiff._C is NOT built: no C++ compiler" in out.stderr and "pure Python" in out.stderr
    # The record lands in build_lib and, for an in-place (or editable) build, in the source tree.
    info_paths = [tmp_path / "lib" / "fastdiff" / "_build_info.py", tmp_path / "src" / "fastdiff" / "_build_info.py"]
    for path in info_paths:
        info = _load("_info_under_test", str(path))
        assert info.EXTENSION is False and "no C++ compiler" in info.EXTENSION_MISSING_REASON
    assert not list((tmp_path / "lib").rglob("_C*")) and not list((tmp_path / "src").rglob("_C*"))

    from fastdiff import _build

    record = {"torch": info.TORCH_VERSION, "cuda": None, "extension": False,
              "reason": info.EXTENSION_MISSING_REASON, "debug": False}
    assert "installed without its compiled extension (no C++ compiler" in _build.extension_problem(record)
    assert _build.describe(record).startswith("build: pure Python, no compiled extension (no C++ compiler")

    for path in info_paths:
        os.remove(path)
    out = _build_ext_inplace(src, tmp_path, CXX=str(tmp_path / "no-such-c++"), FASTDIFF_REQUIRE_EXTENSION="1")
    assert out.returncode != 0
    assert "FASTDIFF_REQUIRE_EXTENSION=1 and the compiled extension cannot be built: no C++ compiler" in out.stderr
    assert not any(path.exists() for path in info_paths)


@needs_sources
def test_a_failed_compile_gives_a_pure_python_build_that_says_why(tmp_path):
    # As on a CPU the kernels are not written for (Apple silicon: no AVX intrinsics): the compiler works, the
    # OpenMP probe passes, and compiling csrc/ fails.
    if shutil.which("c++") is None or sys.platform != "linux":
        pytest.skip("needs a real c++ on Linux behind the fake driver")
    fake = tmp_path / "c++-that-fails-on-csrc"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        for a in "$@"; do
          case "$a" in */csrc/*) echo "error: simulated: this target has no AVX2 intrinsics" >&2; exit 1;; esac
        done
        exec c++ "$@"
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    src = _copy_sources(tmp_path / "src")
    out = _build_ext_inplace(src, tmp_path, CXX=str(fake), MAX_JOBS="1")
    assert out.returncode == 0, out.stderr
    assert "fastdiff._C is NOT built: compiling fastdiff._C failed" in out.stderr
    info = _load("_info_failed_compile", str(tmp_path / "src" / "fastdiff" / "_build_info.py"))
    assert info.EXTENSION is False and "compiling fastdiff._C failed" in info.EXTENSION_MISSING_REASON
    assert not list((tmp_path / "src").rglob("_C*.so"))


@needs_sources
def test_an_isolated_build_without_torch_stops_at_once_saying_what_to_type(tmp_path):
    # Build isolation, simulated: a torch that cannot be imported (a stub package that raises) in front of sys.path.
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    out = subprocess.run([sys.executable, "setup.py", "bdist_wheel", "-d", str(tmp_path / "dist")], cwd=ROOT,
                         env=_env(PYTHONPATH=str(tmp_path / "stub")), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "never downloads one" in out.stderr
    # Without the PYTHONPATH that hid it, this interpreter has a torch: the message names it.
    assert "is installed, but pip's build isolation hides it" in out.stderr
    assert not (tmp_path / "dist").exists()


# ----------------------------------------------------------------------------- the torch it was built for


def test_extension_problem_compares_major_minor_and_cuda():
    from fastdiff import _build

    def rec(torch, cuda=None, extension=True):
        return {"torch": torch, "cuda": cuda, "extension": extension, "reason": "", "debug": False}

    assert _build.extension_problem(rec("2.13.0+cpu"), "2.13.1+cpu", None) is None
    msg = _build.extension_problem(rec("2.13.0+cpu"), "2.14.1+cpu", None)
    assert "built against torch 2.13.0+cpu but torch 2.14.1+cpu is running" in msg and "torch==2.13.*" in msg
    assert "no CUDA" in _build.extension_problem(rec("2.14.1+cu130", "13.0"), "2.14.1+cpu", None)
    assert "CUDA 12.8" in _build.extension_problem(rec("2.14.1+cu130", "13.0"), "2.14.1+cu128", "12.8")
    assert _build.extension_problem(rec("2.14.1+cu130", "13.0"), "2.14.1+cu130", "13.0") is None


def _run_with_fake_build_record(code: str, **env) -> dict:
    prog = textwrap.dedent(f"""
        import contextlib, io, json, sys, types, warnings
        m = types.ModuleType("fastdiff._build_info")
        m.TORCH_VERSION, m.CUDA_VERSION, m.EXTENSION = "2.12.1+cpu", None, True
        m.EXTENSION_MISSING_REASON, m.DEBUG = "", False
        sys.modules["fastdiff._build_info"] = m
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import fastdiff
            from fastdiff import ops
            from fastdiff.ops import reference
            x = torch.randn(2, 8, 5, 5)
            same = torch.equal(ops.mp_silu(x), reference.mp_silu(x))
        out = {{"warnings": [str(w.message) for w in caught if "fastdiff" in str(w.message)],
                "loaded": ops.HAS_EXTENSION, "C_imported": "fastdiff._C" in sys.modules, "same": same,
                "torch": torch.__version__}}
        {code}
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300, env=_env(**env))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_extension_built_for_another_torch_is_never_loaded_one_warning_names_both():
    info_code = ("buf = io.StringIO()\n"
                 "        with contextlib.redirect_stdout(buf):\n"
                 "            from fastdiff.cli import main\n"
                 "            out['info_rc'] = main(['info'])\n"
                 "        out['info'] = buf.getvalue()")
    out = _run_with_fake_build_record(info_code)
    assert len(out["warnings"]) == 1, out["warnings"]
    (msg,) = out["warnings"]
    assert "built against torch 2.12.1+cpu" in msg and f"torch {out['torch']} is running" in msg
    assert "reference ops" in msg and "undefined symbol" not in msg
    assert out["loaded"] is False and out["C_imported"] is False and out["same"] is True
    assert out["info_rc"] == 0
    assert "build: compiled against torch 2.12.1+cpu" in out["info"] and f"running torch {out['torch']}" in out["info"]
    assert "NOT LOADED (fastdiff's compiled extension was built against torch 2.12.1+cpu" in out["info"]


def test_forced_reference_ops_skip_a_mismatched_extension_silently():
    out = _run_with_fake_build_record("", FASTDIFF_REFERENCE="1")
    assert out["warnings"] == [] and out["loaded"] is False and out["C_imported"] is False


# ------------------------------------------------------------------------------------- POSIX-only pieces


_RUNDIR = os.path.join(os.path.dirname(importlib.util.find_spec("fastdiff").origin), "training", "rundir.py")


def _rundir_without_fcntl(monkeypatch):
    import filelock  # noqa: F401  (imported with fcntl there: its OS lock, not the soft one, as on Windows)

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    return _load("_rundir_portable", _RUNDIR)


def test_run_lock_without_fcntl_goes_through_filelock(monkeypatch, tmp_path):
    pytest.importorskip("filelock")
    rundir = _rundir_without_fcntl(monkeypatch)
    assert rundir.fcntl is None
    with rundir.RunLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(rundir.RunDirectoryBusy, match=f"pid {os.getpid()} on "):
            rundir.RunLock(tmp_path).acquire()
    assert not lock.held
    again = rundir.RunLock(tmp_path).acquire()  # released: taken at once
    again.release()


def test_run_lock_without_fcntl_is_released_when_its_holder_is_killed(monkeypatch, tmp_path):
    pytest.importorskip("filelock")
    rundir = _rundir_without_fcntl(monkeypatch)
    path = _RUNDIR
    # filelock is imported first, as on Windows where it finds its msvcrt lock; then fcntl goes away for rundir.
    code = (f"import importlib.util, sys, time, filelock; sys.modules['fcntl'] = None; "
            f"spec = importlib.util.spec_from_file_location('rundir', {path!r}); "
            f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); assert m.fcntl is None; "
            f"held = m.RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirectoryBusy, match=f"pid {proc.pid}"):
            rundir.RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    rundir.RunLock(tmp_path).acquire().release()


def test_peak_memory_without_resource(monkeypatch):
    import torch

    from fastdiff.training import stats

    assert "cpu_peak_rss_gib" in stats.memory_gib(torch.device("cpu"))
    monkeypatch.setattr(stats, "resource", None)
    assert stats.memory_gib(torch.device("cpu")) == {}
