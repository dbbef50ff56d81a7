"""Stage 6: the deployable model: the audited int8 graph, stored compactly (pruned weights cost nothing on disk,
pipeline.compression), checked with onnx's checker, for identical logits with the audited file and for parity with
the PyTorch model; an xz archive and a model card beside it.

A shipped model says about itself what a user needs to trust and use it, in its ONNX metadata and its card: how to
turn a raw image into its input, what its outputs mean (the labels), the threat model, every audited figure with the
method that produced it (each stored once), and its provenance (producer, params and data hashes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from rich.markup import escape
from torch import nn

from pipeline import __version__
from pipeline.audit.report import AuditReport
from pipeline.channels import channel_report
from pipeline.checkpoint import load_checkpoint
from pipeline.compression import archive, compact_file
from pipeline.config import ExportParams, params_hash
from pipeline.data import DatasetInfo, Preprocessing, as_arrays, preprocessing
from pipeline.errors import BelowFloorError, HydraPipeError
from pipeline.masking import masked_layers, sparsity_report
from pipeline.metadata import ModelMetadata
from pipeline.onnx_io import (INPUT_NAME, OUTPUT_NAME, ort_logits, ort_session, read_metadata, read_proto,
                              set_metadata, torch_logits, used_opsets_only)
from pipeline.quantization import SATURATION_FREE, int8_weight_range
from pipeline.reporting import atomic_write_bytes, console, layer_labels
from pipeline.threat import ThreatModel
from stages.common import AUDIT_REPORT, FINETUNED, INT8_ONNX, MODEL_CARD, SHIPPED, setup, write_figures

ARCHIVE = SHIPPED.with_name(SHIPPED.name + ".xz")
ENCODING = "delta"
PRODUCER = "hydra-pipe"
LABELS_SHOWN = 20  # the card lists this many labels; the metadata has them all


def _pct(v: float | None) -> str:
    return "not measured" if v is None else f"{100 * v:.1f}%"


_RATES = {"uniform": "; every layer keeps the same fraction (uniform per-layer rates)",
          "global": "; the layers' kept fractions come from one magnitude threshold over all of them (global rates)",
          "learned": "; the per-layer rates were learned with the importance scores under the robust objective, "
                     "the whole model on its budget (the table below lists what each layer kept)"}
"""How the card says the kept weights were split across layers (metadata ``prune_rates``, ``prune.rates``)."""


def _what_it_is(meta: ModelMetadata) -> str:
    if meta.granularity == "filter":
        what = (f"whole filters removed ({meta.prune_method}, filter granularity): the pruned channels are gone "
                f"from the graph, so the network is narrower and faster, not just sparse")
    else:
        what = (f"individual weights removed ({meta.prune_method}): the graph keeps its shape, pruned weights "
                f"are exact zeros that cost no bytes in the file but no time either")
    what += _RATES.get(meta.prune_rates or "", "")
    return f"""**What it is.** A {meta.arch} classifier for {meta.dataset}, pruned to {100 * meta.sparsity:.1f}%
sparsity with {what}; quantized to {meta.bits}-bit integers (onnxruntime static QDQ, int8 weights per channel,
uint8 activations){_weight_range(meta)}."""


def _weight_range(meta: ModelMetadata) -> str:
    """Where the audited integers hold: on every CPU when no weight pair can saturate onnxruntime's 16-bit sums."""
    if meta.weight_range is None:
        return ""
    if meta.weight_range <= SATURATION_FREE:
        return (f"; the int8 weights stay within +-{meta.weight_range} (7 bits), so onnxruntime computes the "
                f"audited integers exactly on every CPU, x86 without VNNI included")
    return (f"; the int8 weights reach +-{meta.weight_range}: on x86 CPUs without VNNI onnxruntime's 16-bit "
            f"pair sums can saturate, and the outputs there can differ from the audited ones")


def _input_output(meta: ModelMetadata) -> str:
    """The input contract and the labels: what a caller must get right for the figures below to mean anything."""
    lo, hi = meta.input_range
    labels = meta.labels
    shown = ", ".join(f"{i} `{name}`" for i, name in enumerate(labels[:LABELS_SHOWN]))
    more = f", ... ({len(labels)} in all, in the metadata key `labels`)" if len(labels) > LABELS_SHOWN else ""
    return f"""**Input.** `input`: float32, N x C x H x W = batch x {' x '.join(map(str, meta.input_shape))}, values in
[{lo:g}, {hi:g}]. Preprocessing: {meta.preprocessing}.

**Output.** `logits`: batch x {meta.classes}; the predicted class is the argmax. Labels (index `name`): {shown}{more}."""


