"""Builds fastdiff and its extension fastdiff._C (CPU kernels always, CUDA kernels where possible).

The extension is compiled against the torch installed in the build environment, so build without pip's
isolation: ``pip install --no-build-isolation .`` (the isolated build environment has no torch, and fastdiff
never downloads one to build with: the build stops at once and says what to type).

Environment switches:
  FASTDIFF_CUDA=1 / 0            insist on / skip the CUDA kernels (default: built when torch has CUDA and nvcc
                                 is found; =1 is an error when they cannot be built)
  FASTDIFF_EXTENSION=0           no compiled extension on purpose: a pure-Python install (torch not needed to build)
  FASTDIFF_REQUIRE_EXTENSION=1   a missing compiler or OpenMP, or a failed compile, is a build error instead of a
                                 pure-Python install with a warning (CI sets it)
  FASTDIFF_DEBUG=1               keep debug info (the default release build compiles with -g0)

The wheel records the torch it was compiled against: ``torch==X.Y.*`` in its requirements and
``fastdiff/_build_info.py``, which ``import fastdiff`` compares with the running torch before loading ``_C``.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_FLOOR = "torch>=2.4"  # the requirement of a pure-Python install, and of the sdist
DEPENDENCIES = ["numpy>=1.24", "tqdm>=4.60", "safetensors>=0.4", "pillow>=9"]  # besides torch (pyproject: dynamic)
# Commands that compile or install, or write a wheel's metadata: only these need torch (egg_info and sdist,
# which only describe or pack the sources, do not).
_BUILD_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "editable_wheel", "dist_info", "develop",
                   "install"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# ------------------------------------------------------------------------------------------------ sources


def cpu_sources() -> list[str]:
    return ["csrc/ops.cpp", "csrc/composite.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))


def cuda_sources() -> list[str]:
    return sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)) + sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))


def all_sources() -> list[str]:
    """Every file a build may compile (CPU and CUDA), relative to the project root; the sdist check walks the
    ``#include "..."`` graph from these."""
    return cpu_sources() + cuda_sources()


# ------------------------------------------------------------------------------------- compiler and OpenMP


def compiler_kind(version_text: str) -> str:
    """'apple-clang', 'clang', 'gcc', 'msvc' or 'unknown' from a compiler's ``--version`` (or ``cl``) banner."""
    text = version_text.lower()
    if "microsoft" in text and "c/c++" in text:
        return "msvc"
    if "apple clang" in text or ("apple" in text and "clang" in text):
        return "apple-clang"
    if "clang" in text:
        return "clang"
    if "free software foundation" in text or "gcc" in text or "g++" in text:
        return "gcc"
    return "unknown"


def openmp_flags(kind: str) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that turn on OpenMP for a compiler of this kind.

    Apple clang has no ``-fopenmp`` driver flag: the pragma goes through the preprocessor and libomp (e.g.
    Homebrew's; its include and lib folders via CPPFLAGS / LDFLAGS) is linked by hand."""
    if kind == "msvc":
        return ["/openmp"], []
    if kind == "apple-clang":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]  # gcc (libgomp), clang (libomp), and anything gcc-compatible


def cxx_flags(kind: str, debug: bool) -> list[str]:
    if kind == "msvc":
        return ["/O2"] + (["/Zi"] if debug else [])
    # -fno-trapping-math lets GCC turn float compares into branch-free min/max, which the vectorizer
    # needs; nothing here relies on floating-point traps or errno. -g0 undoes the -g of Python's own
    # CFLAGS: a release _C.so without debug info is about a tenth of the size.
    return ["-O3", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
            "-g" if debug else "-g0"]


_OPENMP_PROBE = """\
#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return (n > 0 && omp_get_max_threads() > 0) ? 0 : 1;
}
"""


