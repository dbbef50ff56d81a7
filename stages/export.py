"""Stage 6: the deployable model: the audited int8 graph, stored compactly (pruned weights cost nothing on disk,
pipeline.compression), with its provenance and audit in the ONNX metadata, checked with onnx's checker, for
identical logits with the audited file and for parity with the PyTorch model; an xz archive and a model card
beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from pipeline.audit_report import AuditReport
from pipeline.checkpoint import load_checkpoint
from pipeline.compression import archive, compact_file
from pipeline.config import params_hash
from pipeline.data import as_arrays
from pipeline.errors import HydraPipeError
from pipeline.masking import sparsity_report
from pipeline.onnx_io import ort_logits, ort_session, read_metadata, set_metadata, torch_logits
from pipeline.reporting import atomic_write_bytes, metrics_table, show, write_json
from pipeline.channels import channel_report
from stages.common import AUDIT_REPORT, FINETUNED, INT8_ONNX, METRICS, MODEL_CARD, SHIPPED, setup

ARCHIVE = SHIPPED.with_name(SHIPPED.name + ".xz")
ENCODING = "delta"


def model_card(meta: dict[str, str], audit: AuditReport, export_metrics: dict) -> str:
    square = audit.square
    square_warning = (f" (it broke {square.broken_beyond_pgd} images PGD did not: the gradients of this model may be "
                      "masked, so trust the verified figures below more)") if square and square.gradient_masking_suspected else ""

    def pct(v) -> str:
        return "not measured" if v is None else f"{100 * v:.1f}%"

    layers = json.loads(meta["sparsity_per_layer"])
    channels = json.loads(meta.get("channels_per_layer", "{}"))
    rows = "\n".join(f"| {n} | {100 * s:.1f}% | {channels.get(n, '')} |" for n, s in layers.items())
    mb = export_metrics["bytes"] / 1e6
    if meta.get("granularity") == "filter":
        what = (f"whole filters removed ({meta['prune_method']}, filter granularity): the pruned channels are gone "
                f"from the graph, so the network is narrower and faster, not just sparse")
    else:
        what = (f"individual weights removed ({meta['prune_method']}): the graph keeps its shape, pruned weights "
                f"are exact zeros that cost no bytes in the file but no time either")
    return f"""# Model card: {meta['arch']} on {meta['dataset']}

**What it is.** A {meta['arch']} classifier for {meta['dataset']}, pruned to {100 * float(meta['sparsity']):.1f}%
sparsity with {what}; quantized to {meta['bits']}-bit integers (onnxruntime static QDQ, int8 weights per channel,
uint8 activations). Input `input`: float32, batch x {meta['input_shape']}, pixel values in [0, 1] (normalisation is
inside the graph). Output `logits`: batch x {meta['classes']}.

**Files.** `{SHIPPED.name}`: {mb:.2f} MB, {export_metrics['size_ratio_vs_dense_fp32']:.0f}x smaller than the
same network's weights in dense float32 ({export_metrics['dense_fp32_weight_bytes'] / 1e6:.2f} MB). Pruned weights are
not stored: the non-zero int8 weights are kept as (gap, value) byte pairs that a few standard ONNX operators
expand when the session is created, so it loads in a plain `onnxruntime.InferenceSession` with no custom code,
passes `onnx.checker`, and runs at the speed and with exactly the outputs of the dense int8 graph that was
audited. `{ARCHIVE.name}` ({export_metrics['archive_bytes'] / 1e6:.2f} MB, xz) is the same file compressed for
distribution (`xz -d`).

**How robust it is, as deployed** (audit of these exact int8 numerics on {audit.n} test images,
L-{audit.norm.replace('l', '')} radius eps = {audit.eps}, pixel scale [0, 1]):
- Clean accuracy: {pct(audit.clean_accuracy)}.
- Robust accuracy under PGD ({audit.steps} steps x {audit.restarts} random restarts, worst case per image):
  {pct(audit.pgd_robust_accuracy)} ({audit.loss} loss); {pct(audit.robust_accuracy)} after the
  gradient-free Square attack too{square_warning}. This is an upper bound on true robustness: a stronger attack could
  lower it.
