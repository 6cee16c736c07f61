"""Checks that an sdist holds everything a build needs: ``python tools/check_sdist.py dist/fastdiff-*.tar.gz``.

It takes the files setup.py compiles (CPU and CUDA, from setup.py's own ``all_sources()``), follows every
``#include "..."`` from them (relative to the including file, as the compiler does; an include that names no
file in the checkout is an error), adds the files a build or a test run reads (setup.py, pyproject.toml,
MANIFEST.in, LICENSE, README.md, BENCHMARKS.md) and, in a git checkout, every tracked file outside ``.ci/``,
and names each one the sdist lacks. Exit status 0 when nothing is missing. Standard library only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
ALWAYS = ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "BENCHMARKS.md"]
NOT_SHIPPED = (".ci/", ".gitignore", ".gitattributes")  # repository plumbing, not part of the package


def compiled_sources(root: str = ROOT) -> list[str]:
    """setup.py's ``all_sources()``, loaded without running setup()."""
    spec = importlib.util.spec_from_file_location("_fastdiff_setup", os.path.join(root, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.all_sources()


def include_closure(sources: list[str], root: str = ROOT) -> tuple[set[str], list[str]]:
    """(every file reached from ``sources`` through ``#include "..."``, sources included; the includes that
    resolve to no file, as 'file: "name"'), paths relative to ``root`` with '/' separators."""
    seen: set[str] = set()
    unresolved: list[str] = []
    todo = [os.path.normpath(s) for s in sources]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for name in INCLUDE.findall(text):
            target = os.path.normpath(os.path.join(os.path.dirname(rel), name))
            if os.path.isfile(os.path.join(root, target)):
                todo.append(target)
            else:
                unresolved.append(f'{rel}: "{name}"')
    return {p.replace(os.sep, "/") for p in seen}, unresolved


def tracked_files(root: str = ROOT) -> list[str]:
    """git-tracked files (empty outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return [p for p in out.stdout.decode().split("\0") if p and not p.startswith(NOT_SHIPPED)]


def sdist_members(path: str) -> set[str]:
    """The regular files in the sdist, without the leading ``fastdiff-X.Y.Z/``."""
    with tarfile.open(path) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}


def missing_from(members: set[str], root: str = ROOT) -> tuple[list[str], list[str], int]:
    """(files a build or test needs that ``members`` lacks, unresolved includes, size of the include graph)."""
    needed, unresolved = include_closure(compiled_sources(root), root)
    graph = len(needed)
    needed |= set(ALWAYS) | set(tracked_files(root))
    return sorted(needed - members), unresolved, graph


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith(".tar.gz"):
        print("usage: python tools/check_sdist.py dist/fastdiff-X.Y.Z.tar.gz", file=sys.stderr)
        return 2
    members = sdist_members(argv[0])
    missing, unresolved, graph = missing_from(members)
    tops: dict[str, int] = {}
    for m in members:
        top = m.split("/", 1)[0] if "/" in m else "."
        tops[top] = tops.get(top, 0) + 1
    print(f"{argv[0]}: {len(members)} files, {os.path.getsize(argv[0]) / 1e3:.0f} kB ("
          + ", ".join(f"{k}/: {v}" if k != "." else f"top level: {v}" for k, v in sorted(tops.items())) + ")")
    print(f"include graph from setup.py's sources: {graph} files (csrc: {sum(m.startswith('csrc/') for m in members)} "
          "in the sdist)")
    for u in unresolved:
        print(f"UNRESOLVED #include {u}")
    for m in missing:
        print(f"MISSING from the sdist: {m}")
    if missing or unresolved:
        return 1
    print("sdist complete: every compiled file, every file it includes, and every tracked file is inside")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
