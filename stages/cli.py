"""``hydra-pipe``: one Typer command per pipeline stage, plus ``hydra-pipe audit MODEL.onnx`` for any ONNX classifier
and ``hydra-pipe info MODEL.onnx``.

This module is the app: it registers the commands, in pipeline order, and turns library errors
(:class:`HydraPipeError`) into one line on stderr and exit code 2 (3: a release floor not met); nothing is half
written. The commands live by job: :mod:`stages.launch` (a stage's process, torchrun workers included),
:mod:`stages.audit_cli` (the standalone audit and its release gate), :mod:`stages.info`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from pipeline.errors import HydraPipeError
from stages.audit_cli import audit
from stages.info import info
from stages.launch import ParamsOpt, run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="HYDRA pruning of robust networks: pretrain -> prune -> finetune -> quantize -> audit -> export.")


def one_line_errors(fn):
    """``fn`` as a command: a :class:`HydraPipeError` is one line on stderr and exit code 2, an interrupt exit
    code 130 with one line saying that nothing partial was written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HydraPipeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            # outputs are renamed into place whole, so none is partial; a training stage resumes on its rerun,
            # an audit (the stage, or MODEL with --journal) from its finished parts
            typer.echo("interrupted; no output was written (a training stage resumes from its last epoch, an audit "
                       "from its journal, when rerun)", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _stage_help() -> dict[str, str]:
    from typing import get_args

    from pipeline.config import Objective, PruneParams

    objectives = ", ".join(get_args(Objective))
    methods = ", ".join(get_args(PruneParams.model_fields["method"].annotation))
    return {
        "pretrain": f"Stage 1: train the dense network with pretrain.objective ({objectives}).",
        "prune": f"Stage 2: prune with prune.method ({methods}) and prune.objective ({objectives}).",
        "finetune": f"Stage 3: train the kept weights (mask frozen) with finetune.objective ({objectives}).",
        "quantize": "Stage 4: fp32 ONNX export, then int8 static quantization (onnxruntime QDQ).",
        "export": "Stage 6: ship the audited int8 ONNX with its metadata, checked, with a model card.",
        "report": "Last step: reports/report.html, one self-contained page of the run's figures (inline SVG).",
    }


STAGE_HELP = _stage_help()


def _stage(name: str) -> None:
    """Register ``stages.<name>.run`` as the command ``hydra-pipe <name> [--params FILE]``."""

    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        run_stage(name, params)

    command.__doc__ = STAGE_HELP[name]
    app.command(name)(one_line_errors(command))


# in pipeline order, as `hydra-pipe --help` lists them
for _name in ("pretrain", "prune", "finetune", "quantize"):
    _stage(_name)
# stage 5 without MODEL; `audit merge PARTS...` takes the parts as extra arguments
app.command("audit", context_settings={"allow_extra_args": True})(one_line_errors(audit))
_stage("export")
_stage("report")
app.command("info")(one_line_errors(info))
