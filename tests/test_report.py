"""The report page's parts: charts that draw what they are given, and DVC experiments read from their git refs."""

import json
import re
import subprocess

from stages.report import bar_chart, experiments, line_chart


def test_line_chart_draws_one_series_per_entry_inside_the_frame():
    svg = line_chart("c", "t", {"a": [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)], "b": [(0.0, 1.0), (1.0, 0.0)]}, "x", "y")
    lines = re.findall(r'<polyline class="series"[^>]*points="([^"]+)"', svg)
    assert len(lines) == 2
    coords = [tuple(map(float, p.split(","))) for pts in lines for p in pts.split()]
    assert all(0 <= x <= 560 and 0 <= y <= 300 for x, y in coords)
    assert coords[0][1] > coords[2][1]  # y grows upwards
    assert 'class="chart empty"' in line_chart("e", "t", {}, "x", "y")


def test_bar_chart_bar_heights_follow_the_values():
    svg = bar_chart("b", "t", [("low", 0.25), ("high", 1.0)], "y")
    heights = [float(h) for h in re.findall(r'<rect class="series"[^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 2 and abs(heights[1] / heights[0] - 4.0) < 0.01


def test_experiments_are_read_from_their_git_refs(tmp_path):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "metrics").mkdir()
    for sparsity, robust, name in ((0.9, 0.7, "exp-a"), (0.99, 0.5, "exp-b")):
        (tmp_path / "metrics/prune.json").write_text(json.dumps({"sparsity": sparsity}))
        (tmp_path / "metrics/audit.json").write_text(json.dumps({"clean_accuracy": 0.9, "robust_accuracy": robust}))
        git("add", "metrics")
        git("commit", "-q", "-m", name)
        git("update-ref", f"refs/exps/ab/cdef/{name}", "HEAD")
    rows = sorted(experiments(tmp_path), key=lambda r: r["name"])
    assert [(r["name"], r["sparsity"], r["robust"]) for r in rows] == [("exp-a", 0.9, 0.7), ("exp-b", 0.99, 0.5)]
    assert experiments(tmp_path.parent / "not-a-repo-at-all") == []
