"""8-bit post-training quantization with onnxruntime's static quantizer (QDQ format).

Weights are int8, symmetric, per output channel: a weight of exactly zero maps to the integer 0 (zero point 0),
so pruned connections stay exactly zero in the deployed graph. Activations are uint8 with ranges calibrated on
training images (QUInt8 activations with QInt8 weights is the combination onnxruntime fuses into integer
Conv/MatMul kernels on x86; S8S8 left convolutions unfused and ran slower than fp32).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import HydraPipeError


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over an array of images, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 64) -> None:
        self._batches = iter([{input_name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(fp32_path: Path, out_path: Path, calibration_x: np.ndarray, per_channel: bool = True,
                  method: str = "minmax") -> None:
    """Quantize ``fp32_path`` to ``out_path`` (written atomically) with static QDQ int8 calibrated on ``calibration_x``."""
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
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       # keep the logits in float: uint8 logits create ties at the decision
                                       # boundary, exactly where the robustness audit looks
                                       "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        staged.replace(out_path)


def int8_weight_zeros(path: Path) -> dict[str, int]:
    """Number of exact zeros in each int8 weight initializer of a quantized model (pruned entries)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: int((numpy_helper.to_array(init) == 0).sum())
            for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