def probe_compiler(cxx: list[str], msvc: bool = False) -> tuple[str | None, str, tuple[list[str], list[str]]]:
    """Try the C++ compiler ``cxx`` (a command, e.g. ``['c++']``) on a small OpenMP program.

    Returns ``(problem, kind, (openmp compile flags, openmp link flags))``; ``problem`` is None when it
    compiled, linked and ran, else one line saying what is missing (no compiler, or no OpenMP)."""
    try:
        banner = subprocess.run(cxx + ([] if msvc else ["--version"]), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no C++ compiler: running {shlex.join(cxx)} failed ({exc})", "unknown", ([], [])
    kind = "msvc" if msvc else compiler_kind(banner.stdout + banner.stderr)
    if not msvc and banner.returncode != 0:
        return (f"no working C++ compiler: `{shlex.join(cxx)} --version` exited with {banner.returncode}", kind,
                ([], []))
    cflags, ldflags = openmp_flags(kind)
    extra_cpp = shlex.split(os.environ.get("CPPFLAGS", ""))
    extra_ld = shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory(prefix="fastdiff-probe-") as tmp:
        src, exe = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.exe" if msvc else "probe")
        with open(src, "w") as f:
            f.write(_OPENMP_PROBE)
        if msvc:
            cmd = cxx + ["/nologo", "/EHsc", *cflags, src, f"/Fe{exe}", f"/Fo{tmp}{os.sep}"]
        else:
            cmd = cxx + [*extra_cpp, *cflags, src, "-o", exe, *extra_ld, *ldflags]
        try:
            built = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)
            if built.returncode != 0:
                tail = " ".join((built.stderr or built.stdout).strip().splitlines()[-3:])
                return (f"the C++ compiler ({kind}, {shlex.join(cxx)}) cannot build an OpenMP program with "
                        f"{shlex.join(cflags + ldflags)}: {tail}"), kind, (cflags, ldflags)
            ran = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the OpenMP test program could not be built or run ({exc})", kind, (cflags, ldflags)
        if ran.returncode != 0:
            return (f"an OpenMP program built by {shlex.join(cxx)} does not run (exit {ran.returncode}; is the "
                    "OpenMP runtime library installed?)"), kind, (cflags, ldflags)
    return None, kind, (cflags, ldflags)


# ------------------------------------------------------------------------------------------- build info