FLOOR_FIGURES = {"clean": ("clean accuracy", "clean_accuracy"),
                 "pgd": ("robust accuracy, gradient attacks", "pgd_robust_accuracy"),
                 "robust": ("robust accuracy, all attacks", "robust_accuracy"),
                 "verified": ("verified robust accuracy", "verified_accuracy"),
                 "ibp": ("verified, IBP", "ibp_verified_accuracy"),
                 "crown": ("verified, CROWN", "crown_verified_accuracy"),
                 "alpha_crown": ("verified, alpha-CROWN", "alpha_crown_verified_accuracy"),
                 "bab": ("verified, branch and bound", "bab_verified_accuracy")}
"""``export.floor``'s names (those of ``hydra-pipe audit --fail-under``) -> (the card's words, the audit report's
field)."""


def below_floor(export: ExportParams, audit: AuditReport) -> list[str]:
    """The audited figures below ``export.floor``, each as ``clean accuracy 22.5% < floor 50.0%``; a figure whose
    part did not run counts as 0 (as with ``--fail-under``)."""
    below = []
    for name, floor in export.floor.items():
        words, field = FLOOR_FIGURES[name]
        value = getattr(audit, field) or 0.0
        if value < floor:
            below.append(f"{words} {_pct(getattr(audit, field))} < floor {_pct(floor)}")
    return below


def floor_warning(below: list[str], classes: int) -> str:
    """The one warning a model below its floor ships with (console, card, ONNX metadata key ``warning``)."""
    return (f"below the floor set for shipping it (export.floor): {'; '.join(below)} (chance on {classes} classes is "
            f"{_pct(1 / classes)}); do not deploy it as is. Prune less (a larger prune.keep_ratio) or train longer; "
            f"export.below_floor: refuse stops the export instead")


def _how_to_run(prep: Preprocessing) -> str:
    libraries = "numpy, Pillow and onnxruntime" if "PIL" in prep.code else "numpy and onnxruntime"
    return f"""**How to run it** ({libraries}; the labels are read from the model's metadata):

```python
import json

import numpy as np
import onnxruntime as ort

{prep.code}
session = ort.InferenceSession("{SHIPPED.name}")
labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
logits = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": x}})[0]
print(labels[int(logits.argmax(1)[0])])
```"""


def _threat_model(meta: ModelMetadata, audit: AuditReport) -> str:
    lo, hi = meta.input_range
    norm = "L-inf" if audit.norm == "linf" else "L2"
    return f"""**Threat model.** An adversary may replace an input x by any x' with ||x' - x|| <= eps in the {norm}
norm, eps = {audit.eps:g}, that stays in the input range [{lo:g}, {hi:g}] (the scale the preprocessing above
produces)."""


