"""``hydra-pipe report``: the run as one self-contained HTML page a person would rather look at than read.

Every chart is inline SVG drawn here: no script, no stylesheet, no font from anywhere else, so the page shows the
same offline, in a browser, in a CI artifact or attached to a mail (``dvc plots show``'s own page loads vega from a
CDN and shows nothing offline). It reads only what the stages wrote (``metrics/``, ``reports/``, ``plots/``), the
shipped and dense models for their size and latency, and the DVC experiments' committed figures from git.

The page holds this machine's measurements (the latency chart, the cactus curve's seconds), so it is this machine's
view, not a record: git ignores it and it is not a DVC output (its hash would change ``dvc.lock`` on every run); the
report stage is ``always_changed`` in ``dvc.yaml``, so every ``dvc repro`` redraws it (a few seconds).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import yaml

from pipeline.audit.records import cactus, read_results, results_paths, with_timings
from pipeline.audit.report import AuditReport
from pipeline.config import load_params
from pipeline.onnx_io import ort_session
from pipeline.reporting import atomic_write_bytes, layer_labels
from stages.common import AUDIT_REPORT, AUDIT_TIMINGS, FP32_ONNX, HEADLINE, METRICS, PLOTS, REPORTS, SHIPPED, require

REPORT_HTML = REPORTS / "report.html"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H, PAD = 560, 300, 56

Series = dict[str, Sequence[tuple[float, float]]]


def _scale(v: float, lo: float, hi: float, a: float, b: float, log: bool = False) -> float:
    if log:
        v, lo, hi = (math.log10(max(t, 1e-12)) for t in (v, lo, hi))
    return a if hi == lo else a + (v - lo) / (hi - lo) * (b - a)


def line_chart(name: str, title: str, series: Series, xlabel: str, ylabel: str, *, xlog: bool = False,
               ylim: tuple[float, float] | None = (0.0, 1.0), xlim: tuple[float, float] | None = None,
               colors: Mapping[str, str] | None = None, dashed: Collection[str] = (), note: str = "",
               legend_left: bool = False) -> str:
    """An SVG line chart: one polyline (and its points) per series, axes with min/max ticks, a legend naming each
    series in its colour (``colors``: a series' colour, else the palette's next; ``dashed``: series drawn dashed).
    A series of one point is a larger dot (a headline figure beside a curve). ``note``: a caption under it;
    ``legend_left``: the legend in the top left corner (where the data is on the right)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return _empty(name, title, "nothing measured")
    xs = [p[0] for p in points]
    x_lo, x_hi = xlim or ((min(x for x in xs if x > 0) if xlog else min(xs)), max(xs))
    y_lo, y_hi = ylim if ylim else (min(p[1] for p in points), max(p[1] for p in points))
    body = [_axes(x_lo, x_hi, y_lo, y_hi, xlabel, ylabel, xlog)]
    for i, (label, pts) in enumerate(series.items()):
        color = (colors or {}).get(label, PALETTE[i % len(PALETTE)])
        xy = [(_scale(x, x_lo, x_hi, PAD, W - 16, xlog), _scale(y, y_lo, y_hi, H - PAD, 16)) for x, y in pts
              if not (xlog and x <= 0)]
        dash = ' stroke-dasharray="6 4"' if label in dashed else ""
        body.append(f'<polyline class="series" data-series="{html.escape(label)}" fill="none" stroke="{color}" '
                    f'stroke-width="2"{dash} points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}"/>')
        r = 6 if len(xy) == 1 else 3
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}"/>' for x, y in xy]
        key = label + (" (dashed)" if label in dashed else "")
        x_text, anchor = (PAD + 8, "start") if legend_left else (W - 16, "end")
        body.append(f'<text class="legend" x="{x_text}" y="{24 + 16 * i}" fill="{color}" font-size="12" '
                    f'text-anchor="{anchor}">{html.escape(key)}</text>')
    return _figure(name, title, body, note)


def bar_chart(name: str, title: str, bars: Sequence[tuple[str, float]], ylabel: str,
              ylim: tuple[float, float] = (0.0, 1.0), fmt: str = "{:.1%}", note: str = "") -> str:
    """An SVG bar chart, one bar per ``(label, value)``, the value written above it; ``note``: a caption under it."""
    if not bars:
        return _empty(name, title, "nothing measured")
    step = (W - PAD - 16) / len(bars)
    body = [_axes(0, len(bars), *ylim, "", ylabel, False, xticks=False)]
    for i, (label, value) in enumerate(bars):
        top = _scale(value, *ylim, H - PAD, 16)
        x = PAD + i * step + step * 0.15
        body.append(f'<rect class="series" x="{x:.1f}" y="{top:.1f}" width="{step * 0.7:.1f}" '
                    f'height="{max(H - PAD - top, 0.5):.1f}" fill="{PALETTE[i % len(PALETTE)]}"/>')
        body.append(f'<text x="{x + step * 0.35:.1f}" y="{top - 4:.1f}" font-size="11" text-anchor="middle">'
                    f'{html.escape(fmt.format(value))}</text>')
        body.append(f'<text x="{x + step * 0.35:.1f}" y="{H - PAD + 14}" font-size="11" text-anchor="middle">'
                    f'{html.escape(label)}</text>')
    return _figure(name, title, body, note)


