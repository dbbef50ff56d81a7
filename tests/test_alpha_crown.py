"""Full alpha-CROWN (every layer's slopes, intermediate bounds re-optimised), sound numerics and float64 bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.bounds import alpha_crown_bounds, certify, crown_bounds, margin_lower_bounds, margin_spec
from pipeline.errors import HydraPipeError
from pipeline.onnx_load import load_onnx
from pipeline.runtime import sound_numerics
from pipeline.threat import ThreatModel

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data" / "ibp"


def _nets() -> list[nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
    res = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    return [m.eval() for m in (mlp, cnn, res)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_full_alpha_crown_is_sound_and_never_looser_than_crown_or_last_layer_alpha(which):
    net = _nets()[which]
    g = torch.Generator().manual_seed(which)
    x = torch.rand(6, 1, 4, 4, generator=g)
    eps = 0.15
    x_lo, x_hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        crown = crown_bounds(net, x_lo, x_hi)
    last = alpha_crown_bounds(net, x_lo, x_hi, iterations=10, intermediate=False)
    full = alpha_crown_bounds(net, x_lo, x_hi, iterations=10)
    assert (full[0] >= crown[0] - 1e-5).all() and (full[1] <= crown[1] + 1e-5).all()
    pts = x_lo + torch.rand(256, *x.shape, generator=g) * (x_hi - x_lo)
    with torch.no_grad():
        out = net(pts.reshape(-1, 1, 4, 4)).reshape(256, 6, 5)
    for lo, hi in (last, full):
        assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all()
    # the margins: the optimised intermediate bounds make the whole net tighter than last-layer slopes alone
    y = net(x).argmax(1)
    spec = margin_spec(y, 5)
    m_last = alpha_crown_bounds(net, x_lo, x_hi, spec, lower_only=True, intermediate=False)[0]
    m_full = alpha_crown_bounds(net, x_lo, x_hi, spec, lower_only=True)[0]
    assert (m_full >= margin_lower_bounds(net, x_lo, x_hi, y, "crown") - 1e-5).all()
    if which < 2:  # the MaxPool net: the intermediate layers behind the cut barely matter
        assert m_full.sum() > m_last.sum() + 1e-3


def test_full_alpha_crown_tightens_the_onnx_cnn_beyond_last_layer_slopes():
    ref = np.load(DATA / "cnn.eps0.01.bounds.npz")
    model = load_onnx(DATA / "cnn.onnx")
    x, y = torch.from_numpy(ref["x"][:8]), torch.from_numpy(ref["y"][:8])
    x_lo, x_hi = (x - 0.04).clamp(0, 1), (x + 0.04).clamp(0, 1)
    spec = margin_spec(y, 10)
    last = alpha_crown_bounds(model, x_lo, x_hi, spec, lower_only=True, intermediate=False)[0]
    full = alpha_crown_bounds(model, x_lo, x_hi, spec, lower_only=True)[0]
    assert (full >= last - 1e-4).all() and full.sum() > last.sum() + 0.1


def _conv_pool_onnx(path: Path, head_relu: bool) -> None:
    """Conv-Relu-MaxPool-Flatten-Gemm (-Relu-Gemm) on 1 x 6 x 6 inputs, weights as ONNX initializers (buffers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"wc": rng.normal(0, 0.5, (3, 1, 3, 3)), "bc": rng.normal(0, 0.1, 3),
              "w1": rng.normal(0, 0.5, (12, 8 if head_relu else 4)), "b1": rng.normal(0, 0.1, 8 if head_relu else 4),
              "w2": rng.normal(0, 0.5, (8, 4)), "b2": np.zeros(4)}
    nodes = [helper.make_node("Conv", ["input", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[3, 3]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h" if head_relu else "logits"])]
    if head_relu:
        nodes += [helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"])]
    else:
        del arrays["w2"], arrays["b2"]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("head_relu", [False, True])
def test_alpha_crown_does_not_crash_when_no_relu_precedes_a_cut(tmp_path, head_relu):
    """Issue 12: a MaxPool between the ReLUs and the head, parameters as buffers (ONNX): nothing or only the head
    to optimise, and never 'element 0 of tensors does not require grad'."""
    path = tmp_path / "pool.onnx"
    _conv_pool_onnx(path, head_relu)
    model = load_onnx(path)
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
        crown = margin_lower_bounds(model, x_lo, x_hi, y, "crown")
        alpha = margin_lower_bounds(model, x_lo, x_hi, y, "alpha-crown")
    assert (alpha >= crown - 1e-5).all()
    cert = certify(model, x, y, ThreatModel(0.05), "alpha-crown")
    assert torch.equal(cert.verified, (alpha > 0).all(1))


def test_sound_numerics_sets_and_restores_the_flags():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision, deterministic = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        torch.use_deterministic_algorithms(False)
        with pytest.raises(RuntimeError, match="inside"):
            with sound_numerics():
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
                assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
                with sound_numerics():  # nested: the outer block's flags come back
                    pass
                assert torch.are_deterministic_algorithms_enabled()
                raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(deterministic)


def test_float64_bounds_contain_float32_outputs_and_agree_with_float32_bounds():
    net = _nets()[1]
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = net(x).argmax(1)
    threat = ThreatModel(0.05)
    c32 = certify(net, x, y, threat, "crown")
    c64 = certify(net, x, y, threat, "crown", dtype=torch.float64)
    assert c64.lower.dtype == torch.float64 and next(net.parameters()).dtype == torch.float32  # a copy was cast
    torch.testing.assert_close(c64.lower.float(), c32.lower, rtol=0, atol=1e-4)
    torch.testing.assert_close(c64.upper.float(), c32.upper, rtol=0, atol=1e-4)
    assert torch.equal(c64.verified, c32.verified)
    lo, hi = threat.box(x)
    pts = lo + torch.rand(512, *x.shape, generator=torch.Generator().manual_seed(4)) * (hi - lo)
    pts = torch.cat([pts, lo.unsqueeze(0), hi.unsqueeze(0)])
    with torch.no_grad():
        out = net(pts.reshape(-1, 1, 4, 4)).reshape(len(pts), 8, 5).double()
    assert (out >= c64.lower).all() and (out <= c64.upper).all()
    for method in ("alpha-crown", "bab"):
        assert torch.equal(certify(net, x, y, threat, method, dtype=torch.float64).verified,
                           certify(net, x, y, threat, method).verified)
    with pytest.raises(HydraPipeError, match="dtype must be"):
        certify(net, x, y, threat, "crown", dtype=torch.float16)
