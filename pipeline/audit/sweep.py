"""Robust accuracy vs eps (the report's ``eps_sweep``): at each radius of ``params.sweep_eps``, the verifiers that
are on (branch and bound aside) and PGD at the sweep's smaller budget (``sweep_steps`` x ``sweep_restarts``, no
Square) on the audit's examples. Each verifier block and PGD chunk of each radius is a part of the journal, as the
main audit's are; the PGD chunks of every radius are computed together (with workers, side by side)."""

from __future__ import annotations

import torch

from pipeline.audit.attacks import chunks, fraction, merge
from pipeline.audit.deployed import Deployed
from pipeline.audit.parts import Bars, Parts
from pipeline.audit.report import EpsPoint
from pipeline.audit.verify import verify, verify_late
from pipeline.config import AuditParams


def sweep(deployed: Deployed, xt: torch.Tensor, params: AuditParams, bars: Bars, parts: Parts
          ) -> tuple[list[EpsPoint], float]:
    """The sweep's points, and the seconds its parts took."""
    total = len(params.sweep_eps)
    tick = bars.task("eps sweep", 2 * total)
    quiet, radii = Bars(False), []
    tick(0, 2 * total)
    clean_correct = deployed.clean_correct
    for i, eps in enumerate(params.sweep_eps):
        # the default step of each radius: a fixed audit.step_size is meant for audit.eps
        p = params.model_copy(update={"eps": eps, "steps": params.sweep_steps, "restarts": params.sweep_restarts,
                                      "step_size": None})
        v = verify(deployed, xt, p, quiet, parts, False, part=f"sweep{i}-")
        verify_late(v, deployed, xt, p, quiet, parts, clean_correct, part=f"sweep{i}-", bab=False)
        todo = (clean_correct & ~v.verified).nonzero().squeeze(1).cpu().numpy()
        radii.append((p, v, chunks("pgd", p, todo, f"sweep{i}-pgd", parts.layout.chunk_batches)
                      if p.steps > 0 else []))
        tick(i + 1, 2 * total)
    tasks = [t for *_, c in radii for t in c]
    radius_of = [i for i, (*_, c) in enumerate(radii) for _ in c]
    left = [len(c) for *_, c in radii]
    finished: set[int] = set()

    def chunk_done(j: int, done: int) -> None:  # the bar's second half: a radius whose PGD chunks all ended
        if done == len(tasks[j].rows) and j not in finished:
            finished.add(j)
            left[radius_of[j]] -= 1
            tick(total + sum(1 for k, (*_, c) in enumerate(radii) if c and left[k] == 0), 2 * total)

    results = iter(parts.map(tasks, chunk_done))
    points, spent = [], 0.0
    for p, v, c in radii:
        pgd_robust = None
        spent += sum(v.seconds.values())
        if p.steps > 0:
            res = merge(clean_correct, ~clean_correct, c, [next(results) for _ in c])
            pgd_robust = fraction(res.robust)
            spent += res.seconds
        points.append(EpsPoint(eps=p.threat.eps, clean=fraction(clean_correct), pgd_robust=pgd_robust,
                               ibp_verified=v.ibp, crown_verified=v.crown, alpha_crown_verified=v.alpha_crown,
                               steps=p.steps, restarts=p.restarts))
    tick(2 * total, 2 * total)
    return points, spent
