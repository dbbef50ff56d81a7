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


def extreme_points(model, x_lo, x_hi, steps: int = 15, generator=None):
    """PGD (sign steps, straight-through rounding) towards the lowest and the highest value of every logit, from
    uniform starts in the box ``[x_lo, x_hi]``: ``[2K, N, ...]`` points that any sound bound must contain."""
    import torch

    with torch.no_grad():
        k = model(x_lo[:1]).shape[1]
    pts = (x_lo + torch.rand(2 * k, *x_lo.shape, generator=generator) * (x_hi - x_lo)).requires_grad_(True)
    sign = torch.cat([torch.eye(k), -torch.eye(k)]).view(2 * k, 1, k)
    step = (x_hi - x_lo) / 4
    for _ in range(steps):
        out = model(pts.reshape(-1, *x_lo.shape[1:])).reshape(2 * k, len(x_lo), k)
        (grad,) = torch.autograd.grad((out * sign).sum(), pts)
        with torch.no_grad():
            pts.add_(step * grad.sign())
            pts.copy_(torch.maximum(torch.minimum(pts, x_hi), x_lo))
            step = step * 0.8
    return pts.detach()
