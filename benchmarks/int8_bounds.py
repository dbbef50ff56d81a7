"""Verified accuracy of an int8 graph against its float graph: how much the QuantizeLinear relaxation costs.

    .venv/bin/python benchmarks/int8_bounds.py [--eps 0.05] [--n 450] [--methods ibp,crown,alpha-crown]

Graphs: the oracle CNN of ``../shared/oracles/ibp`` (auto_LiRPA's reference network, trained on digits) quantized
here by plain onnxruntime (``quantize_static``: QDQ, U8 activations, S8 per-channel weights, 256 training images
calibrating), and the default pipeline's ``models/finetuned.onnx`` against the shipped ``models/quantized.onnx``
(after ``make repro``). Each graph is bounded by :func:`pipeline.bounds.certify` on the first ``--n`` digits test
images, L-inf ``--eps``; an example counts only when the graph itself classifies it correctly.
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

from pipeline.bounds import certify  # noqa: E402
from pipeline.data import digits_arrays  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--n", type=int, default=450)
    ap.add_argument("--methods", default="ibp,crown,alpha-crown")
    ap.add_argument("--threads", type=int, default=1)
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


if __name__ == "__main__":
    main()