def _axes(x_lo: float, x_hi: float, y_lo: float, y_hi: float, xlabel: str, ylabel: str, xlog: bool,
          xticks: bool = True) -> str:
    parts = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 16}" y2="{H - PAD}" stroke="#444"/>',
             f'<line x1="{PAD}" y1="16" x2="{PAD}" y2="{H - PAD}" stroke="#444"/>',
             f'<text x="{PAD - 6}" y="{H - PAD}" font-size="11" text-anchor="end">{y_lo:.3g}</text>',
             f'<text x="{PAD - 6}" y="22" font-size="11" text-anchor="end">{y_hi:.3g}</text>',
             f'<text x="{(W + PAD) / 2}" y="{H - 8}" font-size="12" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="14" y="{H / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {H / 2})">'
             f'{html.escape(ylabel)}</text>']
    if xticks:
        parts += [f'<text x="{PAD}" y="{H - PAD + 14}" font-size="11" text-anchor="middle">{x_lo:.3g}</text>',
                  f'<text x="{W - 16}" y="{H - PAD + 14}" font-size="11" text-anchor="middle">{x_hi:.3g}</text>']
        if xlog:
            parts.append(f'<text x="{(W + PAD) / 2}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">'
                         'log scale</text>')
    return "".join(parts)


def _figure(name: str, title: str, body: list[str], note: str = "") -> str:
    caption = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return (f'<figure class="chart" data-chart="{name}"><figcaption>{html.escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f'{"".join(body)}</svg>{caption}</figure>')


def _empty(name: str, title: str, why: str) -> str:
    return (f'<figure class="chart empty" data-chart="{name}"><figcaption>{html.escape(title)}</figcaption>'
            f'<p>{html.escape(why)}</p></figure>')


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _latency_ms(path: Path, shape: tuple[int, ...], repeats: int = 200) -> float:
    """Median onnxruntime latency of one image, one thread (what a small deployment sees)."""
    session = ort_session(path, threads=1)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    for _ in range(10):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


EXPERIMENT_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}(?:[0-9a-f]{24})?/(?P<name>[^/]+)$")
"""A DVC experiment's ref: ``refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>``. DVC's other refs under
``refs/exps`` are its machinery (``exec/EXEC_BASELINE``, ``exec/EXEC_HEAD``, ``exec/EXEC_BRANCH`` of a run in
progress or left behind, ``celery/...``, stashes), not experiments: the baseline and its runs again."""


def experiments(root: Path) -> list[dict]:
    """The DVC experiments' committed figures, read from their git refs (:data:`EXPERIMENT_REF`) without DVC, whose
    repo lock a running ``dvc repro`` holds: ``[{name, sparsity, clean, robust, method}]``, each commit once and
    never the workspace's own commit (HEAD: the baseline, which the page draws from the workspace); [] without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        listing = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
        head = git("rev-parse", "--verify", "-q", "HEAD").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    seen = {head}
    rows = []
    for line in listing.stdout.splitlines():
        sha, _, ref = line.partition(" ")
        match = EXPERIMENT_REF.match(ref)
        if match is None or sha in seen:
            continue
        seen.add(sha)

        def show(path: str) -> str:
            try:
                res = git("show", f"{sha}:{path}")
            except (OSError, subprocess.SubprocessError):
                return ""
            return res.stdout if res.returncode == 0 else ""

        try:
            prune = json.loads(show("metrics/prune.json") or "{}")
            audit = json.loads(show("metrics/audit.json") or "{}")
            params = yaml.safe_load(show("params.yaml")) or {}
        except (ValueError, yaml.YAMLError):
            continue
        if "sparsity" in prune and "robust_accuracy" in audit:
            method = (params.get("prune") or {}).get("method", "hydra") if isinstance(params, dict) else "hydra"
            rows.append({"name": match["name"], "sparsity": prune["sparsity"], "clean": audit["clean_accuracy"],
                         "robust": audit["robust_accuracy"], "method": str(method)})
    return rows


def sparsity_chart(runs: Sequence[dict], n_experiments: int) -> str:
    """Clean and robust accuracy vs sparsity, one pair of series per pruning method (a line joins only the runs
    of one method; robust dashed, in the method's colour)."""
    methods = sorted({r["method"] for r in runs})
    series: dict[str, list[tuple[float, float]]] = {}
    colors, dashed = {}, []
    for i, method in enumerate(methods):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["sparsity"])
        clean, robust = f"{method}: clean", f"{method}: robust (audit)"
        series[clean] = [(r["sparsity"], r["clean"]) for r in mine]
        series[robust] = [(r["sparsity"], r["robust"]) for r in mine if r["robust"] is not None]
        colors[clean] = colors[robust] = PALETTE[i % len(PALETTE)]
        dashed.append(robust)
    runs_word = "experiment" if n_experiments == 1 else "experiments"
    return line_chart("sparsity", f"Accuracy vs sparsity across DVC experiments ({n_experiments} {runs_word} besides "
                      "the workspace), one colour per pruning method", series, "sparsity", "accuracy",
                      ylim=(0.0, 1.0), xlim=(0.0, 1.0), colors=colors, dashed=dashed, legend_left=True)


