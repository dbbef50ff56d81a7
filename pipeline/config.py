"""Typed models of ``params.yaml``; one loader whose errors name the file, the section, the key and what was expected."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import HydraPipeError
from pipeline.threat import Norm, ThreatModel, whole_box_radius

Objective = Literal["benign", "pgd", "trades", "ibp", "crown-ibp", "mixtrain", "smoothing"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComputeParams(Strict):
    """Where every stage runs. Results are bit-for-bit reproducible for one machine kind and one thread count:
    the reduction order of a float sum depends on both, so the thread count is a param, not the environment."""

    threads: int = Field(2, gt=0, description="CPU threads of every stage (torch intra-op)")
    # the training stages (pretrain, prune, finetune); README "Several workers"
    workers: int = Field(1, gt=0, description="training processes per node (DDP); > 1: the stage launches torchrun "
                                              "itself unless already under torchrun; batch_size stays the global batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training under autocast (fp16 with a gradient scaler); bounds stay fp32")
    channels_last: bool = Field(False, description="train in the channels-last memory format (faster convolutions on GPUs)")


class DataParams(Strict):
    name: Literal["digits", "fashion_mnist", "mnist", "cifar10", "svhn", "imagefolder"] = "digits"
    root: str | None = Field(None, description="folder of the dataset's files (nothing is downloaded); unused for "
                                               "digits; fashion_mnist defaults to /usr/share/datasets/fashion-mnist")
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="digits: stratified held-out fraction")
    split_seed: int = Field(0, description="seed of digits' test split and of every validation split")
    validation: Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, union_mode="left_to_right",
        description="validation split carved (stratified, seeded by split_seed) from the training data: a count, or "
                    "a fraction in (0, 1); null = the dataset's default (5,000 for fashion_mnist and mnist, none for "
                    "the others); 0 = none. It calibrates the int8 model; the test split is the audit's")
    image_size: int | None = Field(None, gt=0, description="imagefolder: side of the centre crop")


class ModelParams(Strict):
    arch: str = "cnn_small"


class Optimiser(NamedTuple):
    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float  # sgd only (Nesterov when > 0)
    weight_decay: float


# The prune stage's optimiser where params leave it null, per method (what the method trains):
# hydra: the importance scores, with the authors' SGD (HYDRA's configs.yml: lr 0.1, momentum 0.9, weight decay 1e-4).
#   Adam at lr 1e-3 reorders the scaled scores within an epoch (its step is about lr whatever the gradient, and the
#   scaled scores of a wide layer are ~1e-2): on Fashion-MNIST at 99% its mask ended less robust than the magnitude
#   mask it started from (benchmarks/score_optimiser.py).
# admm: the weights, with Adam at lr 1e-3 (Ye et al.'s Robustness-Aware-Pruning-ADMM). lwm and random train nothing.
# (optimizer, lr, weight decay); momentum is the params' own (0.9).
METHOD_OPTIMISERS: dict[str, tuple[Literal["sgd", "adam"], float, float]] = {
    "hydra": ("sgd", 0.1, 1e-4),
    "admm": ("adam", 1e-3, 0.0),
    "lwm": ("sgd", 0.1, 1e-4),
    "random": ("sgd", 0.1, 1e-4),
}


class TrainParams(Strict):
    """One training stage (pretrain, prune or finetune): the loop is the same, what trains differs."""

    objective: Objective = "pgd"
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    # the training attack (pgd, trades, mixtrain)
    eps: float = Field(0.1, ge=0.0, description="L-inf radius of the training objective, inputs in [0, 1]")
    attack_steps: int = Field(10, ge=1)
    attack_step_size: float | None = Field(None, gt=0.0, description="default 2.5 * eps / min(attack_steps, 100)")
    trades_beta: float = Field(6.0, ge=0.0)
    # verified objectives (ibp, crown-ibp, mixtrain): schedules over the stage's steps (CROWN-IBP, Zhang et al. 2020)
    eps_ramp: float = Field(0.5, ge=0.0, le=1.0,
                            description="fraction of the stage over which the bound eps rises linearly from 0 to eps")
    kappa_end: float = Field(0.0, ge=0.0, le=1.0,
                             description="weight of the clean loss once eps is reached (starts at 1; CROWN-IBP's kappa)")
    crown_beta_end: float = Field(0.0, ge=0.0, le=1.0,
                                  description="crown-ibp: weight of the CROWN bound once eps is reached (starts at 1)")
    # mixtrain (Wang et al. 2018; HYDRA's trainer/mixtrain.py)
    mixtrain_k: int = Field(5, ge=1, description="examples of each batch that get the symbolic (linear-relaxation) loss")
    mixtrain_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability that a batch adds the symbolic loss")
    mixtrain_weight: float = Field(0.1, ge=0.0, description="initial weight of the symbolic loss (x2.5 every 5 epochs after the ramp, at most 50)")
    mixtrain_base: Literal["pgd", "benign"] = Field("pgd", description="the loss the symbolic loss is mixed with")
    # smoothing (Cohen et al. 2019): Gaussian data augmentation
    smoothing_sigma: float = Field(0.25, gt=0.0, description="std of the Gaussian noise added to training inputs")

    @field_validator("eps")
    @classmethod
    def _not_the_whole_box(cls, eps: float) -> float:
        if (why := whole_box_radius(eps)) is not None:
            raise ValueError(why)
        return eps

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.eps)

    def optimiser(self) -> "Optimiser":
        """The optimiser's settings (the prune stage resolves its method's own)."""
        return Optimiser(self.optimizer, self.lr, self.momentum, self.weight_decay)

    @property
    def step_size(self) -> float:
        return self.attack_step_size if self.attack_step_size is not None else self.threat.step_size(self.attack_steps)


class PruneParams(TrainParams):
    method: Literal["hydra", "lwm", "random", "admm"] = "hydra"
    granularity: Literal["weight", "filter"] = Field(
        "weight", description="weight: unstructured masks; filter: whole output channels (pipeline.structured)")
    keep_ratio: float = Field(0.1, gt=0.0, le=1.0, description="fraction of the pruned layers' weights kept (of each "
                                                                "layer, or overall: prune.rates)")
    rates: Literal["uniform", "global", "learned"] = Field(
        "uniform", description="how the kept weights are split across layers: uniform = keep_ratio of every layer; "
                               "global = one threshold over all layers; learned = per-layer rates trained with the "
                               "scores, the whole model on exactly keep_ratio (hydra only; masking.LearnedRates)")
    rate_start: Literal["uniform", "global"] = Field(
        "uniform", description="learned rates: the allocation they start from (global = global magnitude pruning's)")
    rate_lr: float = Field(0.05, gt=0.0, allow_inf_nan=False,
                           description="learned rates: learning rate of the per-layer rate logits")
    rate_min: float = Field(0.1, ge=0.0, le=1.0, description="learned rates: a layer keeps at least this fraction of "
                                                             "its uniform count (HARP's alpha)")
    skip_first: bool = False
    skip_last: bool = False
    score_init: Literal["scaled", "kaiming"] = "scaled"
    schedule_keep: list[float] = Field(default_factory=list,
                                       description="multi-step pruning: keep ratios before the final keep_ratio")
    bn: Literal["train", "eval"] = Field(
        "train", description="BatchNorm while scores train: train = batch statistics, running statistics follow the "
                             "sub-network (HYDRA's code); eval = the pretrained statistics. Affine parameters stay frozen")
    # what trains in this stage differs by method (HYDRA: the scores; ADMM: the weights), so does its optimiser:
    # null = the method's own (METHOD_OPTIMISERS); a value given here applies to whichever method runs
    optimizer: Literal["sgd", "adam"] | None = Field(None, description="null = the method's own: hydra sgd, admm adam")
    lr: float | None = Field(None, gt=0.0, description="null = the method's own: hydra 0.1, admm 0.001")
    weight_decay: float | None = Field(None, ge=0.0, description="null = the method's own: hydra 1e-4, admm 0")
    epochs: int = Field(20, ge=0)
    eps_ramp: float = Field(0.05, ge=0.0, le=1.0, description="short: the pretrained model is already robust (HYDRA)")
    # admm (Ye et al., ICCV 2019): the weights train with the objective + rho/2 ||W - Z + U||^2 for `epochs` epochs
    admm_rho: float = Field(0.01, gt=0.0, allow_inf_nan=False,
                            description="admm: initial penalty weight rho of ||W - Z + U||^2 (paper's code: 1e-3..1e-2)")
    admm_rho_growth: float = Field(1.3, ge=1.0, allow_inf_nan=False,
                                   description="admm: rho is multiplied by this at every Z, U update")
    admm_update_every: int = Field(2, ge=1, description="admm: epochs between Z, U updates (Z = top-k of W + U per "
                                                        "layer, U += W - Z)")

    def optimiser(self) -> Optimiser:
        """The optimiser of what this method trains: the values given, the method's own for those left null."""
        optimizer, lr, weight_decay = METHOD_OPTIMISERS[self.method]
        return Optimiser(self.optimizer or optimizer, lr if self.lr is None else self.lr, self.momentum,
                         weight_decay if self.weight_decay is None else self.weight_decay)

    @model_validator(mode="after")
    def _schedule_in_range(self) -> "PruneParams":
        for r in self.schedule_keep:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"schedule_keep entries must be in (0, 1], got {r}")
        if self.rates == "learned" and self.method != "hydra":
            raise ValueError(f"rates learned trains the per-layer rates with HYDRA's scores; method {self.method} "
                             "takes uniform or global")
        return self


