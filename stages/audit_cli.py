"""``hydra-pipe audit MODEL.onnx ...``: the standalone audit of any ONNX classifier (README "Contracts", 1).

Its options, its ``DATA`` (a .npz or a built-in dataset's test split), and the release gate ``--fail-under`` (exit
code :data:`GATE_EXIT_CODE` when a figure of the report is below its floor). Without MODEL the command is the
pipeline's audit stage, on ``params.yaml``'s ``audit`` section. Registered on the app by :mod:`stages.cli`, which
turns a :class:`HydraPipeError` into one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pipeline.errors import HydraPipeError
from stages.launch import ParamsOpt

if TYPE_CHECKING:  # numpy is imported lazily so `hydra-pipe --help` starts fast
    import numpy as np


BUILT_IN_DATA = ("digits", "fashion_mnist")
"""Datasets ``--data`` takes by name (their test split): the ones that need no ``data.root``."""


def load_audit_data(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """``DATA`` of the audit contract: a .npz with ``x`` and ``y``, or a built-in dataset's test split."""
    import numpy as np

    from pipeline.config import DataParams
    from pipeline.data import as_arrays, load_dataset

    if spec in BUILT_IN_DATA:  # their test split; fashion_mnist from Debian's folder (one line when absent)
        return as_arrays(load_dataset(DataParams(name=spec)).test)
    path = Path(spec)
    if not path.exists():
        raise HydraPipeError(f"--data: {spec} is neither an existing .npz file nor a built-in dataset "
                             f"({', '.join(BUILT_IN_DATA)})")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise HydraPipeError(f"{path}: missing array(s) {', '.join(missing)}; expected x (N x C x H x W float32) and y (N int64)")
            return f["x"], f["y"]
    except HydraPipeError:
        raise
    except Exception as e:  # OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error: a file, not a bug
        raise HydraPipeError(f"{path}: not a readable .npz file ({type(e).__name__}: {' '.join(str(e).split())})") from None


_SETTINGS = ("eps", "steps", "restarts", "norm", "ibp", "crown", "alpha_crown", "bab", "float64", "batch_size", "seed",
             "smoothing_sigma", "workers", "apgd_steps", "apgd_restarts", "apgd_targets", "square_queries",
             "square_restarts", "bab_domains", "bab_seconds", "n_examples", "budget")
"""The options that are AuditParams fields of the same name, as they are."""
_PARSED = ("attacks", "sweep_eps", "bab_shortfall", "verifier_share")
"""The options that are AuditParams fields once parsed (:func:`audit_settings`)."""
# the options of `hydra-pipe audit MODEL`; without MODEL the audit stage reads params.yaml's audit section
_MODEL_ONLY = ("data", "out", "bounds_out", "fail_under", "journal", "shard", *_SETTINGS, *_PARSED)
_MERGE_OPTIONS = ("out", "fail_under")
"""The options of ``hydra-pipe audit merge PARTS... --out REPORT.json``."""


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (by name: typer may carry its own copy of click's
    ParameterSource enum)."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def _none_or_float(option: str, spec: str) -> float | None:
    """``none`` -> None, else a number (one line otherwise)."""
    if spec.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(spec)
    except ValueError:
        raise HydraPipeError(f"--{option}: {spec!r}: expected a number or 'none'") from None


def audit_settings(ctx: typer.Context, options: dict, params_file: Path | None):
    """The audit's :class:`~pipeline.config.AuditParams`: ``params_file``'s audit section when given (else the
    defaults, every example), each option typed on the command line overriding it. An explicit ``--bab`` also
    asks for branch and bound without alpha-CROWN (``bab_alone``). A bad value is one line naming the option."""
    from pydantic import ValidationError

    from pipeline.config import AuditParams, load_params, located

    parsers = {"attacks": parse_attacks, "sweep_eps": parse_sweep,
               "bab_shortfall": lambda v: _none_or_float("bab-shortfall", v),
               "verifier_share": lambda v: _none_or_float("verifier-share", v)}
    values = load_params(params_file).audit.model_dump() if params_file is not None else {"n_examples": None}
    for name in (*_SETTINGS, *_PARSED):
        value = options[name]
        if (params_file is None or _given(ctx, name)) and value is not None:
            values[name] = parsers[name](value) if name in parsers else value
    if _given(ctx, "bab") and options["bab"]:
        values["bab_alone"] = True
    try:
        return AuditParams(**values)
    except ValidationError as e:  # a field's check or the section's (whose message starts with the field)
        where, msg = located(e.errors()[0])
        option = where.partition(".")[0].replace("_", "-") if where else "options"
        raise HydraPipeError(f"--{option}: {msg}") from None


