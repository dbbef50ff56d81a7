"""Intervals and the tensor algebra of linear bounds, shared by every op rule and the engine.

A box is IBP's object (Gowal et al. 2018); a linear bound is CROWN's (Zhang et al. 2018): a coefficient tensor
``A`` of shape [N or 1, M, *value_shape] per graph value plus a bias [N, M], of which the engine computes lower
bounds of ``sum(A * value)`` for each of the M rows. Upper bounds are lower bounds of the negated rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class Box:
    """An interval ``[lo, hi]`` kept in whichever form the last op produced; the other form on demand.

    Affine ops want centre/radius (Gowal et al.: ``c' = W c + b``, ``r' = |W| r``); monotone ops want endpoints.
    Converting only when the next op needs it saves elementwise passes, which dominate on small networks.
    """

    __slots__ = ("_lo", "_hi", "_c", "_r")

    def __init__(self, lo: Tensor | None = None, hi: Tensor | None = None, c: Tensor | None = None,
                 r: Tensor | None = None) -> None:
        self._lo, self._hi, self._c, self._r = lo, hi, c, r

    @classmethod
    def cr(cls, c: Tensor, r: Tensor) -> Box:
        return cls(c=c, r=r)

    @property
    def has_lohi(self) -> bool:
        return self._lo is not None

    @property
    def lo(self) -> Tensor:
        if self._lo is None:
            self._lo, self._hi = self._c - self._r, self._c + self._r  # type: ignore[operator]
        return self._lo

    @property
    def hi(self) -> Tensor:
        if self._hi is None:
            self.lo  # noqa: B018 - fills both
        return self._hi  # type: ignore[return-value]

    @property
    def c(self) -> Tensor:
        if self._c is None:
            self._c, self._r = (self._hi + self._lo) * 0.5, (self._hi - self._lo) * 0.5  # type: ignore[operator]
        return self._c

    @property
    def r(self) -> Tensor:
        if self._r is None:
            self.c  # noqa: B018
        return self._r  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        return (self._lo if self._lo is not None else self._c).shape  # type: ignore[union-attr]

    def map(self, f: Callable[[Tensor], Tensor]) -> Box:
        """Apply a map that commutes with both forms (reshapes, nonnegative linear maps without bias)."""
        if self._lo is not None:
            return Box(lo=f(self._lo), hi=f(self._hi))  # type: ignore[arg-type]
        return Box(c=f(self._c), r=f(self._r))  # type: ignore[arg-type]


class Boxes(dict):
    """Boxes of one bound computation by value name, plus what its backward passes may reuse (dense forms of
    small convs), so repeated backward passes over the same boxes (CROWN's intermediate bounds, alpha-CROWN's
    iterations) build them once.

    The engine fills it in graph order from the input, so the first value is the input box, whose coordinates
    vary independently (:attr:`input_name`; a rule may bound an elementwise op of the input exactly by its box).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dense: dict[str, Tensor | None] = {}
        self.tightened: dict[str, Tensor] = {}
        """CROWN's tightened neurons by value (bool, the value's shape): alpha-CROWN optimises the same ones."""

    @property
    def input_name(self) -> str | None:
        return next(iter(self), None)


def dot(a: Tensor, t: Tensor) -> Tensor:
    """``sum(a * t)`` over value dims: ``a`` [Na, M, *s] (Na in {1, N}), ``t`` [N or 1, *s] -> [N, M]."""
    af = a.flatten(2)
    tf = t.flatten(1)
    if af.shape[0] == 1:
        return tf @ af[0].T
    if tf.shape[0] == 1:
        return af @ tf[0]
    if af.shape[1] == 1:  # one row per example (CROWN's windows): a batch of 1 x 1 products is slow as bmm
        return (af[:, 0] * tf).sum(1, keepdim=True)
    return torch.bmm(af, tf.unsqueeze(2)).squeeze(2)


def unbroadcast(a: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``a`` [Na, M, *out] down to [Na, M, *shape[1:]] (undo broadcasting of a value of ``shape``)."""
    target = tuple(shape[1:])
    extra = a.dim() - 2 - len(target)
    if extra > 0:
        a = a.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, s in enumerate(target) if s == 1 and a.shape[i + 2] != 1)
    if dims:
        a = a.sum(dim=dims, keepdim=True)
    return a


def value_const(const: Tensor, a: Tensor) -> Tensor:
    """A constant operand broadcast to one example's value shape, with a batch dim of 1 (for :func:`dot`)."""
    return torch.broadcast_to(const, (1, *a.shape[2:]))


def as_rows(a: Tensor) -> tuple[Tensor, int, int]:
    na, m = a.shape[:2]
    return a.reshape(na * m, *a.shape[2:]), na, m


def from_rows(t: Tensor, na: int, m: int) -> Tensor:
    return t.reshape(na, m, *t.shape[1:])


def concretize(a: Tensor, box: Box) -> Tensor:
    """Lower bound of ``sum(a * v)`` over ``v`` in ``box``: ``a . c - |a| . r``."""
    return dot(a, box.c) - dot(a.abs(), box.r)
