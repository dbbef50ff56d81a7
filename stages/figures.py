"""The README's generated blocks: the figure table (from the committed metrics and audit report), the audit
report's fields (from :class:`pipeline.audit.AuditReport`) and the ONNX ops the audit supports (from the
loader's vocabulary and the bounds' rule registry), never typed by hand.

``python -m stages.figures`` rewrites each block between its markers in README.md (``make repro`` runs it after
``dvc repro``); ``tests/test_readme.py`` fails when the README and what it is generated from disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.audit.report import AuditReport
from pipeline.config import load_params
from pipeline.reporting import atomic_write_bytes


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} by `python -m stages.figures`; do not edit -->", f"<!-- /generated:{name} -->"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def mean_spread(values: list[float | None]) -> str:
    """One seed's figure, or the seeds' mean ± half their range (the spread), in percent; ``-`` for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _pct(vals[0])
    mean, half = sum(vals) / len(vals), (max(vals) - min(vals)) / 2
    return f"{100 * mean:.1f} ± {100 * half:.1f}%"


def replace_block(text: str, marks: tuple[str, str], body: str) -> str:
    """``text`` with what lies between its two markers replaced by ``body`` (the markers stay)."""
    start, end = text.index(marks[0]) + len(marks[0]), text.index(marks[1])
    return text[:start] + "\n" + body + "\n" + text[end:]


def _attack_label(a) -> str:
    from pipeline.audit.attacks import ATTACK_SPECS

    return ATTACK_SPECS[a.name].label + \
        (" (float twin)" if a.model == "float twin" else "") + (f" {a.budget}" if a.name == "pgd" else "")


def _interval(audit: AuditReport, key: str) -> str:
    band = audit.confidence_intervals.get(key)
    return f"[{_pct(band[0])}, {_pct(band[1])}]" if band else ""


def table(root: Path = Path(".")) -> str:
    """The figure table (markdown) of the run whose outputs are under ``root``."""
    params = load_params(root / "params.yaml")
    # each stage's headline figures (metrics/, what DVC compares) and the rest (reports/)
    m = {s: {**json.loads((root / "metrics" / f"{s}.json").read_text()),
             **json.loads((root / "reports" / f"{s}.json").read_text())}
         for s in ("pretrain", "prune", "finetune", "quantize", "export")}
    audit = AuditReport.read(root / "reports" / "audit.json")
    pre, pr, fi, q, ex = (m[s] for s in ("pretrain", "prune", "finetune", "quantize", "export"))
    rows = [
        (f"pretrain (dense, {params.pretrain.epochs} epochs {params.pretrain.objective})",
         "clean / PGD-20 robust accuracy, test split", f"{_pct(pre['clean_accuracy'])} / {_pct(pre['pgd_robust_accuracy'])}"),
        (f"prune ({pr['method']}, {params.prune.epochs} score epochs)", "sparsity; clean / PGD-20 robust before finetuning",
         f"{_pct(pr['sparsity'])}; {_pct(pr['clean_accuracy'])} / {_pct(pr['pgd_robust_accuracy'])}"),
        (f"finetune ({params.finetune.epochs} epochs {params.finetune.objective})", "clean / PGD-20 robust",
         f"{_pct(fi['clean_accuracy'])} / {_pct(fi['pgd_robust_accuracy'])}"),
        ("quantize (int8 QDQ)", "fp32 -> int8 clean accuracy; predictions agreeing",
         f"{_pct(q['fp32_accuracy'])} -> {_pct(q['int8_accuracy'])}; {_pct(q['prediction_agreement'])}"),
        (f"audit (deployed int8, {audit.n} test images)",
         "clean / robust to the gradient attacks / after Square too [95% interval]",
         f"{_pct(audit.clean_accuracy)} / {_pct(audit.pgd_robust_accuracy)} / {_pct(audit.robust_accuracy)} "
         f"{_interval(audit, 'robust_accuracy')}"),
        ("audit", "IBP / CROWN / alpha-CROWN / branch and bound verified",
         f"{_pct(audit.ibp_verified_accuracy)} / {_pct(audit.crown_verified_accuracy)} / "
         f"{_pct(audit.alpha_crown_verified_accuracy)} / {_pct(audit.bab_verified_accuracy)}"),
        ("audit", "examples broken first by " + " / ".join(_attack_label(a) for a in audit.attacks),
         " / ".join(str(a.broken) for a in audit.attacks)),
        ("audit", "examples proven robust / broken / undecided",
         f"{audit.decided.verified} / {audit.decided.broken} / {audit.decided.undecided + audit.decided.timeout}"),
        ("export", "`deploy/model.onnx` / `.xz` archive",
         f"{ex['bytes'] / 1e3:.1f} kB / {ex['archive_bytes'] / 1e3:.1f} kB "
         f"(dense fp32 weights: {ex['dense_fp32_weight_bytes'] / 1e3:.1f} kB)"),
    ]
    lines = ["| stage | figure | value |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    return "\n".join(lines)


def report_fields(root: Path = Path(".")) -> str:
    """The audit report's JSON fields, their types and meaning, from the model itself."""
    schema = AuditReport.model_json_schema(mode="serialization")
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for name, prop in schema["properties"].items():
        kinds = [t.get("type", t.get("$ref", "").rpartition("/")[2]) for t in prop.get("anyOf", [prop])]
        kind = " or ".join(k if k != "null" else "null" for k in kinds if k) or "object"
        lines.append(f"| `{name}` | {kind} | {prop.get('description', '')} |")
    return "\n".join(lines)


def _op_forms(op: str) -> list[tuple[str, object]]:
    """The graph-form nodes the loader makes of ONNX op ``op``, labelled where an op has several forms: the
    arithmetic ops by their operands (a constant, or two computed tensors), every other op one node of its kind."""
    import torch

    from pipeline.graph import Binary, ConstBinary, Node
    from pipeline.onnx_load import GRAPH_OP

    if op in ("Add", "Sub", "Mul", "Div"):
        sign = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}[op]
        forms = [(f"x {sign} c", ConstBinary(op, torch.ones(1)), ("x",)), (f"x {sign} y", Binary(op), ("x", "y"))]
        if op in ("Sub", "Div"):  # not commutative: the constant first is another form
            forms.insert(1, (f"c {sign} x", ConstBinary(op, torch.ones(1), const_first=True), ("x",)))
        return [(label, Node(op, op, m, ins, op)) for label, m, ins in forms]
    kind = GRAPH_OP.get(op, op)
    return [("", Node(op, kind, torch.nn.Identity(), ("x",), op))]