def eps_chart(audit: AuditReport) -> str:
    """The eps sweep's curves, and the audit's headline figures at its own eps: the verified accuracy of every
    verifier that ran (branch and bound included, which the sweep does not run) and the robust accuracy under every
    attack (the sweep runs a smaller PGD)."""
    by_eps: Series = {}
    for key, label in (("pgd_robust", "PGD (sweep)"), ("ibp_verified", "IBP"), ("crown_verified", "CROWN"),
                       ("alpha_crown_verified", "alpha-CROWN")):
        pts = sorted((p.eps, v) for p in audit.eps_sweep if (v := getattr(p, key)) is not None)
        if pts:
            by_eps[label] = pts
    if audit.robust_accuracy is not None:
        by_eps[f"robust, all attacks at eps {audit.eps:g}"] = [(audit.eps, audit.robust_accuracy)]
    if audit.verified_accuracy is not None:
        by_eps[f"verified ({audit.verified_method}) at eps {audit.eps:g}"] = [(audit.eps, audit.verified_accuracy)]
    return line_chart("eps", f"Robust and verified accuracy vs eps ({audit.norm}), {audit.n} test images; the dots: "
                      "the audit's headline figures", by_eps, "eps", "accuracy")


INT8_SLOWER = ("Why the int8 model is slower here: on a network this small, at batch 1, the quantize and "
               "dequantize steps around each int8 layer cost more than the integer arithmetic saves. int8 pays off "
               "in time on larger networks and batches; its size saving (the chart beside) holds regardless.")


def latency_chart(lat_fp32: float, lat_int8: float) -> str:
    """The two latencies; a caption says why when the int8 model is the slower one."""
    top = max(lat_int8, lat_fp32) * 1.15 or 1.0
    return bar_chart("latency", "Latency of one image, onnxruntime, 1 thread (ms, median of 200)",
                     [("dense fp32", lat_fp32), ("shipped int8", lat_int8)], "ms", ylim=(0.0, top), fmt="{:.3f}",
                     note=INT8_SLOWER if lat_int8 > lat_fp32 else "")


def onnx_layer_kinds(path: Path) -> dict[str, str]:
    """``{layer: conv or fc}`` of an exported graph whose initializers keep the torch names (``1.weight``)."""
    kinds = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        for name in node.input:
            if name.endswith(".weight") and node.op_type in ("Conv", "Gemm", "MatMul"):
                kinds[name[:-len(".weight")]] = "conv" if node.op_type == "Conv" else "fc"
    return kinds


def layers_chart(rows: Sequence[dict[str, str]], kinds: Mapping[str, str]) -> str:
    """Sparsity per pruned layer, each bar named for people (:func:`pipeline.reporting.layer_labels`) with the
    weights it kept, and how the rates were chosen (``prune.rates``; learned rates are these counts)."""
    labels = layer_labels({r["layer"]: kinds.get(r["layer"], "layer") for r in rows})

    def label(r: dict[str, str]) -> str:
        return f"{labels[r['layer']]} ({r['kept']}/{r['weights']} kept)" if r.get("weights") else labels[r["layer"]]

    rates = rows[0].get("rates") if rows else None
    title = "Sparsity per pruned layer" + (f" (prune.rates: {rates})" if rates else "")
    return bar_chart("layers", title, [(label(r), float(r["sparsity"])) for r in rows], "sparsity")


