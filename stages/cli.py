"""``hydra-pipe``: one Typer command per pipeline stage, plus ``hydra-pipe audit MODEL.onnx`` for any ONNX classifier.

Library errors (:class:`HydraPipeError`) become one line on stderr and exit code 2; nothing is half written.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pipeline.errors import HydraPipeError

if TYPE_CHECKING:  # numpy is imported lazily so `hydra-pipe --help` starts fast
    import numpy as np

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="HYDRA pruning of robust networks: pretrain -> prune -> finetune -> quantize -> audit -> export.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="the params file (one section per stage)")]


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HydraPipeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper


STAGE_HELP = {
    "pretrain": "Stage 1: train the dense network with pretrain.objective (benign, pgd, trades).",
    "prune": "Stage 2: prune with prune.method (hydra, lwm, random) and prune.objective.",
    "finetune": "Stage 3: train the kept weights (mask frozen) with finetune.objective.",
    "quantize": "Stage 4: fp32 ONNX export, then int8 static quantization (onnxruntime QDQ).",
    "export": "Stage 6: ship the audited int8 ONNX with its metadata, checked, with a model card.",
}


def _stage(name: str):
    """Register ``stages.<name>.run`` as the command ``hydra-pipe <name> [--params FILE]``."""

    @_one_line_errors
    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        import importlib

        importlib.import_module(f"stages.{name}").run(params)

    command.__doc__ = STAGE_HELP[name]
    app.command(name)(command)


for _name in ("pretrain", "prune", "finetune", "quantize"):
    _stage(_name)


def load_audit_data(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """``DATA`` of the audit contract: a .npz with ``x`` and ``y``, or a built-in dataset's test split."""
    import numpy as np

    from pipeline.config import DataParams
    from pipeline.data import as_arrays, load_dataset

    if spec == "digits":
        return as_arrays(load_dataset(DataParams(name="digits")).test)
    path = Path(spec)
    if not path.exists():
        raise HydraPipeError(f"--data: {spec} is neither an existing .npz file nor a built-in dataset (digits)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise HydraPipeError(f"{path}: missing array(s) {', '.join(missing)}; expected x (N x C x H x W float32) and y (N int64)")
            return f["x"], f["y"]
    except (OSError, ValueError) as e:
        raise HydraPipeError(f"{path}: not a readable .npz file ({e})") from None


@app.command("audit")
@_one_line_errors
def audit(
    model: Annotated[Optional[Path], typer.Argument(help="an ONNX classifier; omit to run the pipeline's audit stage")] = None,
    data: Annotated[Optional[str], typer.Option(help=".npz with x (N x C x H x W, [0, 1]) and y, or 'digits'")] = None,
    eps: Annotated[Optional[float], typer.Option(help="perturbation radius (inputs in [0, 1])")] = None,
    steps: Annotated[int, typer.Option(help="PGD steps; 0 runs no attack")] = 1000,
    restarts: Annotated[int, typer.Option(help="PGD random restarts")] = 100,
    norm: Annotated[str, typer.Option(help="linf or l2")] = "linf",
    ibp: Annotated[bool, typer.Option("--ibp/--no-ibp", help="IBP verified accuracy")] = True,
    crown: Annotated[bool, typer.Option("--crown/--no-crown", help="CROWN verified accuracy")] = True,
    alpha_crown: Annotated[bool, typer.Option("--alpha-crown/--no-alpha-crown",
                                              help="alpha-CROWN on what CROWN left unverified")] = True,
    batch_size: Annotated[int, typer.Option(help="memory budget: examples x restarts per attack batch")] = 4096,
    seed: Annotated[int, typer.Option(help="seed of the random starts")] = 0,
    smoothing_sigma: Annotated[Optional[float], typer.Option(
        help="also certify the Gaussian-smoothed model (CERTIFY, L2 radii) with this noise std")] = None,
    out: Annotated[Optional[Path], typer.Option(help="the report (JSON)")] = None,
    bounds_out: Annotated[Optional[Path], typer.Option(help="IBP / CROWN logit bounds (.npz)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Audit a model: clean accuracy, PGD robust accuracy (worst case per example), IBP / CROWN verified accuracy.

    Without MODEL: the pipeline's audit stage on the quantized model, settings from params.yaml's `audit`.
    """
    if model is None:
        from stages.audit import run

        run(params)
        return
    from pydantic import ValidationError

    from pipeline.audit import run_audit
    from pipeline.audit_report import render_report
    from pipeline.config import AuditParams
    from pipeline.reporting import show, write_json

    if data is None or eps is None or out is None:
        missing = [o for o, v in (("--data", data), ("--eps", eps), ("--out", out)) if v is None]
        raise HydraPipeError(f"audit {model}: missing option(s) {', '.join(missing)}")
    if not model.is_file():
        raise HydraPipeError(f"{model}: model file not found")
    try:
        settings = AuditParams(eps=eps, steps=steps, restarts=restarts, norm=norm, ibp=ibp, crown=crown, alpha_crown=alpha_crown,
                               batch_size=batch_size, seed=seed, n_examples=None, smoothing_sigma=smoothing_sigma)
    except ValidationError as e:
        err = e.errors()[0]
        raise HydraPipeError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    x, y = load_audit_data(data)
    report = run_audit(model, x, y, settings, bounds_out=bounds_out, source=data)
    write_json(out, report.model_dump(mode="json"))
    show(render_report(report))


_stage("export")  # registered last so `hydra-pipe --help` lists the stages in pipeline order


@app.command("info")
@_one_line_errors
def info(model: Annotated[Path, typer.Argument(help="an ONNX model, e.g. deploy/model.onnx")]) -> None:
    """Print what an exported model carries: sparsity, bit width, audit figures and settings, provenance."""
    import json

    from rich.table import Table

    from pipeline.onnx_io import read_metadata
    from pipeline.reporting import show

    if not model.is_file():
        raise HydraPipeError(f"{model}: model file not found")
    meta = read_metadata(model)
    table = Table(title=f"{model} ({model.stat().st_size:,} bytes)")
    table.add_column("key")
    table.add_column("value")
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    if not meta:
        table.add_row("(no metadata)", "this model was not exported by hydra-pipe")
    parsed = {}
    for key, raw in meta.items():
        try:
            parsed[key] = json.loads(raw)
        except ValueError:
            parsed[key] = raw
    for key, value in parsed.items():
        if isinstance(value, dict):  # per-layer figures and the audit: one row each
            for sub, v in value.items():
                table.add_row(f"{key}.{sub}", fmt(v))
        else:
            table.add_row(key, fmt(value))
    show(table)