def write_build_info(package_dir: str, torch_version: str | None, cuda: str | None, extension: bool,
                     reason: str = "", debug: bool = False) -> str:
    """Write ``fastdiff/_build_info.py``: what ``import fastdiff`` checks before it loads ``_C``."""
    path = os.path.join(package_dir, "_build_info.py")
    text = ('"""Written by setup.py when fastdiff was built; compared with the running torch at import."""\n\n'
            f"TORCH_VERSION = {torch_version!r}  # the torch fastdiff._C was compiled against\n"
            f"CUDA_VERSION = {cuda!r}  # CUDA of the kernels in fastdiff._C (None: CPU kernels only)\n"
            f"EXTENSION = {extension!r}  # whether fastdiff._C was built\n"
            f"EXTENSION_MISSING_REASON = {reason!r}\n"
            f"DEBUG = {debug!r}\n")
    os.makedirs(package_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _banner(lines: list[str]) -> None:
    bar = "!" * 100
    print("\n".join(["", bar, *("fastdiff: " + line for line in lines), bar, ""]), file=sys.stderr, flush=True)


class build_py_with_info(build_py):
    """A pure-Python build (FASTDIFF_EXTENSION=0) still writes _build_info.py, so import says why there is no
    extension."""

    skipped_reason = ""

    def run(self):
        super().run()
        if self.skipped_reason and not self.editable_mode:
            write_build_info(os.path.join(self.build_lib, "fastdiff"), None, None, False, self.skipped_reason)


# ----------------------------------------------------------------------------------------- torch or stop


def _installed_torch_outside() -> str | None:
    """The torch the interpreter sees without this process's PYTHONPATH (which is how pip's build isolation
    hides site-packages), e.g. '2.13.0+cpu at /venv/...'; None when there is none."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    code = "import importlib.metadata as m, importlib.util as u; s = u.find_spec('torch'); " \
           "print(m.version('torch'), 'at', s.origin.rsplit('/torch/', 1)[0] if s else '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def stop_without_torch() -> None:
    outside = _installed_torch_outside()
    why = (f"torch {outside} is installed, but pip's build isolation hides it from this build" if outside else
           "this build environment has no torch")
    sys.exit(
        "\n"
        "fastdiff: cannot build the compiled extension: " + why + ".\n"
        "fastdiff compiles against the torch you already have and never downloads one to build with.\n"
        "Type instead (in the environment that has your torch):\n\n"
        "    pip install setuptools wheel ninja\n"
        "    pip install --no-build-isolation <the same target: . or fastdiff-*.tar.gz>\n\n"
        "(no torch yet? first `pip install torch`, the build you want, e.g. torch==2.13.0). For a pure-Python "
        "install on the slower reference ops, set FASTDIFF_EXTENSION=0.\n")


def want_cuda(torch, CUDA_HOME) -> bool:
    flag = os.environ.get("FASTDIFF_CUDA", "")
    if flag == "0":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        raise RuntimeError(
            "FASTDIFF_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. Install a CUDA build of torch "
            "and the CUDA toolkit (nvcc), or unset FASTDIFF_CUDA."
        )
    return have


def extension_and_command():
    """(the Extension, the build_ext class), both from torch.utils.cpp_extension (torch imported here)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("FASTDIFF_DEBUG")
    cuda = want_cuda(torch, CUDA_HOME)
    sources = cpu_sources() + (cuda_sources() if cuda else [])
    if cuda:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + (["-g"] if debug else [])
        ext = CUDAExtension("fastdiff._C", sources, extra_compile_args={"cxx": ["-DFASTDIFF_WITH_CUDA"], "nvcc": nvcc})
    else:
        ext = CppExtension("fastdiff._C", sources, extra_compile_args={"cxx": []})
    torch_version = torch.__version__

    class build_ext(BuildExtension):
        """torch's BuildExtension, plus: compiler flags and OpenMP chosen per compiler, a probe that turns a
        missing compiler or OpenMP into a pure-Python install (or an error under FASTDIFF_REQUIRE_EXTENSION=1),
        and fastdiff/_build_info.py next to _C."""

        def run(self):
            # setuptools builds into build_lib and then copies only the .so into the source tree (--inplace,
            # editable installs): the build record goes to both places.
            inplace, self._record = self.inplace, None
            super().run()
            if self._record is not None:
                dirs = [os.path.join(self.build_lib, "fastdiff")]
                if inplace:
                    dirs.append(os.path.abspath(self.get_finalized_command("build_py").get_package_dir("fastdiff")))
                for d in dirs:
                    write_build_info(d, *self._record)

        def build_extensions(self):
            ext = self.extensions[0]
            msvc = self.compiler.compiler_type == "msvc"
            from torch.utils.cpp_extension import get_cxx_compiler

            problem, kind, (omp_c, omp_l) = probe_compiler(shlex.split(get_cxx_compiler()), msvc)
            if problem is None:
                ext.extra_compile_args["cxx"] = cxx_flags(kind, debug) + omp_c + ext.extra_compile_args["cxx"]
                ext.extra_link_args = list(ext.extra_link_args or []) + omp_l
                try:
                    super().build_extensions()
                except Exception as exc:  # a compile or link error: fall back unless the extension is required
                    problem = (f"compiling fastdiff._C failed ({type(exc).__name__}: {exc}); see the compiler "
                               "output above")
            if problem is None:
                self._record = (torch_version, torch.version.cuda if cuda else None, True, "", debug)
                return
            if _flag("FASTDIFF_REQUIRE_EXTENSION"):
                sys.exit("fastdiff: FASTDIFF_REQUIRE_EXTENSION=1 and the compiled extension cannot be built: "
                         + problem)
            self.extensions = []
            self._record = (torch_version, None, False, problem, debug)
            _banner([f"the compiled extension fastdiff._C is NOT built: {problem}",
                     "installing as pure Python: every op runs on its plain-PyTorch reference (correct, slower).",
                     "Install a C++ compiler with OpenMP (gcc; clang + libomp; Xcode + `brew install libomp`) and "
                     "reinstall for the kernels; FASTDIFF_REQUIRE_EXTENSION=1 makes this an error."])

    return ext, build_ext.with_options(use_ninja=True), torch_version


def main() -> None:
    cmdclass = {"build_py": build_py_with_info}
    ext_modules = []
    install_requires = [TORCH_FLOOR]
    if os.environ.get("FASTDIFF_EXTENSION", "") == "0":
        if _flag("FASTDIFF_REQUIRE_EXTENSION"):
            sys.exit("fastdiff: FASTDIFF_EXTENSION=0 and FASTDIFF_REQUIRE_EXTENSION=1 contradict each other")
        build_py_with_info.skipped_reason = "built without it on purpose (FASTDIFF_EXTENSION=0)"
    elif _BUILD_COMMANDS.intersection(sys.argv[1:]):
        try:
            import torch  # noqa: F401
        except ImportError:
            stop_without_torch()
        ext, build_ext, torch_version = extension_and_command()
        ext_modules = [ext]
        cmdclass["build_ext"] = build_ext
        major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
        install_requires = [f"torch=={major_minor}.*"]  # the C++ ABI holds within one major.minor only
    setup(
        packages=find_packages(include=["fastdiff", "fastdiff.*"]),
        ext_modules=ext_modules,
        install_requires=install_requires + DEPENDENCIES,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