class FinetuneParams(TrainParams):
    epochs: int = Field(20, ge=0)
    lr: float = Field(0.01, gt=0.0)
    eps_ramp: float = Field(0.05, ge=0.0, le=1.0, description="short: the pruned model is already robust (HYDRA)")


class QuantizeParams(Strict):
    calibration_size: int = Field(256, gt=0, description="images used to calibrate activation ranges (the validation split "
                                                           "when the dataset has one, else training images)")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    reduce_range: bool = Field(True, description="int8 weights within [-64, 64] (7 bits), which onnxruntime's "
                                                 "integer kernels compute exactly on every CPU; full-range weights "
                                                 "saturate its 16-bit pair sums on x86 CPUs without VNNI")


ATTACK_ORDER = ("apgd-ce", "apgd-t", "pgd", "square")
"""The audit's attacks in the order they run: the cheap gradient attacks first, the card's PGD on what they left,
then the gradient-free Square (an example only it breaks points at gradient masking). The params' vocabulary of
:data:`pipeline.audit.attacks.ATTACK_SPECS` (which checks at import that the two are one list)."""
Attack = Literal[ATTACK_ORDER]  # type: ignore[valid-type]
QUICK_ATTACKS = ("apgd-ce", "apgd-t", "square")
"""`audit.budget: quick`'s attacks: AutoAttack's standard set (APGD-CE, APGD-T, Square), without the card's PGD."""


