"""Turn a pytest-benchmark JSON file into a Markdown table: one row per case (group), the median time of
each implementation side by side, and the speed-up of fastdiff over each other implementation.

    python benchmarks/report.py bench.json [--baseline reference]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(data: dict, fast: str | None = None) -> str:
    groups: "OrderedDict[str, dict[str, dict]]" = OrderedDict()
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl", b["name"].split("[")[0].removeprefix("test_"))
        groups.setdefault(b.get("group") or b["name"], {})[impl] = b
    impls = []
    for g in groups.values():
        impls += [i for i in g if i not in impls]
    if fast is None:  # the implementation named fastdiff (or fused), else the first one
        fast = next((i for i in impls if "fastdiff" in i or "fused" in i), impls[0])
    others = [i for i in impls if i != fast]
    head = ["case"] + [f"{i} (median)" for i in impls] + [f"{fast} vs {o}" for o in others]
    extra_keys = sorted({k for g in groups.values() for b in g.values() for k in b.get("extra_info", {}) if k != "impl"})
    head += extra_keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in groups.items():
        row = [name] + [fmt_time(g[i]["stats"]["median"]) if i in g else "" for i in impls]
        for o in others:
            if fast in g and o in g:
                row.append(f"{g[o]['stats']['median'] / g[fast]['stats']['median']:.2f}x")
            else:
                row.append("")
        for k in extra_keys:
            vals = [str(b["extra_info"][k]) for b in g.values() if k in b.get("extra_info", {})]
            row.append(" / ".join(vals))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_file")
    p.add_argument("--fast", default=None, help="the implementation whose speed-up is reported "
                   "(default: the one named fastdiff or fused)")
    args = p.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', '?')}, {info.get('cpu', {}).get('count', '?')} cores; "
          f"python {info.get('python_version', '?')}; {data.get('datetime', '')}\n")
    print(table(data, args.fast))


if __name__ == "__main__":
    main()