def interrupted_line(journal: Path | None) -> str:
    """What Ctrl-C prints for ``hydra-pipe audit MODEL``: whether a rerun resumes."""
    if journal is None:
        return ("audit interrupted; no report written, and nothing will resume: the rerun starts over "
                "(--journal DIR keeps the finished parts)")
    return f"audit interrupted; no report written: the rerun with the same options resumes from {journal}"


def audit(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(help="an ONNX classifier; omit to run the pipeline's audit stage")] = None,
    data: Annotated[Optional[str], typer.Option(
        help=".npz with x (N x C x H x W, [0, 1]) and y, or 'digits' / 'fashion_mnist' (the test split) "
             "(required with MODEL)")] = None,
    eps: Annotated[Optional[float], typer.Option(
        help="perturbation radius (inputs in [0, 1]) (required with MODEL, unless --params gives it)")] = None,
    steps: Annotated[int, typer.Option(help="PGD steps; 0 runs no attack")] = 1000,
    restarts: Annotated[int, typer.Option(help="PGD random restarts")] = 100,
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    ibp: Annotated[bool, typer.Option("--ibp/--no-ibp", help="IBP verified accuracy")] = True,
    crown: Annotated[bool, typer.Option("--crown/--no-crown", help="CROWN verified accuracy")] = True,
    alpha_crown: Annotated[bool, typer.Option("--alpha-crown/--no-alpha-crown",
                                              help="alpha-CROWN on what CROWN left unverified")] = True,
    bab: Annotated[bool, typer.Option("--bab/--no-bab", help="branch and bound on what alpha-CROWN and the cheap "
                                                             "attacks left undecided (only with alpha-CROWN, "
                                                             "unless --bab is typed)")] = True,
    float64: Annotated[bool, typer.Option("--float64", help="compute the bounds in float64")] = False,
    attacks: Annotated[Optional[str], typer.Option(
        help="the attacks to run, e.g. apgd-ce,apgd-t (default all: apgd-ce, apgd-t, pgd, square; they run "
             "cheapest first whatever the order given)")] = None,
    budget: Annotated[Optional[str], typer.Option(
        help="card (default): every attack and verifier asked for; quick, a CI gate: AutoAttack's attacks (APGD-CE, "
             "APGD-T, Square) and IBP + CROWN only, and the report says so")] = None,
    apgd_steps: Annotated[int, typer.Option(help="APGD-CE and APGD-T iterations per restart")] = 100,
    apgd_restarts: Annotated[int, typer.Option(help="APGD random restarts")] = 1,
    apgd_targets: Annotated[int, typer.Option(help="APGD-T target classes")] = 9,
    square_queries: Annotated[int, typer.Option(help="Square queries per restart; 0 = off")] = 5000,
    square_restarts: Annotated[int, typer.Option(help="Square restarts")] = 1,
    bab_domains: Annotated[int, typer.Option(help="branch and bound's budget per example, in domains")] = 100,
    bab_seconds: Annotated[float, typer.Option(help="branch and bound's time cap per example (a timeout)")] = 30.0,
    bab_shortfall: Annotated[Optional[str], typer.Option(
        help="branch and bound searches only examples whose root bound is within this shortfall of a proof "
             "(default 0.25; 'none' = all)")] = None,
    verifier_share: Annotated[Optional[str], typer.Option(
        help="CROWN, alpha-CROWN and branch and bound are skipped (the report says why) when their estimated "
             "work per example exceeds this multiple of the attacks' requested work (default 1; 'none' = "
             "never skipped)")] = None,
    n_examples: Annotated[Optional[int], typer.Option(
        help="a seeded subset of DATA (default all; --params: its audit.n_examples)")] = None,
    batch_size: Annotated[int, typer.Option(help="memory budget: examples x restarts per attack batch")] = 4096,
    seed: Annotated[int, typer.Option(help="seed of the random starts")] = 0,
    smoothing_sigma: Annotated[Optional[float], typer.Option(
        help="also certify the Gaussian-smoothed model (CERTIFY, L2 radii) with this noise std")] = None,
    out: Annotated[Optional[Path], typer.Option(help="the report (JSON) (required with MODEL)")] = None,
    bounds_out: Annotated[Optional[Path], typer.Option(help="IBP / CROWN logit bounds (.npz)")] = None,
    fail_under: Annotated[Optional[str], typer.Option(
        help="release gate, e.g. robust=0.6,verified=0.4: exit code 3 when a figure of the report is below its "
             "floor (names: clean, pgd, robust, verified, ibp, crown, alpha_crown, bab)")] = None,
    sweep_eps: Annotated[Optional[str], typer.Option(
        help="robust accuracy vs eps, e.g. 0.05,0.1,0.2: the verifiers and a 100 x 5 PGD at each radius "
             "(the report's eps_sweep)")] = None,
    journal: Annotated[Optional[Path], typer.Option(
        help="folder for the finished parts' verdicts: a killed audit rerun with the same model, data and "
             "options resumes from them; emptied once the report is written")] = None,
    workers: Annotated[int, typer.Option(
        help="processes to shard the examples across (CPU cores; one per GPU with CUDA); the report equals "
             "one process's but for its seconds")] = 1,
    shard: Annotated[Optional[str], typer.Option(
        help="K/N: audit examples K, K+N, K+2N, ... only and write a part to --out (one per machine: a Slurm "
             "array task, a node); `hydra-pipe audit merge PARTS... --out REPORT.json` gives the one-process "
             "report. Under torchrun the ranks shard and merge by themselves")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Audit a model: clean accuracy, robust accuracy under APGD-CE, APGD-T, PGD and Square (worst case per example,
    confirmed on onnxruntime), verified accuracy by IBP, CROWN, alpha-CROWN and branch and bound, each verifier
    sized to the network against the attacks' requested work.

    With MODEL, --params FILE supplies its audit section's settings and the options typed override them.
    Without MODEL: the pipeline's audit stage on the quantized model, settings from params.yaml's `audit`.

    `hydra-pipe audit merge PARTS... --out REPORT.json`: the report of the parts that `--shard K/N` wrote.
    """
    extra = list(ctx.args)
    if model is not None and str(model) == "merge" and not model.is_file():
        merge(ctx, extra, out, fail_under)
        return
    if extra:
        raise HydraPipeError(f"audit: unexpected argument(s) {' '.join(extra)} (one MODEL; `hydra-pipe audit merge "
                             "PARTS... --out REPORT.json` merges shards)")
    if model is None:
        given = [f"--{n.replace('_', '-')}" for n in _MODEL_ONLY if _given(ctx, n)]
        if given:
            raise HydraPipeError(f"audit: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a MODEL "
                                 "(hydra-pipe audit MODEL.onnx ...); without MODEL the audit stage runs with "
                                 f"{params}'s audit section")
        from stages.audit import run

        run(params)
        return
    from pipeline.audit.journal import discard_journal
    from pipeline.audit.run import run_audit

    params_file = params if _given(ctx, "params") else None
    missing = [o for o, v in (("--data", data), ("--eps", eps if params_file is None else 0.0), ("--out", out))
               if v is None]
    if missing:
        raise HydraPipeError(f"audit {model}: missing option(s) {', '.join(missing)}")
    floors = parse_floors(fail_under) if fail_under is not None else {}
    if not model.is_file():
        raise HydraPipeError(f"{model}: model file not found")
    settings = audit_settings(ctx, dict(locals()), params_file)
    from pipeline.audit.shards import Part, Shard, gather_parts, merge_parts, shard_journal, write_part

    part = Shard.parse(shard) if shard is not None else None
    if part is not None and floors:
        raise HydraPipeError(f"--shard {shard}: --fail-under applies to the whole audit: give it to `hydra-pipe "
                             "audit merge`")
    ranks = Shard.from_torchrun() if part is None else None  # under torchrun: this rank's shard
    under_torchrun, part = ranks is not None, part or ranks
    journal = shard_journal(journal, part)  # a finished shard empties its own journal, not its siblings'
    x, y = load_audit_data(data)
    if settings.n_examples is not None and settings.n_examples < len(x):  # the stage's seeded subset
        import numpy as np

        idx = np.sort(np.random.default_rng(settings.seed).choice(len(x), size=settings.n_examples, replace=False))
        x, y = x[idx], y[idx]
    try:
        report = run_audit(model, x, y, settings, bounds_out=bounds_out, source=data, journal=journal, shard=part,
                           progress=not under_torchrun or part.index == 0)
    except KeyboardInterrupt:
        typer.echo(interrupted_line(journal), err=True)
        raise typer.Exit(130) from None
    if part is not None:
        from pipeline.audit.journal import journal_key

        key = journal_key(model, x, y, {"params": settings.model_dump(mode="json")})[1]
        mine = Part(str(out), part, key, report, report.examples)
        if not under_torchrun:
            write_part(out, mine)
            if journal is not None:
                discard_journal(journal)
            typer.echo(f"audit shard {part}: {len(report.examples)} of {report.n} examples -> {out}; merge the "
                       f"{part.count} parts with: hydra-pipe audit merge PARTS... --out REPORT.json")
            return
        parts = gather_parts(mine)
        if journal is not None:
            discard_journal(journal)
        if parts is None:  # rank > 0: rank 0 writes the report
            return
        report = merge_parts(parts)
    _finish(report, out, floors, f"audit {model}")
    if journal is not None:
        discard_journal(journal)  # only now: the report is safely written


def _finish(report, out: Path, floors: dict[str, float], what: str) -> None:
    """Write ``report`` to ``out`` with its per-example results beside it, show it, and apply the release gate."""
    from pipeline.audit.records import write_results
    from pipeline.audit.report import render_report
    from pipeline.reporting import show, write_json

    write_results(report.examples, out)  # OUT's per-example results beside it (.examples.csv, .examples.jsonl)
    write_json(out, report.model_dump(mode="json"))
    show(render_report(report))
    below = [f"{name} {_figure(report, name)} < {floor}" for name, floor in floors.items()
             if (_figure(report, name) or 0.0) < floor]
    if below:
        typer.echo(f"{what}: below the release floor: {'; '.join(below)}", err=True)
        raise typer.Exit(GATE_EXIT_CODE)


def merge(ctx: typer.Context, paths: list[str], out: Path | None, fail_under: str | None) -> None:
    """``hydra-pipe audit merge PARTS... --out REPORT.json``: the one-process report from the parts of
    ``--shard K/N`` (:func:`pipeline.audit.shards.merge_parts`), with the per-example results beside it."""
    from pipeline.audit.shards import merge_parts, read_part

    given = [f"--{n.replace('_', '-')}" for n in _MODEL_ONLY if n not in _MERGE_OPTIONS and _given(ctx, n)]
    if given:
        raise HydraPipeError(f"audit merge: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to an audit, "
                             "not to a merge (the parts carry their settings)")
    if not paths or out is None:
        raise HydraPipeError("audit merge: expected the parts and --out: hydra-pipe audit merge PARTS... --out "
                             "REPORT.json")
    floors = parse_floors(fail_under) if fail_under is not None else {}
    report = merge_parts([read_part(Path(p)) for p in paths])
    _finish(report, out, floors, f"audit merge ({len(paths)} parts)")


GATE_EXIT_CODE = 3
"""``hydra-pipe audit --fail-under``: a figure fell below its floor (2 stays "bad input")."""

_GATE_FIGURES = {"clean": "clean_accuracy", "pgd": "pgd_robust_accuracy", "robust": "robust_accuracy",
                 "verified": "verified_accuracy", "ibp": "ibp_verified_accuracy", "crown": "crown_verified_accuracy",
                 "alpha_crown": "alpha_crown_verified_accuracy", "bab": "bab_verified_accuracy"}


def parse_floors(spec: str) -> dict[str, float]:
    """``robust=0.6,verified=0.4`` -> {"robust": 0.6, "verified": 0.4}; a bad entry is one line."""
    floors = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in _GATE_FIGURES:
            raise HydraPipeError(f"--fail-under: {item!r}: expected NAME=FLOOR with NAME one of {', '.join(_GATE_FIGURES)}")
        try:
            floor = float(value)
        except ValueError:
            raise HydraPipeError(f"--fail-under: {item!r}: the floor must be a number in [0, 1]") from None
        if not 0.0 <= floor <= 1.0:
            raise HydraPipeError(f"--fail-under: {item!r}: the floor must be a number in [0, 1]")
        floors[name.strip()] = floor
    if not floors:
        raise HydraPipeError("--fail-under: expected NAME=FLOOR[,NAME=FLOOR...], e.g. robust=0.6,verified=0.4")
    return floors


def parse_attacks(spec: str) -> list[str]:
    """``apgd-ce,pgd`` -> ["apgd-ce", "pgd"]; an unknown name is one line listing the choices."""
    from pipeline.config import ATTACK_ORDER

    names = [part.strip() for part in spec.split(",") if part.strip()]
    bad = [name for name in names if name not in ATTACK_ORDER]
    if bad or not names:
        raise HydraPipeError(f"--attacks: {', '.join(bad) or repr(spec)}: expected names from "
                             f"{', '.join(ATTACK_ORDER)}, separated by commas")
    return list(dict.fromkeys(names))


def parse_sweep(spec: str) -> list[float]:
    """``0.05,0.1,0.2`` -> [0.05, 0.1, 0.2]; a bad entry is one line (the range is AuditParams' to check)."""
    radii = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            radii.append(float(item))
        except ValueError:
            raise HydraPipeError(f"--sweep-eps: {item!r} is not a number (expected e.g. 0.05,0.1,0.2)") from None
    if not radii:
        raise HydraPipeError("--sweep-eps: expected radii separated by commas, e.g. 0.05,0.1,0.2")
    return radii


def _figure(report, name: str) -> float | None:
    """A gated figure of the report; a part that did not run counts as 0 (a gate cannot pass on nothing)."""
    return getattr(report, _GATE_FIGURES[name])
