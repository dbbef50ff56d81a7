"""The audit's report: one typed model that :func:`pipeline.audit.run.run_audit` returns and that the audit stage,
the export stage (ONNX metadata, model card), ``hydra-pipe info`` and the README read by field, never by string.
Every part of it is typed: the counts (:class:`Decided`, :class:`Settled`), the intervals, the seconds
(:class:`Seconds`, one field per phase), so a wrong key fails where it is written, not after the whole audit.

Accuracies are fractions in [0, 1] of the ``n`` audited examples; a figure is ``None`` when its part did not run.
The JSON schema (``AuditReport.model_json_schema()``) is the public contract; the README documents it.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field, model_validator

from pipeline.errors import HydraPipeError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SquareSummary(_Model):
    """The gradient-free Square attack (Andriushchenko et al. 2020) on what the gradient attacks left robust."""

    queries: int
    attacked: int = Field(description="examples the gradient attacks left robust and unverified")
    broken_beyond_pgd: int = Field(description="of those, broken by Square: a sign of gradient masking")
    gradient_masking_suspected: bool
    rejected_candidates: int = Field(description="points the torch graph misclassified but onnxruntime did not")


class AttackSummary(_Model):
    """One attack of the audit, run on what the verifiers and the attacks before it left undecided."""

    name: str = Field(description="apgd-ce, apgd-t, pgd or square")
    model: str = Field(description="what it attacked: graph (the deployed graph in torch, straight-through "
                                   "rounding) or float twin (the graph without rounding)")
    budget: str = Field(description="steps x restarts (targets), or queries x restarts")
    attacked: int = Field(description="examples it ran on")
    broken: int = Field(description="examples it broke first (confirmed on onnxruntime)")
    rejected_candidates: int = Field(description="points the torch graph misclassified but onnxruntime did not")
    near_boundary_checked: int = Field(0, description="iterates confirmed on onnxruntime because their torch margin "
                                                      "was near 0 (audit.confirm_margin)")

    @property
    def key(self) -> str:
        """Its field of the report's :class:`Seconds`."""
        return self.name.replace("-", "_") + ("_twin" if self.model == "float twin" else "")


class BabSummary(_Model):
    """Branch and bound (beta-CROWN's idea, Wang et al. 2021) on what the attacks and alpha-CROWN left undecided."""

    attacked: int = Field(description="examples it ran on")
    verified: int = Field(description="of those, proven robust")
    undecided: int = Field(description="of those, neither proven nor refuted within the domain budget, or not "
                                       "searched (skipped)")
    skipped: int = Field(0, description="of the undecided, never searched: their root bound was out of reach "
                                        "(audit.bab_shortfall)")
    timed_out: int = Field(0, description="of those, stopped by the time cap (audit.bab_seconds) before the domain "
                                          "budget: the one verdict that depends on the machine's speed")
    domains_per_example: int = Field(description="the per-example budget of bounded domains (audit.bab_domains)")
    seconds_per_example: float = Field(description="the per-example time cap (audit.bab_seconds)")


class SkippedVerifier(_Model):
    """A verifier that was on but did not run: sized out by its estimated cost (:mod:`pipeline.audit.sizing`), or
    branch and bound without the alpha-CROWN it builds on."""

    name: str = Field(description="crown, alpha-crown or bab")
    reason: str = Field(description="why, in words")
    work: float | None = Field(None, description="its estimated work per example (multiply-adds)")
    budget: float | None = Field(None, description="what it was allowed per example: audit.verifier_share x the "
                                                   "attacks' requested work (multiply-adds)")


class SmoothingSummary(_Model):
    """Randomized smoothing's CERTIFY (Cohen et al. 2019) on the deployed numerics."""

    sigma: float
    n0: int
    n: int
    alpha: float
    certified_accuracy: dict[str, float] = Field(description="L2 radius -> certified accuracy (radius 0: accuracy)")
    abstain_rate: float
    mean_certified_radius: float
    seconds: float | None = Field(None, description="null where the wall times are kept apart (the audit stage)")


