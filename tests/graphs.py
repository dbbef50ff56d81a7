"""Small ONNX graphs written by hand for the attack and audit tests."""

import numpy as np


def qdq_linear_graph(path, k: float = 10.0, threshold: float = 0.6) -> None:
    """Deployed model: the input rounded to a grid of 1/4 (QuantizeLinear/DequantizeLinear), then
    ``z = [k (threshold - x), 0]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.25, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp"),
             numpy_helper.from_array(np.array([[-k, 0.0]], np.float32), "W"),
             numpy_helper.from_array(np.array([k * threshold, 0.0], np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
             helper.make_node("Flatten", ["dq"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 1, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