def build(root: Path = Path(".")) -> str:
    """The HTML page of the run under ``root``."""
    params = load_params(root / "params.yaml")
    audit = AuditReport.read(root / AUDIT_REPORT)
    figures = {s: {**_json(root / METRICS / f"{s}.json"), **_json(root / REPORTS / f"{s}.json")} for s in HEADLINE}
    charts: list[str] = []

    charts.append(eps_chart(audit))
    # VNN-COMP's cactus plot, from the per-example results file: examples decided vs the seconds they took
    results = results_paths(root / AUDIT_REPORT)[1]  # the verdicts (tracked); the seconds are this machine's own
    curve = cactus(with_timings(read_results(results), root / AUDIT_TIMINGS)) if results.is_file() else []
    charts.append(line_chart("cactus", f"Examples decided (proven, broken or clean-wrong) vs cumulative seconds, of "
                             f"{audit.n} audited", {"decided": [(t, float(k)) for t, k in curve]},
                             "cumulative seconds (fastest verdicts first)", "examples decided", ylim=(0.0, audit.n)))
    steps = [(max(float(k), 0.5), v) for k, v in audit.robust_accuracy_by_step.items()]
    restarts = [(float(i + 1), v) for i, v in enumerate(audit.robust_accuracy_by_restart)]
    charts.append(line_chart("budget", "PGD robust accuracy vs attack budget: is the verdict converged?",
                             {"vs steps (all restarts)": steps, "vs restarts (all steps)": restarts},
                             "steps or restarts", "robust accuracy", xlog=True))
    exps = experiments(root)
    here = {"name": "workspace", "sparsity": figures["prune"].get("sparsity", 0.0), "method": params.prune.method,
            "clean": audit.clean_accuracy, "robust": audit.robust_accuracy or 0.0}
    charts.append(sparsity_chart([*exps, here], len(exps)))
    hist = _csv(root / PLOTS / "prune_weights.csv")
    charts.append(line_chart("weights", "The paper's weight histogram: |w| / max|w| of the pretrained network and of "
                             "the weights each mask keeps", {col: [(float(r["magnitude"]), float(r[col])) for r in hist]
                                                             for col in ("pretrained", "kept_lwm", "kept_mask")},
                             "normalised magnitude", "fraction of weights", ylim=None))
    layers = _csv(root / PLOTS / "prune_layers.csv")
    charts.append(layers_chart(layers, onnx_layer_kinds(root / FP32_ONNX)))
    shipped = ort_session(root / SHIPPED)
    shape = tuple(int(d) for d in shipped.get_inputs()[0].shape[1:])
    warning = shipped.get_modelmeta().custom_metadata_map.get("warning")  # below export.floor, shipped anyway
    lat_int8, lat_fp32 = _latency_ms(root / SHIPPED, shape), _latency_ms(root / FP32_ONNX, shape)
    ex = figures["export"]
    sizes = [("dense fp32 weights", ex.get("dense_fp32_weight_bytes", 0) / 1e3), ("shipped int8", ex.get("bytes", 0) / 1e3),
             (".xz archive", ex.get("archive_bytes", 0) / 1e3)]
    top = max(v for _, v in sizes) * 1.15
    charts.append(bar_chart("size", "Size of the shipped model against the dense fp32 one (kB)", sizes, "kB",
                            ylim=(0.0, top), fmt="{:.1f}"))
    charts.append(latency_chart(lat_fp32, lat_int8))

    rows = "".join(f"<tr><th>{s}</th>" + "".join(f"<td>{html.escape(k)}: {_fmt(v)}</td>" for k, v in
                                                  ((k, figures[s].get(k)) for k in HEADLINE[s])) + "</tr>"
                   for s in HEADLINE)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hydra-pipe: {html.escape(params.model.arch)} on {html.escape(params.data.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.charts{{display:flex;flex-wrap:wrap;gap:16px}}figure{{margin:0;border:1px solid #ddd;padding:8px}}
figcaption{{font-weight:bold;max-width:{W}px;margin-bottom:4px}}.note{{max-width:{W}px;font-size:13px;margin:4px 0 0}}
.warning{{color:#b00;border:2px solid #b00;padding:8px}}</style></head>
<body><h1>hydra-pipe: {html.escape(params.model.arch)} on {html.escape(params.data.name)}</h1>
{f'<p class="warning"><strong>WARNING: the shipped model is {html.escape(warning)}.</strong></p>' if warning else ''}
<p>{html.escape(params.prune.method)} pruning to {_fmt(figures['prune'].get('sparsity'))} sparsity, int8, audited on
{audit.n} test images at {audit.norm} eps = {audit.eps:g}: clean {_fmt(audit.clean_accuracy)}, robust under attack
{_fmt(audit.robust_accuracy)}, verified {_fmt(audit.verified_accuracy)} ({html.escape(audit.verified_method)}).</p>
<h2>Stages</h2><table>{rows}</table>
<h2>Figures</h2><div class="charts">{''.join(charts)}</div>
</body></html>
"""


def _fmt(v) -> str:
    if isinstance(v, float) and 0.0 <= v <= 1.0:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def run(params_path: Path = Path("params.yaml")) -> Path:
    load_params(params_path)  # a bad params file stops the report like any stage
    require(AUDIT_REPORT, FP32_ONNX, SHIPPED)  # a missing one names the stage to run first
    atomic_write_bytes(REPORT_HTML, build(Path(".")).encode())
    return REPORT_HTML
