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


# the options of `hydra-pipe audit MODEL`; without MODEL the audit stage reads params.yaml's audit section
_MODEL_ONLY = ("data", "eps", "steps", "restarts", "norm", "ibp", "crown", "alpha_crown", "bab", "batch_size", "seed",
               "smoothing_sigma", "out", "bounds_out", "fail_under", "sweep_eps", "journal", "workers", "attacks",
               "float64")


def audit(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(help="an ONNX classifier; omit to run the pipeline's audit stage")] = None,
    data: Annotated[Optional[str], typer.Option(
        help=".npz with x (N x C x H x W, [0, 1]) and y, or 'digits' / 'fashion_mnist' (the test split) "
             "(required with MODEL)")] = None,
    eps: Annotated[Optional[float], typer.Option(help="perturbation radius (inputs in [0, 1]) (required with MODEL)")] = None,
    steps: Annotated[int, typer.Option(help="PGD steps; 0 runs no attack")] = 1000,
    restarts: Annotated[int, typer.Option(help="PGD random restarts")] = 100,
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    ibp: Annotated[bool, typer.Option("--ibp/--no-ibp", help="IBP verified accuracy")] = True,
    crown: Annotated[bool, typer.Option("--crown/--no-crown", help="CROWN verified accuracy")] = True,
    alpha_crown: Annotated[bool, typer.Option("--alpha-crown/--no-alpha-crown",
                                              help="alpha-CROWN on what CROWN left unverified")] = True,
    bab: Annotated[bool, typer.Option("--bab/--no-bab", help="branch and bound on what alpha-CROWN and the cheap "
                                                             "attacks left undecided")] = True,
    float64: Annotated[bool, typer.Option("--float64", help="compute the bounds in float64")] = False,
    attacks: Annotated[Optional[str], typer.Option(
        help="the attacks to run, e.g. apgd-ce,apgd-t (default all: apgd-ce, apgd-t, pgd, square; they run "
             "cheapest first whatever the order given)")] = None,
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
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Audit a model: clean accuracy, robust accuracy under APGD-CE, APGD-T, PGD and Square (worst case per example,
    confirmed on onnxruntime), verified accuracy by IBP, CROWN, alpha-CROWN and branch and bound.

    Without MODEL: the pipeline's audit stage on the quantized model, settings from params.yaml's `audit`.
    """
    if model is None:
        # by name: typer may carry its own copy of click's ParameterSource enum
        given = [f"--{n.replace('_', '-')}" for n in _MODEL_ONLY
                 if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
        if given:
            raise HydraPipeError(f"audit: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a MODEL "
                                 "(hydra-pipe audit MODEL.onnx ...); without MODEL the audit stage runs with "
                                 f"{params}'s audit section")
        from stages.audit import run

        run(params)
        return
    from pydantic import ValidationError

    from pipeline.audit.journal import discard_journal
    from pipeline.audit.records import write_results
    from pipeline.audit.report import render_report
    from pipeline.audit.run import run_audit
    from pipeline.config import AuditParams
    from pipeline.reporting import show, write_json

    if data is None or eps is None or out is None:
        missing = [o for o, v in (("--data", data), ("--eps", eps), ("--out", out)) if v is None]
        raise HydraPipeError(f"audit {model}: missing option(s) {', '.join(missing)}")
    floors = parse_floors(fail_under) if fail_under is not None else {}
    sweep = parse_sweep(sweep_eps) if sweep_eps is not None else []
    if not model.is_file():
        raise HydraPipeError(f"{model}: model file not found")
    try:
        chosen = {} if attacks is None else {"attacks": parse_attacks(attacks)}
        settings = AuditParams(eps=eps, steps=steps, restarts=restarts, norm=norm, ibp=ibp, crown=crown,
                               alpha_crown=alpha_crown, bab=bab, float64=float64, batch_size=batch_size, seed=seed,
                               n_examples=None, smoothing_sigma=smoothing_sigma, sweep_eps=sweep, workers=workers,
                               **chosen)
    except ValidationError as e:
        err = e.errors()[0]
        option = str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        raise HydraPipeError(f"--{option}: {err['msg']}") from None
    x, y = load_audit_data(data)
    report = run_audit(model, x, y, settings, bounds_out=bounds_out, source=data, journal=journal)
    write_results(report.examples, out)  # OUT's per-example results beside it (.examples.csv, .examples.jsonl)
    write_json(out, report.model_dump(mode="json"))
    if journal is not None:
        discard_journal(journal)  # only now: the report is safely written
    show(render_report(report))
    below = [f"{name} {_figure(report, name)} < {floor}" for name, floor in floors.items()
             if (_figure(report, name) or 0.0) < floor]
    if below:
        typer.echo(f"audit {model}: below the release floor: {'; '.join(below)}", err=True)
        raise typer.Exit(GATE_EXIT_CODE)


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