def supported_ops(root: Path = Path(".")) -> str:
    """Every ONNX op the audit reads and what reaches it: the attack (the graph form's torch forward, all of
    them), IBP, and how CROWN's backward pass crosses it (exact, a linear relaxation, or cut: bounded by its
    interval box)."""
    from pipeline.bounds.ops import bound_support
    from pipeline.onnx_load import OUTPUT_STRIPPED_OPS, PASS_THROUGH_OPS, SUPPORTED_OPS

    crown_word = {"linear": "exact", "relaxed": "linear relaxation", "cut": "cut (interval box)", None: "no"}
    lines = ["| ONNX op | attack | IBP | CROWN |", "|---|---|---|---|"]
    for op in sorted(SUPPORTED_OPS):
        if op in PASS_THROUGH_OPS:
            lines.append(f"| {op} | pass-through | pass-through | pass-through |")
            continue
        cells = [(label, *bound_support(node)) for label, node in _op_forms(op)]

        def column(word) -> str:
            words = [word(c) for c in cells]
            if len(set(words)) == 1:
                return words[0]
            return "; ".join(f"`{label}`: {w}" for (label, *_), w in zip(cells, words))

        attack = "yes; stripped when the model's last op" if op in OUTPUT_STRIPPED_OPS else "yes"
        lines.append(f"| {op} | {attack} | {column(lambda c: 'yes' if c[1] else 'no')} | "
                     f"{column(lambda c: crown_word[c[2]])} |")
    return "\n".join(lines)


def paper_setups(root: Path = Path(".")) -> str:
    """The paper's setups (``configs/*.yaml``): the command, the threat model, and the compute each training stage
    needs, from ``benchmarks/paper_setups.py``'s measured training steps."""
    import yaml

    bench_path = root / "benchmarks" / "results" / "paper_setups.json"
    bench = {r["config"]: r for r in json.loads(bench_path.read_text())["rows"]} if bench_path.exists() else {}
    lines = ["| setup | network (weights) | objective, eps | epochs (pretrain / prune / finetune) | CPU hours per "
             "stage (measured images/s) | command |", "|---|---|---|---|---|---|"]
    for path in sorted((root / "configs").glob("*.yaml")):
        p = load_params(path)
        b = bench.get(path.stem)
        hours = (" / ".join(f"{b[f'{s}_cpu_hours']:.0f}" for s in ("pretrain", "prune", "finetune"))
                 + f" ({b['images_per_s']:.1f}/s)") if b else "not measured"
        weights = f" ({b['parameters'] / 1e6:.1f} M)" if b else ""
        eps = p.pretrain.eps * 255
        lines.append(f"| {p.data.name} | `{p.model.arch}`{weights} | {p.pretrain.objective}, {eps:g}/255 | "
                     f"{p.pretrain.epochs} / {p.prune.epochs} / {p.finetune.epochs} | {hours} | "
                     f"`cp configs/{path.name} params.yaml && dvc exp run` |")
    return "\n".join(lines)


FASHION_RUN = Path("runs") / "fashion"


def fashion_run(root: Path = Path(".")) -> str:
    """The Fashion-MNIST run's figure table (``runs/fashion/``, :func:`table`), or a line saying it has not been
    run while its outputs are not all there (a fresh clone has only what is committed)."""
    run = root / FASHION_RUN
    needed = [run / d / f"{s}.json" for d in ("metrics", "reports")
              for s in ("pretrain", "prune", "finetune", "quantize", "export")] + [run / "reports" / "audit.json"]
    if not all(p.is_file() for p in needed):
        return "Not run yet: `make repro-fashion` writes this table from `runs/fashion/metrics/` and `reports/`."
    return table(run)


BLOCKS = {"fashion-run": fashion_run, "figures": table, "audit-report": report_fields, "paper-setups": paper_setups, "supported-ops": supported_ops}


def readme_block(readme: str, name: str) -> str:
    """The generated block ``name`` of ``readme`` (between its markers, exclusive)."""
    start_mark, end_mark = _markers(name)
    start, end = readme.index(start_mark) + len(start_mark), readme.index(end_mark)
    return readme[start:end].strip("\n")


def main(root: Path = Path(".")) -> None:
    readme = (root / "README.md").read_text()
    for name, make in BLOCKS.items():
        readme = replace_block(readme, _markers(name), make(root))
    atomic_write_bytes(root / "README.md", readme.encode())


if __name__ == "__main__":
    main()
