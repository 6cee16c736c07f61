"""BENCHMARKS.md's headline table stays readable by benchmarks/plot_headline.py, which draws its plot."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_headline", ROOT / "benchmarks" / "plot_headline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_headline_table_parses_into_positive_speedups():
    rows = _plot_module().headline_rows((ROOT / "BENCHMARKS.md").read_text())
    assert len(rows) >= 10
    for r in rows:
        assert r["threads"] in ("1", "2"), r
        assert len(r["ratios"]) == 3, r
        assert any(v is not None for v in r["ratios"]), r
        assert all(v is None or 0.1 < v < 20 for v in r["ratios"]), r


def test_headline_table_missing_is_one_clear_error():
    with pytest.raises(SystemExit, match="no headline table"):
        _plot_module().headline_rows("# Benchmarks\n\nno table here\n")


def test_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "speedup.png"
    _plot_module().main([str(ROOT / "BENCHMARKS.md"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