def _figures(audit: AuditReport) -> str:
    """Every figure of the audit with the method that produced it: attacks give upper bounds, verifiers lower."""
    square = audit.square
    ci = audit.confidence_intervals
    attacks = ", ".join(f"{a.name} ({a.budget}{', float twin' if a.model == 'float twin' else ''})"
                        for a in audit.attacks) or "none"
    if audit.budget == "quick":  # a CI gate's preset: say so wherever the figures are
        attacks += " (audit.budget quick: AutoAttack's attacks and IBP + CROWN, not the card's PGD budget)"
    rows = [("clean accuracy", audit.clean_accuracy, "onnxruntime on this int8 graph"),
            ("robust accuracy, gradient attacks", audit.pgd_robust_accuracy,
             "APGD-CE, APGD-T and PGD, each on what the ones before left, worst case per image"),
            ("robust accuracy, all attacks", audit.robust_accuracy,
             f"{attacks}; every break confirmed on onnxruntime"),
            ("verified, IBP", audit.ibp_verified_accuracy, "interval bound propagation"),
            ("verified, CROWN", audit.crown_verified_accuracy, "CROWN (backward linear bounds)"),
            ("verified, alpha-CROWN", audit.alpha_crown_verified_accuracy,
             "alpha-CROWN (optimised ReLU slopes), with what the methods before it proved"),
            ("verified, branch and bound", audit.bab_verified_accuracy,
             "branch and bound on ReLU splits, with what the methods before it proved"),
            ("Verified robust accuracy", audit.verified_accuracy, f"`{audit.verified_method}`: proven by any of them")]
    rows = [(name, v, how + (f"; 95% interval [{_pct(ci[key][0])}, {_pct(ci[key][1])}]" if key in ci else ""))
            for (name, v, how), key in zip(rows, ("clean_accuracy", "pgd_robust_accuracy", "robust_accuracy", "",
                                                  "", "", "", "verified_accuracy"))]
    sm = audit.smoothing
    if sm:
        rows += [(f"certified, smoothed model, L2 radius {r}", v,
                  f"randomized smoothing (Cohen et al.'s CERTIFY), sigma {sm.sigma:g}, n {sm.n}, alpha {sm.alpha:g}")
                 for r, v in sm.certified_accuracy.items()]
    table = "\n".join(f"| {name} | {_pct(v)} | {how} |" for name, v, how in rows)
    warning = (f" Square broke {square.broken_beyond_pgd} images the gradient attacks did not: the gradients of this model may be "
               "masked, so trust the verified figures more.") if square and square.gradient_masking_suspected else ""
    return f"""**How robust it is, as deployed** (audit of these exact int8 numerics on {audit.n} test images, under the
threat model above). Attacks give upper bounds on true robustness (a stronger attack could lower them); verified
figures are lower bounds that no attack can overturn.{warning}

| figure | value | method |
|---|---|---|
{table}"""


CARD_KEYS = ("arch", "dataset", "classes", "input_shape", "bits", "labels", "input_range", "preprocessing", "sparsity",
             "sparsity_per_layer", "prune_method", "params_hash", "data_hash", "pretrain_objective", "prune_objective",
             "finetune_objective")
"""The metadata keys the card states (``channels_per_layer`` and ``granularity`` only where present)."""


def model_card(meta: ModelMetadata, audit: AuditReport, export_metrics: dict, prep: Preprocessing,
               labels: dict[str, str] | None = None) -> str:
    """The card, from the shipped file's own metadata (so the two cannot disagree) and the audit report; ``labels``
    names the layers for people (:func:`pipeline.reporting.layer_labels`), the metadata's own names beside them."""
    meta.require(*CARD_KEYS, source=SHIPPED)
    layers = meta.sparsity_per_layer
    channels = meta.channels_per_layer or {}
    names = {n: (f"{labels[n]} (`{n}`)" if labels and labels.get(n, n) != n else f"`{n}`") for n in layers}
    rows = "\n".join(f"| {names[n]} | {100 * s:.1f}% | {channels.get(n, '')} |" for n, s in layers.items())
    mb = export_metrics["bytes"] / 1e6
    warning = f"> **WARNING: this model is {meta.warning}.**\n\n" if meta.warning else ""
    return f"""# Model card: {meta.arch} on {meta.dataset}

{warning}{_what_it_is(meta)}

{_input_output(meta)}

{_how_to_run(prep)}

{_threat_model(meta, audit)}

{_figures(audit)}

**Files.** `{SHIPPED.name}`: {mb:.2f} MB, {export_metrics['size_ratio_vs_dense_fp32']:.0f}x smaller than the
same network's weights in dense float32 ({export_metrics['dense_fp32_weight_bytes'] / 1e6:.2f} MB). Pruned weights are
not stored: the non-zero int8 weights are kept as (gap, value) byte pairs that a few standard ONNX operators
expand when the session is created, so it loads in a plain `onnxruntime.InferenceSession` with no custom code,
passes `onnx.checker`, and runs at the speed and with exactly the outputs of the dense int8 graph that was
audited. `{ARCHIVE.name}` ({export_metrics['archive_bytes'] / 1e6:.2f} MB, xz) is the same file compressed for
distribution (`xz -d`).

**Provenance.** produced by {PRODUCER} {__version__}; params hash `{meta.params_hash}`; data split hash
`{meta.data_hash}`; training objectives: pretrain `{meta.pretrain_objective}`, prune `{meta.prune_objective}`,
finetune `{meta.finetune_objective}`. The same facts and figures are in the ONNX metadata
(`hydra-pipe info {SHIPPED}` or `onnx.load(...).metadata_props`).

Predictions agree with the fp32 PyTorch model on {_pct(export_metrics['agreement_with_pytorch'])} of the test split.

| layer | weights pruned | channels kept |
|---|---|---|
{rows}
"""