class AuditParams(Strict):
    eps: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    norm: Norm = "linf"
    steps: int = Field(1000, ge=0, description="PGD steps; 0 runs no attack")
    restarts: int = Field(100, ge=1)
    step_size: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                    description="default 2.5 * eps / min(steps, 100)")
    loss: Literal["ce", "margin"] = "margin"
    ibp: bool = True
    crown: bool = True
    alpha_crown: bool = Field(True, description="alpha-CROWN (optimised ReLU slopes) on what CROWN left unverified")
    n_examples: int | None = Field(200, gt=0, description="seeded subset of the test split; null = all")
    batch_size: int = Field(4096, gt=0, description="memory budget: examples x restarts in one attack batch")
    # numpy's SeedSequence refuses negative seeds, torch's generators those past 64 bits
    seed: int = Field(0, ge=0, lt=2 ** 64, description="seed of the random starts, of Square and of smoothing")
    attacks: list[Attack] = Field(
        default_factory=lambda: list(ATTACK_ORDER),
        description="the attacks that run, always cheapest first (apgd-ce, apgd-t, pgd, square), each on what the "
                    "verifiers and the attacks before it left undecided; pgd is the card's steps x restarts")
    budget: Literal["card", "quick"] = Field(
        "card", description="card: every attack and verifier that is on, the card's PGD included; quick (a CI "
                            "gate): AutoAttack's attacks (apgd-ce, apgd-t, square; those of `attacks`) and IBP + "
                            "CROWN only, and the report says so")
    apgd_steps: int = Field(100, ge=1, description="APGD iterations per restart (AutoAttack: 100)")
    apgd_restarts: int = Field(1, ge=1, description="APGD-CE random restarts (AutoAttack standard: 1)")
    apgd_targets: int = Field(9, ge=1, description="APGD-T target classes, the top ones of the clean logits (AutoAttack: 9)")
    float_twin: bool = Field(True, description="int8 graphs: APGD also attacks the float twin (the graph without "
                                               "rounding); every break is confirmed on the deployed model")
    confirm_margin: float = Field(0.1, ge=0.0, allow_inf_nan=False,
                                  description="also confirm on onnxruntime every iterate whose torch logit margin is "
                                              "below this, not only the ones torch misclassifies; 0 = off")
    square_queries: int = Field(5000, ge=0, description="Square attack queries per restart (AutoAttack: 5000); 0 = off")
    square_restarts: int = Field(1, ge=1, description="Square attack restarts")
    bab: bool = Field(True, description="branch and bound (beta-CROWN style) on what the attacks and alpha-CROWN "
                                        "left undecided, before the card's PGD")
    bab_domains: int = Field(100, ge=1, description="branch and bound's budget per example, in bounded domains "
                                                     "(deterministic: the same verdicts on any machine)")
    bab_seconds: float = Field(30.0, gt=0.0, allow_inf_nan=False,
                               description="branch and bound's time cap per example: a safety net for deep "
                                           "networks (100 domains take about 1 s on CNN-small); an example it "
                                           "stops before bab_domains is reported as a timeout, not undecided")
    bab_shortfall: float | None = Field(0.25, ge=0.0, allow_inf_nan=False,
                                        description="branch and bound searches only examples whose root bound "
                                                    "falls short of zero by at most this share of its distance to "
                                                    "the margin at the box centre (pipeline.bounds.bab."
                                                    "BAB_SHORTFALL); null = every example")
    bab_alone: bool = Field(False, description="branch and bound also when alpha-CROWN is off (it builds on "
                                               "alpha-CROWN's bounds, so by default it runs only with it; an "
                                               "explicit --bab sets this)")
    verifier_share: float | None = Field(
        1.0, ge=0.0, allow_inf_nan=False,
        description="the verifiers sized to the network (pipeline.audit.sizing): CROWN, alpha-CROWN and branch and "
                    "bound are skipped (the report's skipped_verifiers says why) when their estimated work per "
                    "example exceeds this multiple of the attacks' requested work per example; null = never skipped")
    float64: bool = Field(False, description="compute the bounds in float64 (slower; for ill-conditioned networks)")
    threads: int | None = Field(None, gt=0, description="CPU threads of the attack and onnxruntime; null = default")
    workers: int = Field(1, ge=1, le=1024, description="processes the examples are sharded across (one per GPU, or "
                         "CPU cores with threads 1), each with the audit's own thread count: the report and every "
                         "record equal one process's")
    # randomized smoothing certification (Cohen et al. 2019, CERTIFY) of the deployed model; null = not run
    smoothing_sigma: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                          description="noise std of the smoothed classifier")
    smoothing_n0: int = Field(100, ge=1, description="Monte Carlo draws that select the top class")
    smoothing_n: int = Field(10000, ge=1, description="Monte Carlo draws that bound its probability (paper: 100,000)")
    smoothing_alpha: float = Field(0.001, gt=0.0, lt=0.5, description="failure probability of each certificate")
    smoothing_radii: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                         description="L2 radii at which certified accuracy is reported")
    # robust accuracy vs eps (the report's eps_sweep): every verifier that is on, and a smaller PGD, per radius
    sweep_eps: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(
        default_factory=list, description="radii of the eps sweep (robust accuracy vs eps); [] = no sweep")
    sweep_steps: int = Field(100, ge=0, description="PGD steps per restart at each swept eps; 0 = no attack")
    sweep_restarts: int = Field(5, ge=1, description="PGD random restarts at each swept eps")

    @model_validator(mode="after")
    def _attacks_once(self) -> "AuditParams":
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks: an attack is listed twice: {self.attacks}")
        for name, radii in (("eps", [self.eps]), ("sweep_eps", self.sweep_eps)):
            for eps in radii:
                if (why := whole_box_radius(eps, self.norm)) is not None:
                    raise ValueError(f"{name}: {why}")
        return self

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.eps, self.norm)

    def what_runs(self) -> "AuditParams":
        """These settings under :attr:`budget`: ``quick`` keeps the AutoAttack-equivalent attacks of ``attacks``
        and IBP + CROWN (no card's PGD, alpha-CROWN or branch and bound); ``card`` is as it is."""
        if self.budget == "card":
            return self
        return self.model_copy(update={"attacks": [a for a in self.attacks if a in QUICK_ATTACKS],
                                       "alpha_crown": False, "bab": False})


