"""Stage 6: the deployable model: the audited int8 graph with its provenance and audit in the ONNX metadata,
checked with onnx's checker and for parity with the PyTorch model, and a model card beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from pipeline.checkpoint import load_checkpoint
from pipeline.config import params_hash
from pipeline.data import as_arrays
from pipeline.errors import HydraPipeError
from pipeline.masking import sparsity_report
from pipeline.onnx_io import ort_logits, ort_session, read_metadata, set_metadata
from pipeline.reporting import atomic_write_bytes, metrics_table, show, write_json
from pipeline.training import torch_logits
from stages.common import AUDIT_REPORT, FINETUNED, INT8_ONNX, METRICS, MODEL_CARD, SHIPPED, setup

AUDIT_KEYS = ("n", "eps", "norm", "steps", "restarts", "clean_accuracy", "pgd_robust_accuracy",
              "ibp_verified_accuracy", "crown_verified_accuracy")


def model_card(meta: dict[str, str], audit: dict, export_metrics: dict) -> str:
    def pct(v) -> str:
        return "not measured" if v is None else f"{100 * v:.1f}%"

    layers = json.loads(meta["sparsity_per_layer"])
    rows = "\n".join(f"| {n} | {100 * s:.1f}% |" for n, s in layers.items())
    return f"""# Model card: {meta['arch']} on {meta['dataset']}

**What it is.** A {meta['arch']} classifier for {meta['dataset']}, pruned with {meta['prune_method']}
to {100 * float(meta['sparsity']):.1f}% sparsity and quantized to {meta['bits']}-bit integers (onnxruntime QDQ).
File: `{SHIPPED.name}` ({export_metrics['bytes']:,} bytes). Input `input`: float32, batch x {meta['input_shape']},
pixel values in [0, 1] (normalisation is inside the graph). Output `logits`: batch x {meta['classes']}.

**How robust it is, as deployed** (audit of this exact file on {audit['n']} test images, L-{audit['norm'].replace('l', '')}
radius eps = {audit['eps']}):
- Clean accuracy: {pct(audit['clean_accuracy'])}.
- Robust accuracy under PGD ({audit['steps']} steps x {audit['restarts']} random restarts, worst case per image):
  {pct(audit['pgd_robust_accuracy'])}. This is an upper bound on true robustness: a stronger attack could lower it.
- Verified robust accuracy (no attack within eps can change these predictions): IBP {pct(audit['ibp_verified_accuracy'])},
  CROWN {pct(audit['crown_verified_accuracy'])}. This is a lower bound that no attack can overturn.

**Provenance.** params hash `{meta['params_hash']}`; data split hash `{meta['data_hash']}`; training objectives:
pretrain `{meta['pretrain_objective']}`, prune `{meta['prune_objective']}`, finetune `{meta['finetune_objective']}`.
The same figures are in the ONNX metadata (`hydra-pipe info {SHIPPED}` or `onnx.load(...).metadata_props`).

Predictions agree with the fp32 PyTorch model on {pct(export_metrics['agreement_with_pytorch'])} of the test split.

| layer | sparsity |
|---|---|
{rows}
"""


def run(params_path: Path) -> dict:
    params, data, _ = setup(params_path)
    try:
        audit = json.loads(AUDIT_REPORT.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise HydraPipeError(f"{AUDIT_REPORT}: audit report missing or unreadable ({e})") from None
    model, ckpt_meta = load_checkpoint(FINETUNED)
    info = data.info
    layers = {n: round(r["sparsity"], 6) for n, r in sparsity_report(model).items()}
    meta = {
        "arch": params.model.arch, "dataset": params.data.name, "classes": str(info.classes),
        "input_shape": f"{info.channels}x{info.size}x{info.size}", "bits": "8",
        "sparsity": f"{ckpt_meta['sparsity']:.6f}", "sparsity_per_layer": json.dumps(layers),
        "prune_method": params.prune.method, "pretrain_objective": params.pretrain.objective,
        "prune_objective": params.prune.objective, "finetune_objective": params.finetune.objective,
        "params_hash": params_hash(params), "data_hash": params_hash(params, "data"),
        "audit": json.dumps({k: audit.get(k) for k in AUDIT_KEYS}),
        **{f"audit_{k}": json.dumps(audit.get(k)) for k in AUDIT_KEYS},
    }
    graph = onnx.load(str(INT8_ONNX))
    onnx.checker.check_model(graph, full_check=True)
    tmp = SHIPPED.with_name(f".{SHIPPED.name}.staged")
    atomic_write_bytes(tmp, INT8_ONNX.read_bytes())
    set_metadata(tmp, meta)
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    x, y = as_arrays(data.test)
    shipped = ort_logits(ort_session(tmp), x)
    audited = ort_logits(ort_session(INT8_ONNX), x)
    if not np.array_equal(shipped, audited):
        tmp.unlink(missing_ok=True)
        raise HydraPipeError(f"{SHIPPED}: the shipped graph does not compute what the audit measured")
    reference = torch_logits(model, x)
    metrics = {"bytes": tmp.stat().st_size, "accuracy": float((shipped.argmax(1) == y).mean()),
               "agreement_with_pytorch": float((shipped.argmax(1) == reference.argmax(1)).mean()),
               "max_abs_logit_diff_vs_pytorch": float(np.abs(shipped - reference).max())}
    tmp.replace(SHIPPED)
    atomic_write_bytes(MODEL_CARD, model_card(read_metadata(SHIPPED), audit, metrics).encode())
    write_json(METRICS / "export.json", metrics)
    show(metrics_table("export", metrics))
    return metrics