- Verified robust accuracy (no attack within eps can change these predictions): {pct(audit.verified_accuracy)}, by
  `{audit.verified_method}` (IBP {pct(audit.ibp_verified_accuracy)}, CROWN {pct(audit.crown_verified_accuracy)},
  alpha-CROWN {pct(audit.alpha_crown_verified_accuracy)}). This is a lower bound that no attack can overturn.

**Provenance.** params hash `{meta['params_hash']}`; data split hash `{meta['data_hash']}`; training objectives:
pretrain `{meta['pretrain_objective']}`, prune `{meta['prune_objective']}`, finetune `{meta['finetune_objective']}`.
The same figures are in the ONNX metadata (`hydra-pipe info {SHIPPED}` or `onnx.load(...).metadata_props`).

Predictions agree with the fp32 PyTorch model on {pct(export_metrics['agreement_with_pytorch'])} of the test split.

| layer | weights pruned | channels kept |
|---|---|---|
{rows}
"""


def run(params_path: Path) -> dict:
    params, data, _ = setup(params_path)
    audit = AuditReport.read(AUDIT_REPORT)
    model, ckpt_meta = load_checkpoint(FINETUNED)
    info = data.info
    layers = {n: round(r["sparsity"], 6) for n, r in sparsity_report(model).items()}
    channels = {n: f"{r['kept']}/{r['channels']}" for n, r in channel_report(model).items()}
    dense_fp32 = 4 * sum(int(t.numel()) for n, t in model.state_dict().items()
                         if n.endswith(("weight", "bias")) and not n.endswith("weight_mask"))
    meta = {
        "arch": params.model.arch, "dataset": params.data.name, "classes": str(info.classes),
        "input_shape": f"{info.channels}x{info.size}x{info.size}", "bits": "8",
        "sparsity": f"{ckpt_meta['sparsity']:.6f}", "sparsity_per_layer": json.dumps(layers),
        "granularity": params.prune.granularity, "channels_per_layer": json.dumps(channels),
        "encoding": ENCODING, "verified_method": audit.verified_method,
        "prune_method": params.prune.method, "pretrain_objective": params.pretrain.objective,
        "prune_objective": params.prune.objective, "finetune_objective": params.finetune.objective,
        "params_hash": params_hash(params), "data_hash": params_hash(params, "data"),
        "audit": json.dumps(audit.headline()),
    }
    graph = onnx.load(str(INT8_ONNX))
    onnx.checker.check_model(graph, full_check=True)
    tmp = SHIPPED.with_name(f".{SHIPPED.name}.staged")
    atomic_write_bytes(tmp, INT8_ONNX.read_bytes())
    set_metadata(tmp, meta)
    compact_file(tmp, tmp, ENCODING)  # the check below proves the compact file computes what was audited
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    x, y = as_arrays(data.test)
    shipped = ort_logits(ort_session(tmp), x)
    audited = ort_logits(ort_session(INT8_ONNX), x)
    if not np.array_equal(shipped, audited):
        tmp.unlink(missing_ok=True)
        raise HydraPipeError(f"{SHIPPED}: the shipped graph does not compute what the audit measured")
    reference = torch_logits(model, x)
    metrics = {"bytes": tmp.stat().st_size, "int8_dense_bytes": INT8_ONNX.stat().st_size,
               "dense_fp32_weight_bytes": dense_fp32, "size_ratio_vs_dense_fp32": dense_fp32 / tmp.stat().st_size,
               "accuracy": float((shipped.argmax(1) == y).mean()),
               "agreement_with_pytorch": float((shipped.argmax(1) == reference.argmax(1)).mean()),
               "max_abs_logit_diff_vs_pytorch": float(np.abs(shipped - reference).max())}
    tmp.replace(SHIPPED)
    metrics["archive_bytes"] = archive(SHIPPED, ARCHIVE)
    atomic_write_bytes(MODEL_CARD, model_card(read_metadata(SHIPPED), audit, metrics).encode())
    write_json(METRICS / "export.json", metrics)
    show(metrics_table("export", metrics))
    return metrics