def _dataset_metadata(info: DatasetInfo, prep: Preprocessing, audit: AuditReport) -> dict:
    """What a caller needs to feed the model and read its answer: labels, preprocessing and the input range the
    audit's threat model is defined on (its eps and norm are in ``audit``, stored once)."""
    threat = ThreatModel(audit.eps, audit.norm)
    labels = list(info.labels) or [str(i) for i in range(info.classes)]
    return {"classes": info.classes, "input_shape": (info.channels, info.size, info.size), "labels": labels,
            "input_range": (threat.lo, threat.hi),
            "preprocessing": f"{prep.text}; fed as float32 N x C x H x W, normalisation is inside the graph"}


def _stamp(path: Path) -> None:
    """Name the producer and import only the opset domains the nodes use (the quantizer imports several unused)."""
    proto = read_proto(path)
    proto.producer_name, proto.producer_version = PRODUCER, __version__
    used_opsets_only(proto)
    atomic_write_bytes(path, proto.SerializeToString())


def run(params_path: Path) -> dict:
    params, data, _ = setup(params_path, needs=(AUDIT_REPORT, INT8_ONNX, FINETUNED))
    audit = AuditReport.read(AUDIT_REPORT)
    info = data.info
    below = below_floor(params.export, audit)
    if below and params.export.below_floor == "refuse":  # before anything is written
        raise BelowFloorError(f"export refused (export.below_floor: refuse): the audited model is below "
                              f"export.floor: {'; '.join(below)}; nothing was written")
    warning = floor_warning(below, info.classes) if below else None
    if warning:
        console.print(f"[bold red]WARNING: export: this model is {escape(warning)}[/]")
    model, ckpt_meta = load_checkpoint(FINETUNED)
    prep = preprocessing(params.data.name, info)
    layers = {n: round(r["sparsity"], 6) for n, r in sparsity_report(model).items()}
    channels = {n: f"{r['kept']}/{r['channels']}" for n, r in channel_report(model).items()}
    dense_fp32 = 4 * sum(int(t.numel()) for n, t in model.state_dict().items()
                         if n.endswith(("weight", "bias")) and not n.endswith("weight_mask"))
    meta = ModelMetadata(
        warning=warning, arch=params.model.arch, dataset=params.data.name, bits=8,
        weight_range=int8_weight_range(INT8_ONNX),
        **_dataset_metadata(info, prep, audit),
        sparsity=round(ckpt_meta["sparsity"], 6), sparsity_per_layer=layers, granularity=params.prune.granularity,
        channels_per_layer=channels, encoding=ENCODING, verified_method=audit.verified_method,
        audit=audit.headline(),
        # certificates of the smoothed model: not in the headline
        smoothing=None if audit.smoothing is None else audit.smoothing.model_dump(mode="json"),
        prune_method=params.prune.method, prune_rates=params.prune.rates, pretrain_objective=params.pretrain.objective,
        prune_objective=params.prune.objective, finetune_objective=params.finetune.objective,
        params_hash=params_hash(params), data_hash=params_hash(params, "data"))
    graph = onnx.load(str(INT8_ONNX))
    onnx.checker.check_model(graph, full_check=True)
    tmp = SHIPPED.with_name(f".{SHIPPED.name}.staged")
    atomic_write_bytes(tmp, INT8_ONNX.read_bytes())
    set_metadata(tmp, meta.to_onnx_props())
    compact_file(tmp, tmp, ENCODING)  # the check below proves the compact file computes what was audited
    _stamp(tmp)
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
    shipped_meta = ModelMetadata.from_onnx_props(read_metadata(SHIPPED), SHIPPED)
    kinds = {n: "conv" if isinstance(m, nn.Conv2d) else "fc" for n, m in masked_layers(model)}
    atomic_write_bytes(MODEL_CARD, model_card(shipped_meta, audit, metrics, prep, layer_labels(kinds)).encode())
    figures = write_figures("export", metrics)
    if warning:  # again after the table, the last thing on the console
        console.print(f"[bold red]WARNING: {SHIPPED} is {escape(warning)}[/]")
    return figures
