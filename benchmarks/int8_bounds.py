"""Verified accuracy of an int8 graph against its float graph: how much the QuantizeLinear relaxation costs.

    .venv/bin/python benchmarks/int8_bounds.py [--eps 0.05] [--n 450] [--methods ibp,crown,alpha-crown,bab] [--slack]

Graphs: the oracle CNN of ``../shared/oracles/ibp`` (auto_LiRPA's reference network, trained on digits) quantized
here by plain onnxruntime (``quantize_static``: QDQ, U8 activations, S8 per-channel weights, 256 training images
calibrating), and the default pipeline's ``models/finetuned.onnx`` against the shipped ``models/quantized.onnx``
(after ``make repro``). Each graph is bounded by :func:`pipeline.bounds.certify` on the first ``--n`` digits test
images, L-inf ``--eps``; an example counts only when the graph itself classifies it correctly.

``--slack`` adds, per model, what the verifier leaves on the table: each graph's accuracy under attack (APGD-CE,
APGD-T and PGD 200 x 10: an upper bound of what any verifier can prove) and CROWN's verified accuracy on the int8
graph with the rounding of one QuantizeLinear at a time, then of all, taken out (its float twin: clip only). Those
graphs are not the deployed one, so their figures are no proof of anything; they locate the loss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.attacks import apgd_attack, pgd_attack  # noqa: E402
from pipeline.bounds import certify  # noqa: E402
from pipeline.data import digits_arrays  # noqa: E402
from pipeline.graph import Quantize  # noqa: E402
from pipeline.onnx_load import load_onnx  # noqa: E402
from pipeline.threat import ThreatModel  # noqa: E402

ORACLE_CNN = ROOT / ".." / "shared" / "oracles" / "ibp" / "cnn.onnx"


def plain_int8(src: Path, dst: Path) -> Path:
    """``src`` quantized by onnxruntime's static quantizer with its defaults (U8 activations, S8 per-channel)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.quantization import _Calibration

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), _Calibration("input", digits_arrays()[0][:256]), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return dst


def robust_under_attack(graph, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """bool [N]: correct and not broken by APGD-CE, APGD-T (9 targets) nor PGD 200 x 10 (margin loss)."""
    keep = apgd_attack(graph, x, y, eps, loss="ce").robust
    keep &= apgd_attack(graph, x, y, eps, loss="dlr-targeted").robust
    return keep & pgd_attack(graph, x, y, eps, steps=200, restarts=10).robust


def slack_table(name: str, fp32: Path, int8: Path, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """The ``--slack`` rows of one model (see the module)."""
    flt, q = load_onnx(fp32), load_onnx(int8)
    for kind, graph in (("float", flt), ("int8", q)):
        robust = float(robust_under_attack(graph, x, y, eps).float().mean())
        print(f"| {name} | {kind} | under attack | {100 * robust:.1f}% |", flush=True)
    with torch.no_grad():
        clean = q(x).argmax(1) == y
    quants = [m for m in q.modules() if isinstance(m, Quantize)]
    for off in [[i] for i in range(len(quants))] + [list(range(len(quants)))]:
        for i, m in enumerate(quants):
            m.rounding = i not in off
        cert = certify(q, x, y, ThreatModel(eps), "crown", batch_size=150, logit_bounds=False)
        where = "every QuantizeLinear" if len(off) > 1 else f"QuantizeLinear {off[0] + 1} of {len(quants)}"
        print(f"| {name} | int8 without the rounding of {where} | CROWN verified (unsound) | "
              f"{100 * float((cert.verified & clean).float().mean()):.1f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--n", type=int, default=450)
    ap.add_argument("--methods", default="ibp,crown,alpha-crown,bab")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slack", action="store_true", help="also: accuracy under attack, rounding taken out per layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, _, x_te, y_te = digits_arrays()
    x, y = torch.from_numpy(x_te[:args.n]), torch.from_numpy(y_te[:args.n])
    work = Path(tempfile.mkdtemp(prefix="int8-bounds-"))
    pairs = []
    if ORACLE_CNN.exists():
        pairs.append(("oracle CNN, plain onnxruntime int8", ORACLE_CNN, plain_int8(ORACLE_CNN, work / "oracle_q.onnx")))
    if (ROOT / "models" / "quantized.onnx").exists():
        pairs.append(("default pipeline model, shipped int8", ROOT / "models" / "finetuned.onnx",
                      ROOT / "models" / "quantized.onnx"))
    methods = args.methods.split(",")
    print(f"eps {args.eps}, {args.n} digits test images, {args.threads} thread(s)")
    print("| model | graph | clean | " + " | ".join(f"{m} verified" for m in methods) + " | seconds |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " | --- |")
    for name, fp32, int8 in pairs:
        for kind, path in (("float", fp32), ("int8", int8)):
            graph = load_onnx(path)
            with torch.no_grad():
                clean = graph(x).argmax(1) == y
            cells, t = [], time.perf_counter()
            for method in methods:
                cert = certify(graph, x, y, ThreatModel(args.eps), method, batch_size=150, logit_bounds=False)
                cells.append(f"{100 * float((cert.verified & clean).float().mean()):.1f}%")
            print(f"| {name} | {kind} | {100 * float(clean.float().mean()):.1f}% | " + " | ".join(cells) +
                  f" | {time.perf_counter() - t:.1f} |", flush=True)
    if args.slack:
        print("\n| model | graph | figure | accuracy |\n| --- | --- | --- | --- |")
        for name, fp32, int8 in pairs:
            slack_table(name, fp32, int8, x, y, args.eps)


if __name__ == "__main__":
    main()
