"""Sound bounds on a classifier's logits over an input box: IBP, CROWN and alpha-CROWN.

References:
- IBP: Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust
  Models", 2018 (interval arithmetic in centre/radius form through affine layers).
- CROWN: Zhang et al., "Efficient Neural Network Robustness Certification with General Activation Functions",
  NeurIPS 2018 (backward linear relaxation; ReLU upper bound = chord, adaptive lower slope).
- CROWN-IBP: Zhang et al., ICLR 2020 (margin specification folded into the last linear layer; CROWN with IBP
  intermediate bounds).
- alpha-CROWN: Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
  Massively Parallel Incomplete Verifiers", ICLR 2021 (lower ReLU slopes of every layer optimised by projected
  gradient, the intermediate bounds recomputed from their own slopes).
- Branch and bound: Bunel et al., "Branch and Bound for Piecewise Linear Neural Network Verification", JMLR 2020
  (splits on unstable ReLUs, and on the clip floors of int8 activations, BaBSR's intercept score) with the
  per-split multipliers of beta-CROWN (Wang et al., NeurIPS 2021).

What is bounded, over which set, and how are kept apart: a *model* (any module :func:`pipeline.graph.as_graph`
accepts: our ``nn.Sequential`` models, residual models that ``torch.fx`` traces, an ``OnnxModule``), an input
*box* ``[x_lo, x_hi]`` (:meth:`pipeline.threat.ThreatModel.box` builds it from the L-inf ball intersected with the
valid range), and a *method*. IBP and CROWN are differentiable (no ``no_grad`` inside), so training losses on IBP
or CROWN margins send gradients to the weights and, through ``effective_weight``, to HYDRA's scores; only the
verdicts of :func:`certify` are computed without gradients.

Op vocabulary (the graph form's ops): Conv, Gemm/Linear, BatchNormalization (running statistics), Normalize,
Add/Sub/Mul/Div with a constant, Add/Sub/Mul of two tensors, Sum, AveragePool, GlobalAveragePool, ReduceMean over
non-batch axes, Flatten, Reshape and Transpose that keep the batch dimension, Select (a per-example selection: the
loader's fusion of a Transpose -> GatherND -> Transpose chain), Pad, Concat, Relu, LeakyRelu, Clip, Sigmoid,
MaxPool, QuantizeLinear, DequantizeLinear, Constant. Anything else raises :class:`UnsupportedOpError` naming the op
and the node.

How CROWN handles ops without a linear relaxation here (Clip, LeakyRelu): the backward pass stops at that node and
bounds its contribution with the node's interval box (a "cut"), which is sound because each term of the linear
bound is bounded separately. MaxPool has a linear relaxation (auto_LiRPA's ``BoundMaxPool``: the input with the
largest lower bound below, exact above when it dominates its window); Sigmoid two lines parallel to its chord that
touch the curve; Mul of two tensors McCormick's planes (sound for SiLU's ``x * sigmoid(x)``, but loose: they
treat the factors as independent). alpha-CROWN optimises the ReLU slopes only; the other relaxations stay fixed.

Quantized graphs (QuantizeLinear -> DequantizeLinear, as onnxruntime's QDQ format writes them):
- IBP: ``q(v) = clip(round(v), qmin, qmax)`` with ``v = x / s + z`` is monotone, so the box's endpoints are
  rounded and clipped. The endpoints are widened by ``QUANT_TOL`` quanta before rounding because onnxruntime's
  fused integer kernels (QLinearConv, QLinearAveragePool) and our float arithmetic may break an exact tie
  ``k + 0.5`` differently; without the widening the bounds could miss the deployed model's output.
- CROWN: the staircase lies between ``clip(v -/+ (1/2 + QUANT_TOL), q(v_lo), q(v_hi))``; each side's line is the
  tightest chord of that envelope over the box (where the box crosses qmin or qmax, a chord instead of a
  constant), or the constant ``q(v_lo)`` / ``q(v_hi)`` where that has the better mean over the box. A
  QuantizeLinear on the network input gets its exact interval (its coordinates vary independently).
  DequantizeLinear is affine and exact.

Layout: :mod:`pipeline.bounds.ops` holds one rule per op (its IBP rule and its CROWN rule side by side, like
auto_LiRPA's ``Bound*`` classes; adding an op or a relaxation is adding one class there), with the relaxations'
math in :mod:`pipeline.bounds.relax`; :mod:`pipeline.bounds.crown` is the engine that runs them over a graph,
:mod:`pipeline.bounds.alpha` alpha-CROWN (and beta-CROWN's split multipliers), :mod:`pipeline.bounds.spec` the
margin specification, the bounds' precision and the slack a proof keeps for the deployed float32 rounding
(:func:`margin_slack`), :mod:`pipeline.bounds.bab` branch and bound, :mod:`pipeline.bounds.verify` the registry of
bound methods and the batched verification loop :func:`certify` (``dtype=torch.float64`` for float64 bounds). Each
module imports only the ones before it in this list (box, relax, ops, crown, alpha, spec, bab, verify), and no
underscore name of another. Every entry point runs under :func:`pipeline.runtime.sound_numerics` (no TF32,
deterministic algorithms).
"""

from pipeline.bounds.alpha import alpha_crown_bounds
from pipeline.bounds.bab import BabResult, branch_and_bound
from pipeline.bounds.box import Box
from pipeline.bounds.crown import DEFAULT_MAX_ELEMENTS, crown_bounds, interval_bounds
from pipeline.bounds.relax import QUANT_TOL
from pipeline.bounds.spec import margin_slack, margin_spec
from pipeline.bounds.verify import BOUND_METHODS, Certificate, Method, certify, margin_lower_bounds, verified

__all__ = ["BOUND_METHODS", "BabResult", "Box", "Certificate", "DEFAULT_MAX_ELEMENTS", "Method", "QUANT_TOL",
           "alpha_crown_bounds", "branch_and_bound", "certify", "crown_bounds", "interval_bounds", "margin_lower_bounds",
           "margin_slack", "margin_spec", "verified"]