FloorFigure = Literal["clean", "pgd", "robust", "verified", "ibp", "crown", "alpha_crown", "bab"]
"""The audited figures a floor may name: those of ``hydra-pipe audit --fail-under``."""


class ExportParams(Strict):
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo", description="torch.onnx.export's exporter: dynamo (torch's default, what users get) or legacy "
                              "(the TorchScript one, opsets 13-17)")
    opset: int = Field(18, ge=13, description="ONNX opset of the exported model (dynamo: 18 or later)")
    parity_atol: float = Field(1e-4, gt=0.0)
    floor: dict[FloorFigure, Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: {"clean": 0.5},
        description="audited figures of the deployed int8 model below which the export warns or refuses "
                    "(below_floor), named as in `hydra-pipe audit --fail-under` (clean, pgd, robust, verified, ibp, "
                    "crown, alpha_crown, bab); a figure whose part did not run counts as 0; {} = no floor. Default "
                    "clean 0.5: a model that gets most test images wrong is not one to ship unnoticed")
    below_floor: Literal["warn", "refuse"] = Field(
        "warn", description="warn: ship it with a warning on the console, at the top of the model card and in "
                            "the ONNX metadata (key warning); refuse: one line, exit code 3, nothing written")

    @model_validator(mode="after")
    def _opset_the_exporter_writes(self) -> "ExportParams":
        # the dynamo exporter writes opset 18 when an older one is asked for networks with global pooling
        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError(f"opset: the dynamo exporter writes opset 18 or later, not {self.opset}; set "
                             f"export.exporter: legacy for opset {self.opset}")
        return self