class EpsPoint(_Model):
    """One radius of the eps sweep (``audit.sweep_eps``): what each verifier proves and what a smaller PGD leaves,
    on the audit's examples; a figure is None when its part did not run."""

    eps: float = Field(description="perturbation radius, inputs in [0, 1]")
    clean: float = Field(description="clean accuracy (the same at every radius)")
    pgd_robust: float | None = Field(description="no iterate of the sweep's PGD misclassified on onnxruntime")
    ibp_verified: float | None
    crown_verified: float | None
    alpha_crown_verified: float | None = Field(description="by alpha-CROWN or a verifier before it")
    steps: int = Field(description="the sweep's PGD steps per restart (audit.sweep_steps)")
    restarts: int = Field(description="the sweep's PGD restarts (audit.sweep_restarts)")


class Decided(_Model):
    """Every example in exactly one class: the audit's uncertainty (the per-example results file has each one)."""

    verified: int = Field(0, description="proven robust by a sound verifier")
    broken: int = Field(0, description="an attack found a point onnxruntime misclassifies (clean mistakes included)")
    undecided: int = Field(0, description="neither, every budget spent")
    timeout: int = Field(0, description="neither, branch and bound stopped by its time cap (machine-dependent)")
    error: int = Field(0, description="a bound or an attack gave a non-finite value: no verdict (never undecided)")


class Settled(_Model):
    """How the card's PGD settled the examples (each example once)."""

    verification: int = 0
    earlier_attacks: int = 0
    clean_wrong: int = 0
    broken: int = 0
    convergence: int = 0
    full_budget: int = 0


class Parity(_Model):
    """The graph form (what attacks and bounds run on) against onnxruntime on the audited clean inputs."""

    max_logit_difference: float = Field(description="largest |torch graph - onnxruntime| logit over the examples")
    tolerance: float = Field(description="what float32 rounding explains (relative to the logits' magnitude)")
    rounding_ties: int = Field(0, description="examples beyond the tolerance whose onnxruntime logits lie within the "
                               "graph form's bounds at the clean input: an int8 rounding tie decided the other way")
    ok: bool = Field(description="every example within tolerance or a rounding tie: the proofs are about what "
                                 "onnxruntime computes")


class Seconds(_Model):
    """Wall time per part of the audit (null: the part did not run). A journaled part keeps its first run's time."""

    load: float | None = None
    clean: float | None = None
    parity: float | None = None
    ibp: float | None = None
    crown: float | None = None
    alpha_crown: float | None = None
    bab: float | None = None
    apgd_ce: float | None = None
    apgd_t: float | None = None
    apgd_ce_twin: float | None = None
    apgd_t_twin: float | None = None
    pgd: float | None = None
    square: float | None = None
    sweep: float | None = None
    smoothing: float | None = None
    total: float | None = None

    def spent(self, *parts: str) -> float:
        """The sum of these parts' seconds (0 for those that did not run)."""
        return sum(getattr(self, p) or 0.0 for p in parts)


