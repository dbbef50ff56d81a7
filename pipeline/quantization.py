"""8-bit post-training quantization with onnxruntime's static quantizer (QDQ format).

Weights are int8, symmetric, per output channel: a weight of exactly zero maps to the integer 0 (zero point 0),
so pruned connections stay exactly zero in the deployed graph. Activations are uint8 with ranges calibrated on
training images (QUInt8 activations with QInt8 weights is the combination onnxruntime fuses into integer
Conv/MatMul kernels on x86; S8S8 left convolutions unfused and ran slower than fp32).

The weights keep to [-64, 64] (onnxruntime's ``reduce_range``, 7 bits) by default. onnxruntime's u8 x s8 kernels
on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply with ``vpmaddubsw``, which adds each pair of
products in 16 bits with saturation: 2 x 255 x 127 = 64,770 overflows 32,767, 2 x 255 x 64 = 32,640 does not. With
full-range weights the deployed model computes different integers on such a CPU than on one with VNNI (measured on
an AVX2 EPYC: 72% of a small network's logits off by one output quantum), and no audit of it holds on both; with
7-bit weights every CPU computes the exact integer arithmetic the audit bounds. (:func:`saturating_layers` names
the layers of any int8 graph that can overflow; the audit says so when onnxruntime and the graph form disagree.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import HydraPipeError

SATURATION_FREE = 64
"""The largest int8 weight magnitude a 16-bit pair sum of u8 x s8 products cannot overflow (2 x 255 x 64 <= 32,767)."""


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over an array of images, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 64) -> None:
        self._batches = iter([{input_name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(fp32_path: Path, out_path: Path, calibration_x: np.ndarray, per_channel: bool = True,
                  method: str = "minmax", reduce_range: bool = True) -> None:
    """Quantize ``fp32_path`` to ``out_path`` (written atomically) with static QDQ int8 calibrated on ``calibration_x``;
    ``reduce_range`` keeps the weights to [-64, 64], which onnxruntime computes exactly on every CPU (module doc)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_x.ndim != 4 or calibration_x.dtype != np.float32:
        raise HydraPipeError(f"quantize: calibration images must be float32 N x C x H x W, got {calibration_x.dtype} {calibration_x.shape}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(staged), _Calibration(input_name, calibration_x),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=per_channel, calibrate_method=methods[method],
                        reduce_range=reduce_range,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       # keep the logits in float: uint8 logits create ties at the decision
                                       # boundary, exactly where the robustness audit looks
                                       "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        staged.replace(out_path)


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    """The int8 weight initializers of a quantized model, by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
            if init.data_type == onnx.TensorProto.INT8}


def int8_weight_range(path: Path) -> int:
    """The largest magnitude of the int8 weight initializers of a quantized model (64 with ``reduce_range``)."""
    return max((int(np.abs(w.astype(np.int32)).max(initial=0)) for w in int8_weights(path).values()), default=0)


def int8_weight_zeros(path: Path) -> dict[str, int]:
    """Number of exact zeros in each int8 weight initializer of a quantized model (pruned entries)."""
    return {name: int((w == 0).sum()) for name, w in int8_weights(path).items()}


_INTEGER_INPUTS = {"Conv": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1), "ConvInteger": (0, 1), "MatMulInteger": (0, 1),
                   "QLinearConv": (0, 3), "QLinearMatMul": (0, 3)}
"""The ops onnxruntime runs as integer products, and which of their inputs are the activation and the weights."""


def saturating_layers(path: Path) -> dict[str, int]:
    """The layers of the int8 graph at ``path`` whose integer products can saturate onnxruntime's u8 x s8 kernels on
    an x86 CPU without VNNI: 8-bit activations (int8 ones are shifted to uint8 first) times an int8 weight
    initializer that reaches beyond :data:`SATURATION_FREE`. Maps the node's name to its largest weight magnitude.
    In QDQ form a Conv / MatMul / Gemm counts when both its inputs come out of a DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    made_by = {out: n for n in graph.node for out in n.output}

    def weights_of(name: str):  # an int8 initializer, directly or through its DequantizeLinear
        t = inits.get(name)
        if t is None and name in made_by and made_by[name].op_type == "DequantizeLinear":
            t = inits.get(made_by[name].input[0])
        return numpy_helper.to_array(t) if t is not None and t.data_type == onnx.TensorProto.INT8 else None

    def quantized(name: str) -> bool:  # an activation that went through 8 bits
        return name in made_by and made_by[name].op_type == "DequantizeLinear" and made_by[name].input[0] not in inits

    found: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in _INTEGER_INPUTS:
            continue
        a, w = _INTEGER_INPUTS[node.op_type]
        if len(node.input) <= max(a, w):
            continue
        weights = weights_of(node.input[w])
        activation_8bit = node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul") \
            or quantized(node.input[a])
        if weights is not None and activation_8bit:
            top = int(np.abs(weights.astype(np.int32)).max(initial=0))
            if top > SATURATION_FREE:
                found[node.name or f"{node.op_type}#{i}"] = top
    return found


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (``avx512_vnni`` or ``avx_vnni``, whose u8 x s8 products add in 32 bits);
    None where it cannot be told (not Linux) and True off x86 (no ``vpmaddubsw`` path)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def saturation_hint(path: Path) -> str:
    """Why onnxruntime may compute other integers than the graph's exact arithmetic (an empty string when nothing
    in the graph can saturate): for the audit's refusal, with what to do about it."""
    layers = saturating_layers(path)
    vnni = cpu_has_vnni()
    if not layers or vnni is True:
        return ""
    shown = ", ".join(f"{name} (up to {top})" for name, top in list(layers.items())[:3])
    more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
    cpu = "this CPU has no VNNI" if vnni is False else "this CPU's VNNI could not be read"
    return (f"; likely cause: onnxruntime's u8 x s8 kernels on x86 without VNNI add pairs of products in 16 bits with "
            f"saturation ({cpu}) and int8 weights beyond +-{SATURATION_FREE} can overflow them: {shown}{more}. "
            f"Quantize with reduce_range (7-bit weights) or uint8 weights, or deploy and audit on CPUs with VNNI")