class Params(Strict):
    compute: ComputeParams = ComputeParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    pretrain: TrainParams = TrainParams()
    prune: PruneParams = PruneParams()
    finetune: FinetuneParams = FinetuneParams()
    quantize: QuantizeParams = QuantizeParams()
    audit: AuditParams = AuditParams()
    export: ExportParams = ExportParams()


def located(err: dict) -> tuple[str, str]:
    """(where, what) of one pydantic error: a section's own check (a model validator, which pydantic places at the
    section) starts its message with the field it is about (``"eps: ..."``), and that field joins the place."""
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    field, sep, rest = msg.partition(": ")
    if err["type"] == "value_error" and sep and field.isidentifier():
        loc, msg = [*loc, field], rest
    return ".".join(loc), msg


def _describe(err: dict) -> str:
    loc, msg = located(err)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def load_params(path: Path | str = "params.yaml") -> Params:
    """Load and validate ``params.yaml``; any problem is a one-line :class:`HydraPipeError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise HydraPipeError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise HydraPipeError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise HydraPipeError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise HydraPipeError(f"{path}: {_describe(first)}{more}") from None


def params_hash(params: Params, *sections: str) -> str:
    """SHA-256 (12 hex) of the named sections (all when none), the provenance stamp of checkpoints and models."""
    dump = params.model_dump(mode="json")
    chosen = {k: dump[k] for k in (sections or dump.keys())}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]