class AuditReport(_Model):
    """What ``hydra-pipe audit`` measured on one model: clean, verified (proofs) and robust (attacks) accuracy."""

    model: str = Field(description="the audited ONNX file")
    n: int = Field(description="audited examples")
    classes: int = Field(description="the model's output width")
    stripped_output_ops: list[str] = Field(
        default_factory=list, description="final ops removed so attacks and bounds run on the logits (Softmax, "
        "LogSoftmax: monotone per row, onnxruntime's argmax unchanged)")
    eps: float = Field(description="perturbation radius, inputs in [0, 1]")
    norm: str = Field(description="linf or l2")
    budget: str = Field("card", description="card: the card's budget (every attack and verifier asked for); quick: "
                        "AutoAttack's attacks (APGD-CE, APGD-T, Square) and IBP + CROWN only, a CI gate's preset: "
                        "not the card's PGD, alpha-CROWN or branch and bound")
    steps: int = Field(description="PGD steps per restart (0: no attack)")
    restarts: int = Field(description="PGD random restarts per example (worst case kept)")
    loss: str = Field(description="PGD's loss: margin or ce")
    seed: int = Field(description="seed of the random starts and of Square")
    batch_size: int = Field(description="attack memory budget: examples x restarts per batch")
    clean_accuracy: float = Field(description="onnxruntime's accuracy on the clean inputs")
    ibp_verified_accuracy: float | None = Field(None, description="proven by interval bound propagation")
    crown_verified_accuracy: float | None = Field(None, description="proven by CROWN (backward linear bounds)")
    alpha_crown_verified_accuracy: float | None = Field(
        None, description="proven by alpha-CROWN (optimised slopes) or by a method before it")
    verified_accuracy: float | None = Field(None, description="proven robust by any method that ran")
    parity: Parity | None = Field(None, description="the graph form against onnxruntime on the clean inputs")
    verification_refused: str | None = Field(
        None, description="why no proof is claimed although the bounds could run (the graph form does not compute "
        "what onnxruntime computes): verified figures null")
    verification_blocked_by: list[str] = Field(
        default_factory=list, description="op types without a bound rule: no verification ran (verified figures "
        "null), the attacks did")
    bab_verified_accuracy: float | None = Field(
        None, description="proven by branch and bound or by a method before it")
    skipped_verifiers: list[SkippedVerifier] = Field(
        default_factory=list, description="verifiers that were on but did not run, and why: sized out by their "
        "estimated cost against the attacks' requested work (audit.verifier_share), or branch and bound without "
        "alpha-CROWN")
    pgd_robust_accuracy: float | None = Field(
        None, description="no iterate of the gradient attacks (APGD-CE, APGD-T, PGD) misclassified on onnxruntime")
    robust_accuracy: float | None = Field(None, description="after every attack (the gradient attacks, then Square)")
    attacks: list[AttackSummary] = Field(
        default_factory=list, description="per attack, in the order they ran: name, model, budget, attacked, broken "
        "(first), rejected_candidates, near_boundary_checked (times in seconds); the verdict is the worst case over all")
    bab: BabSummary | None = Field(None, description="branch and bound: attacked, verified, undecided, budgets")
    decided: Decided = Field(default_factory=Decided, description="examples proven robust (verified), shown "
                             "breakable (broken, clean mistakes included), neither (undecided), stopped by a time cap "
                             "(timeout) or without a verdict (error): the audit's uncertainty")
    confidence_intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="95% Clopper-Pearson interval of each accuracy over the n audited "
        "examples (what n examples can tell about the population they were drawn from)")
    step_size: float | None = Field(None, description="PGD's constant step")
    robust_accuracy_by_restart: list[float] = Field(default_factory=list, description="with restarts 1..k")
    robust_accuracy_by_step: dict[str, float] = Field(default_factory=dict, description="steps -> robust accuracy")
    settled: Settled | None = Field(None, description="how the card's PGD settled the examples: verification / "
                                    "earlier_attacks / clean_wrong / broken / convergence / full_budget")
    rejected_candidates: int | None = Field(
        None, description="PGD iterates the torch graph misclassified but onnxruntime did not")
    rejected_examples: int | None = Field(None, description="examples with a rejected candidate")
    attack_work: float | None = Field(None, description="PGD's row-steps as a fraction of the plain algorithm's")
    square: SquareSummary | None = Field(None, description="queries, attacked, broken_beyond_pgd, "
                                         "gradient_masking_suspected, rejected_candidates")
    smoothing: SmoothingSummary | None = Field(None, description="sigma, n0, n, alpha, certified_accuracy per L2 "
                                               "radius, abstain_rate, mean_certified_radius, seconds")
    eps_sweep: list[EpsPoint] = Field(
        default_factory=list, description="robust accuracy vs eps (audit.sweep_eps): per radius eps, clean, "
        "pgd_robust (a smaller PGD: steps x restarts), ibp_verified, crown_verified, alpha_crown_verified")
    seconds: Seconds = Field(default_factory=Seconds, description="wall time per part (null in the audit stage's "
                             "reports/audit.json, which a rerun reproduces byte for byte: its times are in "
                             "reports/audit.timing.json, not tracked)")
    _examples: list = PrivateAttr(default_factory=list)

    def without_timings(self) -> "AuditReport":
        """This report with its wall times null (``seconds``, ``smoothing.seconds``; its records keep theirs): what
        one machine's rerun reproduces byte for byte, so the pipeline's audit stage tracks it in git and writes the
        times apart (:func:`pipeline.audit.records.write_timings`)."""
        smoothing = self.smoothing and self.smoothing.model_copy(update={"seconds": None})
        out = self.model_copy(update={"seconds": Seconds(), "smoothing": smoothing})
        out.attach(self._examples)
        return out

    def attach(self, records: list) -> None:
        """Keep the audit's per-example records (:class:`pipeline.audit.records.ExampleRecord`) with the report."""
        self._examples = list(records)

    def __eq__(self, other: object) -> bool:  # the report is its JSON: the records attached to it are beside it
        return isinstance(other, AuditReport) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    @property
    def examples(self) -> list:
        """Each example's record (status, deciding phase, margins, seconds per phase); empty for a report read
        back from JSON (the records are in the results files beside it)."""
        return self._examples

    @model_validator(mode="before")
    @classmethod
    def _derived_fields_are_not_inputs(cls, data: object) -> object:
        # a written report carries verified_method (computed); reading it back recomputes it
        if isinstance(data, dict) and "verified_method" in data:
            data = {k: v for k, v in data.items() if k != "verified_method"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def verified_method(self) -> str:
        """The verifiers that ran, joined by + (ibp+crown+alpha-crown), or none."""
        ran = [name for name, v in (("ibp", self.ibp_verified_accuracy), ("crown", self.crown_verified_accuracy),
                                    ("alpha-crown", self.alpha_crown_verified_accuracy),
                                    ("bab", self.bab_verified_accuracy)) if v is not None]
        return "+".join(ran) or "none"

    def headline(self) -> dict[str, float | int | str | None]:
        """The figures a deployed model carries about itself (ONNX metadata, model card)."""
        keys = ("n", "eps", "norm", "budget", "steps", "restarts", "loss", "step_size", "seed", "clean_accuracy",
                "pgd_robust_accuracy", "robust_accuracy", "ibp_verified_accuracy", "crown_verified_accuracy",
                "alpha_crown_verified_accuracy", "bab_verified_accuracy", "verified_accuracy")
        dump = self.model_dump(mode="json")
        return {k: dump[k] for k in keys}

    @classmethod
    def read(cls, path: Path) -> AuditReport:
        """Load a report written by the audit; a missing, unreadable or foreign file is one line."""
        from pydantic import ValidationError

        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except FileNotFoundError:
            raise HydraPipeError(f"{path}: audit report not found (run the audit stage first)") from None
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise HydraPipeError(f"{path}: not an audit report ({where}: {err['msg']})") from None


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` confidence interval of a proportion, ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    if n <= 0:
        return (0.0, 1.0)
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    # rounded outward to 4 decimals, so the printed interval still covers the exact one
    return (math.floor(lo * 1e4) / 1e4, min(1.0, math.ceil(hi * 1e4) / 1e4))


INTERVAL_FIGURES = ("clean_accuracy", "pgd_robust_accuracy", "robust_accuracy", "verified_accuracy")
"""The figures the report gives a confidence interval for."""


def intervals(report: AuditReport) -> dict[str, tuple[float, float]]:
    """The report's ``confidence_intervals``: each of :data:`INTERVAL_FIGURES` that ran, from its count."""
    n = report.n
    return {k: clopper_pearson(round(getattr(report, k) * n), n) for k in INTERVAL_FIGURES
            if getattr(report, k) is not None}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_report(report: AuditReport):
    """The audit report as a rich Table (the CLI prints it)."""
    from rich.table import Table

    table = Table(title=f"audit: {report.model}  ({report.n} examples, {report.norm} eps={report.eps:g})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("notes")
    sec = report.seconds

    def s(k: str) -> str:
        v = getattr(sec, k)
        return "" if v is None else f"{v:.1f} s"

    ci = report.confidence_intervals

    def pct(key: str) -> str:
        v = getattr(report, key)
        band = ci.get(key)
        return _pct(v) + (f" [{100 * band[0]:.1f}, {100 * band[1]:.1f}]" if band and v is not None else "")

    if report.budget == "quick":
        table.add_row("budget", "quick", "AutoAttack's attacks (APGD-CE, APGD-T, Square) and IBP + CROWN only: "
                                          "not the card's PGD, alpha-CROWN or branch and bound")
    table.add_row("clean accuracy", pct("clean_accuracy"), "onnxruntime; [95% Clopper-Pearson interval]")
    if report.stripped_output_ops:
        table.add_row("stripped output ops", ", ".join(report.stripped_output_ops),
                      "attacks and bounds run on the logits; onnxruntime compared by argmax")
    if report.parity is not None and not report.parity.ok:
        table.add_row("verification refused", "-", report.verification_refused or "")
    if report.verification_blocked_by:
        table.add_row("verification blocked by", ", ".join(report.verification_blocked_by), "no bound rule")
    table.add_row("IBP verified", _pct(report.ibp_verified_accuracy), s("ibp"))
    for sk in report.skipped_verifiers:
        table.add_row(f"{sk.name} skipped", "-", sk.reason)
    table.add_row("CROWN verified", _pct(report.crown_verified_accuracy), s("crown"))
    if report.alpha_crown_verified_accuracy is not None:
        table.add_row("alpha-CROWN verified", _pct(report.alpha_crown_verified_accuracy), s("alpha_crown"))
    if report.bab is not None:
        b = report.bab
        table.add_row("branch and bound verified", _pct(report.bab_verified_accuracy),
                      f"{b.verified} of {b.attacked} proven, {b.undecided - b.skipped} undecided after "
                      f"{b.domains_per_example} domains each, {b.skipped} not searched (root bound out of reach), "
                      f"{b.timed_out} stopped by the {b.seconds_per_example:g} s cap; {s('bab')}")
    if report.verified_accuracy is not None:
        table.add_row("verified (best proof)", pct("verified_accuracy"), report.verified_method)
    for a in report.attacks:
        where = "" if a.model == "graph" else f", {a.model}"
        table.add_row(f"{a.name} ({a.budget}{where})", f"{a.broken} broken",
                      f"of {a.attacked} attacked; {a.rejected_candidates} rejected by onnxruntime, "
                      f"{a.near_boundary_checked} near-boundary checks; {s(a.key)}")
    if report.pgd_robust_accuracy is not None:
        st = report.settled or Settled()
        table.add_row("robust to the gradient attacks", pct("pgd_robust_accuracy"),
                      f"PGD settled: {st.broken} broken, {st.convergence} converged, "
                      f"{st.full_budget} full budget; work {100 * (report.attack_work or 0):.1f}% of plain PGD")
        curve = report.robust_accuracy_by_restart
        if curve:
            marks = sorted({1, 10, len(curve)} & set(range(1, len(curve) + 1)))
            table.add_row("  by PGD restarts", " / ".join(_pct(curve[k - 1]) for k in marks),
                          "after " + ", ".join(str(k) for k in marks) + " restarts")
        sq = report.square
        if sq and sq.gradient_masking_suspected:
            table.add_row("Square attack", str(sq.broken_beyond_pgd),
                          "[bold red]broken beyond the gradient attacks: gradient masking suspected[/]")
        table.add_row("robust accuracy (all attacks)", pct("robust_accuracy"), "worst case per example")
    elif not report.attacks:
        table.add_row("robust accuracy", "-", "no attack ran")
    d = report.decided
    if d.verified + d.broken + d.undecided + d.timeout + d.error:
        extra = "".join(f", {v} {k}" for k, v in (("timed out", d.timeout), ("errors", d.error)) if v)
        table.add_row("decided", f"{d.undecided} undecided",
                      f"{d.verified} proven robust, {d.broken} broken (clean mistakes included){extra}")
    if report.eps_sweep:
        table.add_row("eps sweep", "PGD robust", s("sweep"))
    for pt in report.eps_sweep:
        verified = " / ".join(_pct(v) for v in (pt.ibp_verified, pt.crown_verified, pt.alpha_crown_verified))
        table.add_row(f"  eps {pt.eps:g}", _pct(pt.pgd_robust),
                      f"PGD {pt.steps} x {pt.restarts}; verified IBP / CROWN / alpha-CROWN: {verified}")
    sm = report.smoothing
    if sm:
        certified = ", ".join(f"{_pct(v)} at {r}" for r, v in sm.certified_accuracy.items())
        table.add_row(f"smoothing certified (sigma {sm.sigma:g})", _pct(sm.certified_accuracy["0"]),
                      f"L2 radius: {certified}; abstained {_pct(sm.abstain_rate)}; n={sm.n}; {s('smoothing')}")
    table.add_row("total time", s("total"), "")
    return table
