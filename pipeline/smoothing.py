"""Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019): CERTIFY with a Clopper-Pearson bound.

The smoothed classifier of a base classifier ``f`` is ``g(x) = argmax_c P(f(x + d) = c)``, ``d ~ N(0, sigma^2 I)``.
If the top class has probability ``p_A >= pA_lower > 1/2`` then ``g`` is constant on the L2 ball of radius
``sigma * Phi^-1(pA_lower)`` around ``x`` (Cohen et al., Thm. 1 with ``p_B = 1 - p_A``). CERTIFY (their Alg. 1)
estimates this with two independent Monte Carlo samples:

    counts0 <- SAMPLE(f, x, n0, sigma);  c_A <- argmax counts0        # selection
    counts  <- SAMPLE(f, x, n, sigma);   pA_lower <- LowerConfBound(counts[c_A], n, 1 - alpha)
    if pA_lower > 1/2: return c_A, sigma * Phi^-1(pA_lower)  else: ABSTAIN

With probability at least ``1 - alpha`` over the sampling, a returned class is ``g(x)`` and ``g`` is robust within
the returned radius. ``f`` is any callable from a float batch to logits: a torch module, or the deployed ONNX model
through onnxruntime (the audit certifies the model as deployed). The noise is not clipped to [0, 1], as in the
paper: the certificate is about ``g`` and holds for any ``f``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import norm as normal

from pipeline.errors import HydraPipeError

ABSTAIN = -1
Classifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Certificate:
    """CERTIFY's answer per example: ``prediction`` (``ABSTAIN`` = -1) and the certified L2 ``radius`` (0 when
    abstaining); ``pA_lower`` is the Clopper-Pearson lower bound on the top class's probability."""

    prediction: np.ndarray  # int64 [N]
    radius: np.ndarray  # float64 [N]
    pA_lower: np.ndarray  # float64 [N]
    seconds: float = 0.0

    def certified_accuracy(self, y: np.ndarray, radius: float) -> float:
        """Fraction of examples whose certified prediction is the label with a radius of at least ``radius``."""
        ok = (self.prediction == np.asarray(y)) & (self.radius >= radius)
        return float(ok.mean()) if len(ok) else float("nan")


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion: the ``alpha`` quantile of
    Beta(k, n - k + 1), and 0 when k = 0 (exact, never below the true proportion with probability >= 1 - alpha)."""
    k = np.asarray(successes, dtype=np.float64)
    lower = beta_dist.ppf(alpha, np.maximum(k, 1.0), trials - k + 1.0)
    return np.where(k > 0, lower, 0.0)


def sample_counts(f: Classifier, x: torch.Tensor, sigma: float, num: int, classes: int,
                  batch_size: int = 10000, generator: torch.Generator | None = None) -> np.ndarray:
    """SAMPLE of Cohen et al.: for each example of ``x`` [N, ...], how often ``f(x + N(0, sigma^2 I))`` predicts
    each class over ``num`` draws -> int64 [N, classes]. ``batch_size`` bounds the noisy inputs per call of ``f``;
    several examples share a call when ``num`` is small."""
    n_ex = len(x)
    counts = np.zeros((n_ex, classes), dtype=np.int64)
    if num == 0 or n_ex == 0:
        return counts
    per_call = max(1, batch_size // num)  # examples whose draws fit in one call
    for s in range(0, n_ex, per_call):
        xs = x[s:s + per_call]
        left = num
        while left > 0:
            draws = min(left, max(1, batch_size // len(xs)))
            batch = xs.unsqueeze(1).expand(len(xs), draws, *xs.shape[1:]).reshape(-1, *xs.shape[1:])
            noise = torch.randn(batch.shape, generator=generator, dtype=batch.dtype).to(batch.device)
            with torch.no_grad():
                pred = f(batch + sigma * noise).argmax(1).view(len(xs), draws).cpu()
            counts[s:s + len(xs)] += torch.nn.functional.one_hot(pred, classes).sum(1).numpy()
            left -= draws
    return counts


def certify(f: Classifier, x: torch.Tensor, sigma: float, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
            classes: int | None = None, batch_size: int = 10000, seed: int = 0) -> Certificate:
    """CERTIFY (Cohen et al., 2019, Alg. 1) for every example of ``x`` [N, C, H, W].

    ``n0`` draws select the top class, ``n`` fresh draws bound its probability from below at confidence
    ``1 - alpha``; the example abstains when that bound is not above 1/2. Defaults are the paper's (n0 = 100,
    n = 100,000, alpha = 0.001). Returns predictions, certified L2 radii and the probability bounds.
    """
    if sigma <= 0 or not math.isfinite(sigma):
        raise HydraPipeError(f"smoothing: sigma must be a finite number > 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise HydraPipeError(f"smoothing: n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0.0 < alpha < 0.5:
        raise HydraPipeError(f"smoothing: alpha must be in (0, 0.5), got {alpha}")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    if classes is None:
        with torch.no_grad():
            classes = int(f(x[:1]).shape[1])
    selection = sample_counts(f, x, sigma, n0, classes, batch_size, g)
    top = selection.argmax(1)
    estimation = sample_counts(f, x, sigma, n, classes, batch_size, g)
    n_top = estimation[np.arange(len(x)), top]
    p_lower = clopper_pearson_lower(n_top, n, alpha)
    certified = p_lower > 0.5
    radius = np.where(certified, sigma * normal.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
    prediction = np.where(certified, top, ABSTAIN).astype(np.int64)
    return Certificate(prediction, radius.astype(np.float64), p_lower, time.perf_counter() - start)


def certify_report(f: Classifier, x: torch.Tensor, y: np.ndarray, sigma: float, radii: Sequence[float],
                   n0: int = 100, n: int = 100_000, alpha: float = 0.001, batch_size: int = 10000,
                   seed: int = 0) -> dict:
    """The audit's smoothing block: CERTIFY on every example, then certified accuracy at each radius in ``radii``
    (radius 0 = accuracy of the smoothed classifier counting abstentions as errors)."""
    cert = certify(f, x, sigma, n0, n, alpha, batch_size=batch_size, seed=seed)
    y = np.asarray(y)
    correct = cert.prediction == y
    return {
        "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
        "certified_accuracy": {f"{r:g}": cert.certified_accuracy(y, r) for r in sorted({0.0, *radii})},
        "abstain_rate": float((cert.prediction == ABSTAIN).mean()) if len(y) else float("nan"),
        "mean_certified_radius": float(np.where(correct, cert.radius, 0.0).mean()) if len(y) else float("nan"),
        "seconds": cert.seconds,
    }
