"""The HYDRA paper's experiments on Fashion-MNIST at eps = 0.1 (L-inf), with the library's own functions.

Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020, on real 28 x 28 data:
``pipeline.data`` (``fashion_mnist``: 55,000 training images, the 5,000 validation images calibrate int8, the test
split is measured), ``pipeline.models`` (CNN-small, CNN-large), ``pipeline.training.train`` (every stage),
``pipeline.pruning.prune`` (``hydra``, ``lwm``, ``admm``), int8 (``pipeline.onnx_io.export_onnx``,
``pipeline.quantization.quantize_int8``) and the audit's attack part (``pipeline.audit.run.run_audit``: APGD-CE,
APGD-T, then PGD) on the fp32 ONNX model (32-bit rows) and on the int8 model as deployed (8-bit rows).

Experiments (``--experiments``, comma-separated):

- ``adversarial``: PGD adversarial training in every stage; dense, then each method of ``--methods`` (``hydra`` /
  ``lwm`` / ``admm``; ``hydra-adam``: HYDRA with its scores trained by Adam at lr 1e-3, the runs' score optimiser
  before 2026-12-07, the ablation of the score optimiser) with each allocation of ``--rates`` (``uniform``, ``global``, ``learned``: learned is HYDRA's
  only) at each sparsity (90, 95, 99%), each finetuned with the same budget; every arch of ``--archs``; the seeds
  of ``--seeds`` at the highest sparsity, the first seed elsewhere (the paper's Table 1, and its seed spread).
- ``verified``: ``crown-ibp`` in every stage (``--verified-objective ibp`` for IBP), dense and ``hydra`` (each HYDRA
  method of ``--methods``) at 90% and 99%; the rows add CROWN verified accuracy (``pipeline.bounds`` on fp32, the audit's IBP / CROWN on int8).
- ``benign``: a benign (non-robust) dense network, pruned by ``hydra`` with the PGD objective and no finetuning
  (the paper's robust sub-networks inside non-robust networks), ``lwm`` beside it for comparison.
- ``score_init``: HYDRA's scores initialised ``kaiming`` instead of ``scaled`` at 99% (the paper's ablation; its
  ``scaled`` counterpart is the ``adversarial`` experiment's ``hydra`` row, uniform rates, same seed: the same
  network, so it is not trained twice).

One dense pretrained network per (pretraining objective, arch, seed) is shared by every method of that seed. The
prune stage's optimiser is each method's own (``pipeline.config.METHOD_OPTIMISERS``: HYDRA's scores SGD lr 0.1,
ADMM's weights Adam lr 1e-3) unless ``--params`` sets one.
``--params runs/fashion/params.yaml`` takes every stage's settings from that run (the full budget: 55,000 images,
15 / 8 / 8 epochs, its optimisers and schedules), only the seed, method, sparsity, allocation and objective changed;
without it, ``--epochs`` per stage and the defaults of ``pipeline.config``.

Measured on the fp32 ONNX model (32-bit rows) and on the int8 model as deployed (8-bit rows), with the
adversarial-pruning benchmark's protocol (Piras et al. 2024): ``robust_accuracy`` by the audit's
AutoAttack-equivalent attacks (APGD-CE, APGD-T, Square 5000; ``--square-queries``), ``pgd_robust_accuracy`` by
PGD ``--attack-steps`` x ``--restarts`` alone (the card's kind of figure).

Rows: ``experiment, arch, method, rates, sparsity, seed, bits (32 or 8), clean_accuracy, robust_accuracy,
pgd_robust_accuracy, verified_accuracy (null where not measured), eps, n_test, seconds`` (seconds: the training and
pruning of that model, then its evaluation), the CPU and wall seconds of its training and of each measurement, where
it trained (``device``: ``--device``, CUDA when present; ``channels_last``: ``--channels-last``), plus the machine,
the thread count and the wall time. The JSON is
rewritten atomically after every model, and a rerun with the same ``--out`` skips the rows already there (a killed
run resumes). With ``--cache`` a killed model resumes too: its training stages keep resume states after every epoch
(``CACHE/resume/<model>/``, :mod:`pipeline.training`: the rerun's weights are bit for bit the uninterrupted run's),
its measured figures and the CPU / wall seconds spent on it so far (a :class:`Ledger`, so the CPU hours count the
killed process's work) sit beside them; the folder goes once the model's rows are written. ``--table`` prints the
README's table of a results file (seed mean and spread), ``--plot PNG`` draws robust accuracy against sparsity per
method and allocation, the seeds' spread as error bars.

Example (smoke test, about 2 minutes on one core)::

    .venv/bin/python benchmarks/fashion.py --train-subset 500 --epochs 1 --n-test 50 --experiments adversarial \\
        --archs cnn_small --sparsities 0.9 --seeds 0 --out /tmp/fashion.json
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)
EXPERIMENTS = ("adversarial", "verified", "benign", "score_init")
EPS = 0.1
GRID_REDUCE_RANGE = False
"""The grid's int8 rows quantize with full-range int8 weights, as every committed row was measured (the pipeline
now defaults to 7-bit weights, ``quantize.reduce_range``). On a CPU without VNNI onnxruntime's outputs of such a
graph can differ from its exact integers; the audit then refuses the verified figure (the attacks are confirmed on
onnxruntime all the same), so the rows hold for the machine that measured them."""


def _list(values: list[str], kind=str) -> list:
    return [kind(v.strip()) for item in values for v in item.split(",") if v.strip()]


class Results:
    """The output file: rows keyed by (experiment, arch, method, rates, sparsity, seed, bits), rewritten atomically.

    Several processes may share one file (the same command started twice runs the grid twice as wide): each claims
    a model before training it (``FILE.claims``: key -> pid; a dead process's claim is taken over), and every write
    merges the rows on disk under an exclusive lock (``FILE.lock``), so no row is lost or measured twice."""

    KEY = ("experiment", "arch", "method", "rates", "sparsity", "seed", "bits")

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.claims = path.with_name(path.name + ".claims")
        self.doc = {**header, "rows": []}
        self.done: set[tuple] = set()
        with self._locked():
            if path.is_file():
                old = json.loads(path.read_text())
                self.doc["wall_seconds_before"] = (old.get("wall_seconds", 0.0)
                                                   + old.get("wall_seconds_before", 0.0))
            self._reload()

    @contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _reload(self) -> None:
        """Take in the rows other processes wrote meanwhile (under the lock)."""
        if self.path.is_file():
            for r in read_rows(self.path):
                if self.key(r) not in self.done:
                    self.doc["rows"].append(r)
                    self.done.add(self.key(r))

    @classmethod
    def key(cls, row: dict) -> tuple:
        row = {"rates": "uniform", **row}  # rows written before the allocations were a dimension
        return tuple(round(row[k], 6) if isinstance(row[k], float) else row[k] for k in cls.KEY)

    def has(self, **key) -> bool:
        return self.key(key) in self.done

    def claim(self, key: dict, bits: list[int]) -> bool:
        """True when this process should measure the model of ``key``: its rows are not written and no other live
        process has claimed it; the claim is recorded."""
        with self._locked():
            self._reload()
            if all(self.has(**key, bits=b) for b in bits):
                return False
            claims = self._read_claims()
            name = json.dumps(self.key({**key, "bits": 0}))
            pid = claims.get(name)
            if pid is not None and pid != os.getpid() and _alive(pid):
                return False
            claims[name] = os.getpid()
            _write_text(self.claims, json.dumps(claims, indent=1))
            return True

    def add(self, rows: list[dict], wall: float) -> None:
        from pipeline.reporting import write_json

        with self._locked():
            self._reload()
            for r in rows:
                if self.key(r) not in self.done:
                    self.doc["rows"].append(r)
                    self.done.add(self.key(r))
            self.doc["wall_seconds"] = wall
            write_json(self.path, self.doc)
            claims = self._read_claims()
            if claims.pop(json.dumps(self.key({**rows[0], "bits": 0})), None) is not None:  # written: the claim goes
                _write_text(self.claims, json.dumps(claims, indent=1))

    def _read_claims(self) -> dict[str, int]:
        return json.loads(self.claims.read_text()) if self.claims.is_file() else {}


def normalised(row: dict) -> dict:
    """A row as this version names it. HYDRA rows without ``prune_optimizer`` were pruned with the runs' score
    optimiser before 2026-12-07 (Adam, lr 1e-3; ``runs/fashion/params.yaml`` said so): they are ``hydra-adam``,
    the score-optimiser ablation, wherever they come from (an older process may still write them)."""
    row = {"rates": "uniform", **row}
    if row["method"] == "hydra" and "prune_optimizer" not in row:
        row = {**row, "method": "hydra-adam", "prune_optimizer": "adam lr 0.001 wd 0"}
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file, :func:`normalised`."""
    return [normalised(r) for r in json.loads(path.read_text()).get("rows", [])]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_text(path: Path, text: str) -> None:
    from pipeline.reporting import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


METHODS = ("hydra", "lwm", "admm", "hydra-adam")
# ablations of learned rates, asked for by name (--methods ... --rates learned): where they start, how fast they move
RATE_VARIANTS = ("hydra-startglobal", "hydra-slowrates")
# a method's variant after the dash: what it changes in the prune stage's settings
VARIANTS = {"scaled": {"score_init": "scaled"}, "kaiming": {"score_init": "kaiming"},
            "adam": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
            "startglobal": {"rate_start": "global"}, "slowrates": {"rate_start": "global", "rate_lr": 0.005}}
RATES = ("uniform", "global", "learned")


def allocations(methods: list[str], rates: list[str]) -> list[tuple[str, str]]:
    """(method, rates) pairs: every method with every allocation, learned rates with HYDRA only (they train with
    its scores), and the learned rates' ablations (:data:`RATE_VARIANTS`) with learned rates only (elsewhere they
    would be HYDRA again)."""
    return [(m, r) for m in methods for r in rates
            if (r != "learned" or m.partition("-")[0] == "hydra") and (r == "learned" or m not in RATE_VARIANTS)]


def plan(experiments: list[str], archs: list[str], sparsities: list[float], seeds: list[int],
         methods: list[str] = list(METHODS), rates: list[str] = ["uniform"]) -> list[dict]:
    """Every model to measure: experiment, arch, seed, pretraining objective, method, allocation, sparsity."""
    jobs = []

    def job(exp: str, arch: str, seed: int, pretrain: str, method: str, sparsity: float, rate: str = "uniform"):
        jobs.append(dict(experiment=exp, arch=arch, seed=seed, pretrain=pretrain, method=method,
                         rates="uniform" if method == "dense" else rate, sparsity=sparsity))

    for exp in experiments:
        for arch in archs:
            if exp == "adversarial":
                for seed in seeds:
                    job(exp, arch, seed, "pgd", "dense", 0.0)
                    for s in sparsities:
                        if s == max(sparsities) or seed == seeds[0]:
                            for m, r in allocations(methods, rates):
                                job(exp, arch, seed, "pgd", m, s, r)
            elif exp == "verified":
                job(exp, arch, seeds[0], "verified", "dense", 0.0)
                for s in (0.9, 0.99):
                    for m, r in allocations([m for m in methods if m.startswith("hydra")] or ["hydra"], rates):
                        job(exp, arch, seeds[0], "verified", m, s, r)
            elif exp == "benign":
                job(exp, arch, seeds[0], "benign", "dense", 0.0)
                for s in sparsities:
                    for m in ("hydra", "lwm"):
                        job(exp, arch, seeds[0], "benign", m, s)
            elif exp == "score_init":  # scaled is the default init: its row is adversarial's hydra (uniform, 99%)
                job(exp, arch, seeds[0], "pgd", "hydra-kaiming", 0.99)
    return jobs


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="JSON results; rows already there are skipped")] =
        Path("benchmarks/results/fashion.json"),
    experiments: Annotated[list[str], typer.Option(help=f"comma-separated: {', '.join(EXPERIMENTS)}")] =
        [",".join(EXPERIMENTS)],
    archs: Annotated[list[str], typer.Option(help="comma-separated architectures")] = ["cnn_small,cnn_large"],
    sparsities: Annotated[list[str], typer.Option(help="comma-separated")] = ["0.9,0.95,0.99"],
    seeds: Annotated[list[str], typer.Option(help="comma-separated; all at the highest sparsity, the first elsewhere")] =
        ["0,1,2"],
    epochs: Annotated[int, typer.Option(min=0, help="epochs of each training stage (pretrain, prune, finetune)")] = 10,
    train_subset: Annotated[int | None, typer.Option(min=10, help="seeded subset of the training images")] = None,
    n_test: Annotated[int, typer.Option(min=1, help="seeded subset of the test split measured")] = 1000,
    attack_steps: Annotated[int, typer.Option(min=1, help="PGD steps of the measurement")] = 50,
    restarts: Annotated[int, typer.Option(min=1, help="PGD random restarts of the measurement")] = 5,
    verified_objective: Annotated[str, typer.Option(help="crown-ibp or ibp")] = "crown-ibp",
    int8: Annotated[bool, typer.Option(help="also measure each model as int8 ONNX (8-bit rows)")] = True,
    root: Annotated[str | None, typer.Option(help="Fashion-MNIST folder (default: Debian's)")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch and onnxruntime threads")] = 1,
    device: Annotated[str, typer.Option(help="where the models train: auto (CUDA when present), cpu or cuda (the "
                                             "measurement is the audit's: its attacks on CUDA when present, the "
                                             "deployed model on onnxruntime's CPU)")] = "auto",
    channels_last: Annotated[bool, typer.Option(help="train in the channels-last memory format (faster for "
                                                     "CNN-large on a CPU: benchmarks/README.md)")] = False,
    methods: Annotated[list[str], typer.Option(help="comma-separated pruning methods")] = [",".join(METHODS)],
    rates: Annotated[list[str], typer.Option(help="comma-separated allocations across layers (prune.rates)")] =
        ["uniform"],
    params: Annotated[Path | None, typer.Option(help="a params.yaml whose pretrain / prune / finetune settings every "
                                                     "model takes (e.g. runs/fashion/params.yaml); --epochs then "
                                                     "does nothing")] = None,
    square_queries: Annotated[int, typer.Option(min=0, help="Square's queries in the robust accuracy")] = 5000,
    cache: Annotated[Path | None, typer.Option(help="folder keeping each dense pretrained network (safetensors, "
                                                    "keyed by its settings): a resumed run, or a second process on "
                                                    "the same --out, trains it once; and each model's resume states "
                                                    "(a killed model continues after its last epoch)")] = None,
    table: Annotated[Path | None, typer.Option(help="print the markdown table of this results file and stop")] = None,
    plot: Annotated[Path | None, typer.Option(help="with --table: also draw robust accuracy vs sparsity (PNG)")] = None,
    readme: Annotated[Path | None, typer.Option(help="with --table: rewrite that markdown file's generated block "
                                                     "named after the results file (fashion_full.json: "
                                                     "fashion-full) with the table")] = None,
    goals: Annotated[bool, typer.Option(help="with --table: judge issue 25's goals from the rows (the full grid; "
                                             "--no-goals for an ablation's file)")] = True,
) -> None:
    if table is not None:
        rows = read_rows(table)
        typer.echo(render_block(rows, goals))
        if plot is not None:
            draw(rows, plot)
        if readme is not None:
            from pipeline.reporting import atomic_write_bytes

            atomic_write_bytes(readme, readme_with_table(readme.read_text(), rows, table.stem, goals).encode())
        return
    os.environ.setdefault("HYDRA_PIPE_QUIET", "1")
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from pipeline import distributed
    from pipeline.config import AuditParams, ComputeParams, DataParams, FinetuneParams, PruneParams, TrainParams
    from pipeline.data import as_arrays, load_dataset
    from pipeline.errors import HydraPipeError
    from pipeline.masking import global_sparsity, plain_copy, sparsity_report
    from pipeline.models import build_model
    from pipeline.pruning import prune
    from pipeline.training import train

    exps = _list(experiments)
    unknown = sorted(set(exps) - set(EXPERIMENTS))
    if unknown:
        raise typer.BadParameter(f"--experiments: unknown {', '.join(unknown)}; expected {', '.join(EXPERIMENTS)}")
    for option, given, allowed in (("--methods", _list(methods), METHODS + RATE_VARIANTS),
                                   ("--rates", _list(rates), RATES)):
        if sorted(set(given) - set(allowed)):
            raise typer.BadParameter(f"{option}: unknown {', '.join(sorted(set(given) - set(allowed)))}; expected "
                                     f"{', '.join(allowed)}")
    run_params = None
    if params is not None:
        from pipeline.config import load_params

        try:
            run_params = load_params(params)
        except HydraPipeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    if verified_objective not in ("crown-ibp", "ibp"):
        raise typer.BadParameter("--verified-objective: crown-ibp or ibp")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"--device: {device!r}; expected auto, cpu or cuda")
    try:
        dev = distributed.init(device)  # the stages' own choice: auto is CUDA when present
    except HydraPipeError as e:
        raise typer.BadParameter(f"--device: {e}") from None
    torch.set_num_threads(threads)
    compute = ComputeParams(threads=threads, device=device, channels_last=channels_last)
    # what the rows record of where they trained; a GPU-trained network is another network than a CPU-trained one
    # of the same settings, so its cache and resume names say so (a CPU run's names are unchanged)
    placement = {"device": dev.type, "channels_last": channels_last}
    own_names = ([] if dev.type == "cpu" else [dev.type]) + (["channels_last"] if channels_last else [])
    t_start = time.perf_counter()
    try:
        data = load_dataset(DataParams(name="fashion_mnist", root=root))
    except HydraPipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    train_set = data.train
    if train_subset is not None and train_subset < len(train_set):
        idx = np.sort(np.random.default_rng(0).choice(len(train_set), train_subset, replace=False))
        train_set = Subset(train_set, idx.tolist())
    x_np, y_np = as_arrays(data.test, limit=n_test, seed=0)
    x_cal, _ = as_arrays(data.val if data.val is not None else data.train, limit=500, seed=0)
    header = {"benchmark": "fashion", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__, "eps": EPS,
              "options": {"epochs": epochs, "train_subset": train_subset, "n_test": n_test, "attack_steps": attack_steps,
                          "restarts": restarts, "verified_objective": verified_objective, "square_queries": square_queries,
                          "params": str(params) if params else None, "train_images": len(train_set)}}
    results = Results(out, header)
    seeds_ = _list(seeds, int)
    jobs = plan(exps, _list(archs), _list(sparsities, float), seeds_, _list(methods), _list(rates))
    dense_cache: dict[tuple, tuple] = {}

    def stage_params(kind: str, objective: str, seed: int) -> dict:
        ramp = {"eps_ramp": 0.5} if kind == "pretrain" and objective in ("ibp", "crown-ibp") else {}
        if run_params is not None:  # the run's settings (its epochs, optimiser, schedule), this model's seed, objective
            own = getattr(run_params, kind).model_dump()
            if kind == "prune":  # the method, allocation and keep ratio are the job's
                own = {k: v for k, v in own.items() if k not in ("method", "rates", "keep_ratio", "score_init")}
            return {**own, "objective": objective, "seed": seed, "eps": EPS, **ramp}
        return {"objective": objective, "epochs": epochs, "seed": seed, "eps": EPS, "attack_steps": 10, **ramp}

    def dense(pretrain: str, arch: str, seed: int):
        key = (pretrain, arch, seed)
        if key not in dense_cache:
            objective = verified_objective if pretrain == "verified" else pretrain
            settings = stage_params("pretrain", objective, seed)

            digest = hashlib.sha256(json.dumps([arch, len(train_set), train_subset, settings, *own_names],
                                               sort_keys=True).encode()).hexdigest()[:12]
            name = f"{pretrain}-{arch}-seed{seed}-{digest}"
            work = cache / "resume" / name if cache is not None else None

            def fit():
                ledger = Ledger(work / "ledger.json" if work is not None else None)
                with ledger.phase("train"):
                    torch.manual_seed(seed)
                    model = build_model(arch, data.info).to(dev)
                    train(model, train_set, TrainParams(**settings), label=f"pretrain {arch} {objective} seed {seed}",
                          resume_dir=work, compute=compute)
                return model, ledger.wall("train"), ledger.cpu("train")

            if cache is None:
                dense_cache[key] = fit()
            else:
                dense_cache[key] = cached_dense(cache / f"{name}.safetensors", fit,
                                                lambda: build_model(arch, data.info).to(dev))
                shutil.rmtree(work, ignore_errors=True)  # written: its resume state and ledger go
        return dense_cache[key]

    def measure(model, verify: bool, bits: int) -> dict:
        """The audit's attack part (APGD-CE, APGD-T, PGD ``attack_steps`` x ``restarts``; no Square) on the model
        as ONNX, fp32 or int8 as deployed, and with ``verify`` its IBP / CROWN verified accuracy: one measurement
        for both bit widths, so their difference is the quantization's alone."""
        from pipeline.audit.run import run_audit
        from pipeline.onnx_io import export_onnx
        from pipeline.quantization import quantize_int8

        model.eval()
        with tempfile.TemporaryDirectory(prefix="hydra-fashion-") as tmp:
            fp32, q8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            info = data.info
            export_onnx(plain_copy(model).eval(), fp32, (info.channels, info.size, info.size))
            if bits == 8:
                quantize_int8(fp32, q8, x_cal, reduce_range=GRID_REDUCE_RANGE)
            common = dict(eps=EPS, steps=attack_steps, restarts=restarts, n_examples=None, alpha_crown=False,
                          bab=False, sweep_eps=[], threads=threads)
            model_file = q8 if bits == 8 else fp32
            # the adversarial-pruning benchmark's robust accuracy: AutoAttack's attacks (and the verifiers)
            aa = run_audit(model_file, x_np, y_np, AuditParams(**common, ibp=verify, crown=verify,
                                                                 square_queries=square_queries,
                                                                 attacks=["apgd-ce", "apgd-t", "square"]),
                           progress=False)
            pgd = run_audit(model_file, x_np, y_np, AuditParams(**common, ibp=False, crown=False, attacks=["pgd"]),
                            progress=False)
        return {"clean_accuracy": aa.clean_accuracy, "robust_accuracy": aa.robust_accuracy,
                "pgd_robust_accuracy": pgd.robust_accuracy,
                "verified_accuracy": aa.verified_accuracy if verify else None}

    for job in jobs:
        bits = [32, 8] if int8 else [32]
        key = {k: job[k] for k in ("experiment", "arch", "method", "rates", "sparsity", "seed")}
        if not results.claim(key, bits):  # written, or another process is on it
            continue
        verify = job["experiment"] == "verified"
        base, dense_s, dense_cpu = dense(job["pretrain"], job["arch"], job["seed"])
        # the model's resume folder (cache/resume/...): its stages' resume states, the figures measured so far and
        # the seconds spent, so a killed process's work continues where it stopped (bit for bit: pipeline.training)
        work = None
        if cache is not None and job["method"] != "dense":
            digest = hashlib.sha256(json.dumps([key, header["options"], *own_names],
                                               sort_keys=True).encode()).hexdigest()[:12]
            work = cache / "resume" / (f"{job['experiment']}-{job['arch']}-{job['method']}-{job['rates']}-"
                                       f"{job['sparsity']:g}-seed{job['seed']}-{digest}")
        ledger = Ledger(work / "ledger.json" if work is not None else None)
        optimiser = None  # what trained in the prune stage (recorded: the score optimiser changed on 2026-12-07)
        if job["method"] == "dense":
            model = base
        else:
            model = copy.deepcopy(base)
            method, _, variant = job["method"].partition("-")
            objective = verified_objective if verify else "pgd"
            p = PruneParams(**{**stage_params("prune", objective, job["seed"]), "method": method,
                               "rates": job["rates"], "keep_ratio": round(1.0 - job["sparsity"], 6),
                               **VARIANTS.get(variant, {})})
            o = p.optimiser()
            optimiser = f"{o.optimizer} lr {o.lr:g} wd {o.weight_decay:g}"
            with ledger.phase("train"):
                prune(model, train_set, p, resume_dir=work / "prune" if work is not None else None, compute=compute)
                if job["experiment"] != "benign":  # the robust sub-network of a benign network is not finetuned
                    train(model, train_set, FinetuneParams(**stage_params("finetune", objective, job["seed"])),
                          label=f"finetune {job['method']} {job['sparsity']:g}",
                          resume_dir=work / "finetune" if work is not None else None, compute=compute)
        train_s = dense_s + ledger.wall("train")
        train_cpu = dense_cpu if job["method"] == "dense" else ledger.cpu("train")
        # where the allocation put the weights (learned rates: what they learned), one report for every bit width
        kept = [int(r["kept"]) for r in sparsity_report(model).values()]
        sparsity = global_sparsity(model)
        rows = []
        for b in bits:
            figures = ledger.done.get(f"measure-{b}")  # measured before the process was stopped
            if figures is None:
                with ledger.phase(f"measure-{b}"):
                    figures = measure(model, verify, b)
                ledger.record(f"measure-{b}", figures)
            rows.append({**key, "bits": b, **figures, "eps": EPS, "n_test": len(y_np),
                         "seconds": round(train_s + ledger.wall(f"measure-{b}"), 2),
                         "train_cpu_seconds": round(train_cpu, 2),
                         "measure_cpu_seconds": round(ledger.cpu(f"measure-{b}"), 2),
                         "train_wall_seconds": round(dense_s if job["method"] == "dense" else ledger.wall("train"), 2),
                         "measure_wall_seconds": round(ledger.wall(f"measure-{b}"), 2),
                         "measured_sparsity": round(sparsity, 6), "kept_per_layer": kept,
                         "prune_optimizer": optimiser, **placement})
            typer.echo(f"{job['experiment']:>11} {job['arch']:>9} {job['method']:>13} {job['rates']:>7} "
                       f"{job['sparsity']:>5g} seed {job['seed']} {b:>2}-bit: clean {rows[-1]['clean_accuracy']:.3f} "
                       f"robust {rows[-1]['robust_accuracy']:.3f} pgd {rows[-1]['pgd_robust_accuracy']:.3f}"
                       + (f" verified {rows[-1]['verified_accuracy']:.3f}" if verify else ""))
        results.add(rows, time.perf_counter() - t_start)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)  # written: the model's resume folder goes
    typer.echo(f"{len(results.doc['rows'])} rows in {out} ({time.perf_counter() - t_start:.0f} s)")


class Ledger:
    """What one model's work has cost and produced, across the processes that worked on it: ``path`` (JSON) keeps
    each phase's CPU and wall seconds, written every ``every`` seconds by a background thread while the phase runs and
    when it ends (so a killed process's seconds up to its last write count when another process finishes the work),
    and the results recorded so far. ``path`` None: the same, in memory only."""

    def __init__(self, path: Path | None, every: float = 30.0) -> None:
        self.path, self.every = path, every
        doc = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.spent: dict[str, dict[str, float]] = doc.get("spent", {})
        self.done: dict[str, dict] = doc.get("done", {})

    def cpu(self, phase: str) -> float:
        return self.spent.get(phase, {}).get("cpu", 0.0)

    def wall(self, phase: str) -> float:
        return self.spent.get(phase, {}).get("wall", 0.0)

    def record(self, name: str, result: dict) -> None:
        self.done[name] = result
        self._write()

    @contextmanager
    def phase(self, name: str):
        import threading

        cpu0, wall0 = self.cpu(name), self.wall(name)
        c, t = time.process_time(), time.perf_counter()
        stop = threading.Event()

        def tick() -> None:
            self.spent[name] = {"cpu": cpu0 + time.process_time() - c, "wall": wall0 + time.perf_counter() - t}
            self._write()

        def keep() -> None:
            while not stop.wait(self.every):
                tick()

        thread = threading.Thread(target=keep, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            tick()

    def _write(self) -> None:
        if self.path is not None:
            _write_text(self.path, json.dumps({"spent": self.spent, "done": self.done}, indent=1))


def cached_dense(path: Path, fit, blank):
    """``(model, wall seconds, CPU seconds)`` of the dense network in ``path`` (safetensors; its training's seconds
    in the metadata), or of ``fit()`` trained once and saved there: the file's lock holds a second process until the
    first has written it."""
    import fcntl

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                model, seconds, cpu = fit()
                tmp = path.with_name(path.name + ".part")
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                          metadata={"seconds": f"{seconds:.2f}", "cpu_seconds": f"{cpu:.2f}"})
                os.replace(tmp, path)
                return model, seconds, cpu
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    model = blank()
    model.load_state_dict(state)
    # a file written before CPU time was recorded: its wall time (one thread, the machine alone)
    return model, float(meta["seconds"]), float(meta.get("cpu_seconds", meta["seconds"]))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (experiment, arch, method, rates, sparsity, bits): one group per model but its seed."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        r = {"rates": "uniform", "pgd_robust_accuracy": None, **r}
        out.setdefault((r["experiment"], r["arch"], r["method"], r["rates"], r["sparsity"], r["bits"]), []).append(r)
    return out


def render_table(rows: list[dict]) -> str:
    """The README's table: one line per model (seeds: their mean ± half their range), then the grid's CPU time.
    Where rows record their kept weights per layer, a column gives them (the first seed's; "-" for older rows)."""
    from stages.figures import mean_spread
    kept = any("kept_per_layer" in r for r in rows)
    lines = ["| experiment | arch | method | rates | sparsity | bits | seeds | clean | robust (AA-eq.) | PGD robust | "
             "verified | CPU s per seed |" + (" kept per layer (first seed) |" if kept else ""),
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" --- |" if kept else "")]
    for (exp, arch, method, rates, sparsity, bits), g in sorted(_groups(rows).items(),
                                                                  key=lambda kv: (kv[0][0], kv[0][1], kv[0][4],
                                                                                  kv[0][2], kv[0][3], -kv[0][5])):
        cpu = [r["train_cpu_seconds"] + r["measure_cpu_seconds"] for r in g
               if "measure_cpu_seconds" in r and r.get("device", "cpu") == "cpu"]
        lines.append(f"| {exp} | {arch} | {method} | {rates} | {100 * sparsity:g}% | {bits} | {len(g)} | "
                     f"{mean_spread([r['clean_accuracy'] for r in g])} | "
                     f"{mean_spread([r['robust_accuracy'] for r in g])} | "
                     f"{mean_spread([r['pgd_robust_accuracy'] for r in g])} | "
                     f"{mean_spread([r['verified_accuracy'] for r in g])} | "
                     f"{f'{sum(cpu) / len(cpu):.0f}' if cpu else '-'} |" + (f" {_kept(g)} |" if kept else ""))
    hours, unknown = cpu_hours(rows)
    gpu = sum(r.get("device", "cpu") == "cuda" for r in rows)
    lines += ["", f"{len(rows)} rows; CPU time of the models they measure (each training once, each measurement): "
                  f"{hours:.1f} CPU hours" + (f", {unknown} rows written before CPU time was recorded not counted"
                                              if unknown else "")
              + (f"; {gpu} rows trained on a GPU: {cpu_hours(rows, 'cuda')[0]:.2f} GPU hours (wall)" if gpu else "")
              + "."]
    return "\n".join(lines)


def _kept(group: list[dict]) -> str:
    """The first seed's kept weights per layer (``a / b / ...``), "-" where its row does not record them."""
    first = min(group, key=lambda r: r["seed"]).get("kept_per_layer")
    return " / ".join(str(k) for k in first) if first else "-"


def cpu_hours(rows: list[dict], device: str = "cpu") -> tuple[float, int]:
    """The grid's CPU hours (each model's own training once, a dense network once per pretraining, every row's
    measurement) and how many rows do not say (written before ``train_cpu_seconds`` was recorded). ``device``
    "cuda": the wall hours of the rows trained on a GPU instead (their CPU seconds are the host's, not the work's);
    each count takes only its own device's rows."""
    trained: dict[tuple, float] = {}
    total, unknown = 0.0, 0
    for r in rows:
        if r.get("device", "cpu") != device:
            continue
        if "measure_cpu_seconds" not in r:
            unknown += 1
            continue
        total += r["measure_cpu_seconds" if device == "cpu" else "measure_wall_seconds"]
        # one per model, whatever its bit widths
        trained[Results.key({**r, "bits": 0})] = r["train_cpu_seconds" if device == "cpu" else "train_wall_seconds"]
    return (total + sum(trained.values())) / 3600, unknown


SEEDS = 3  # the goals: mean of 3 seeds at 99%


def _robust(rows: list[dict], *, experiment: str = "adversarial", arch: str = "cnn_small", bits: int = 32,
            **match) -> dict[tuple[str, str], dict[int, float]]:
    """``{(method, rates): {seed: robust accuracy}}`` of the matching rows (``match``: sparsity, method, ...);
    the methods only, not their ablation variants (``hydra-adam``): the goals are the pipeline's."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        r = {"rates": "uniform", **r}
        if (r["experiment"], r["arch"], r["bits"]) == (experiment, arch, bits) and "-" not in r["method"] and \
                all(r[k] == v for k, v in match.items()):
            out.setdefault((r["method"], r["rates"]), {})[r["seed"]] = r["robust_accuracy"]
    return out


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[dict[int, float], dict[int, float]]:
    """Two models' figures on the seeds both have (a comparison of means over different seeds is not one)."""
    common = sorted(set(a) & set(b))
    return {s: a[s] for s in common}, {s: b[s] for s in common}


def _mean(v: dict[int, float]) -> float:
    return sum(v.values()) / len(v)


def _half(v: dict[int, float]) -> float:
    return (max(v.values()) - min(v.values())) / 2


def _fig(name: str, v: dict[int, float]) -> str:
    from stages.figures import mean_spread
    return f"{name} {mean_spread(list(v.values()))} ({len(v)} seed{'s' if len(v) != 1 else ''})"


def _seeds_note(*groups: dict[int, float]) -> str:
    short = min(len(g) for g in groups)
    return "" if short >= SEEDS else f" (provisional: {short} of {SEEDS} seeds)"


def render_goals(rows: list[dict]) -> list[str]:
    """Issue 25's goals judged from the results file: one line each, the figures it rests on, and **met**, **not
    met**, *provisional* (fewer seeds than the goal asks) or *not measured* (a row it needs is missing).
    Robust accuracy is the AutoAttack-equivalent figure of the 32-bit rows (the int8 goal compares both)."""
    lines = ["Goals (issue 25), judged from the same file by `render_goals`:", ""]

    def verdict(ok: bool, provisional: str = "") -> str:
        return ("**met**" if ok else "**not met**") + provisional

    at99 = _robust(rows, sparsity=0.99)
    # 1. HYDRA against LWM at 99%, each allocation (learned rates: against LWM's best allocation), same seeds.
    parts = []
    for rates, lwm_rates in (("uniform", "uniform"), ("global", "global"), ("learned", "global")):
        h, l = _paired(at99.get(("hydra", rates), {}), at99.get(("lwm", lwm_rates), {}))
        if h and l:
            parts.append(f"{_fig(f'HYDRA {rates}', h)} vs {_fig(f'LWM {lwm_rates}', l)}: "
                         f"{100 * (_mean(h) - _mean(l)):+.1f}")
        else:
            parts.append(f"HYDRA {rates} vs LWM {lwm_rates}: *not measured*")
    lines.append("- (1) HYDRA against LWM at 99% (reported as measured): " + "; ".join(parts) + ".")
    # 2. The best 99% model at least the 90% model, and above global LWM by more than the seeds' spread.
    at90 = _robust(rows, sparsity=0.9)
    lwm_g = at99.get(("lwm", "global"))
    best99 = max(at99, key=lambda k: _mean(at99[k])) if at99 else None
    p99, plwm = _paired(at99[best99], lwm_g) if best99 and lwm_g else ({}, {})  # margin: on the seeds both have
    if at90 and p99:
        best90 = max(at90, key=lambda k: _mean(at90[k]))
        b99, b90 = at99[best99], at90[best90]
        margin = _mean(p99) - _mean(plwm)
        ok = _mean(b99) >= _mean(b90) and (best99 != ("lwm", "global") and margin > max(_half(p99), _half(plwm)))
        lines.append(f"- (2) Best 99% model >= the 90% model and above global LWM by more than the spread: "
                     f"{_fig(f'{best99[0]} {best99[1]} 99%', b99)}; best 90% "
                     f"{_fig(f'{best90[0]} {best90[1]}', b90)}; over LWM global {100 * margin:+.1f} "
                     f"({len(p99)} seed{'s' if len(p99) != 1 else ''}): {verdict(ok, _seeds_note(b99, plwm))}.")
    else:
        lines.append("- (2) Best 99% model >= the 90% model, above global LWM: *not measured* (needs 90% and 99% rows "
                     "and LWM global at 99%).")
    # 3. Learned rates at 99% within 2 points of the 90% model on CNN-large; never below global rates.
    large99, large90 = _robust(rows, arch="cnn_large", sparsity=0.99), _robust(rows, arch="cnn_large", sparsity=0.9)
    if ("hydra", "learned") in large99 and large90:
        best90 = max(large90, key=lambda k: _mean(large90[k]))
        gap = _mean(large90[best90]) - _mean(large99[("hydra", "learned")])
        lines.append(f"- (3a) CNN-large, learned rates at 99% within 2 points of the 90% model: "
                     f"{_fig('learned 99%', large99[('hydra', 'learned')])}, "
                     f"{_fig(f'{best90[0]} {best90[1]} 90%', large90[best90])}, {100 * gap:.1f} points: "
                     f"{verdict(gap <= 0.02)}.")
    else:
        lines.append("- (3a) CNN-large, learned rates at 99% within 2 points of the 90% model: *not measured*.")
    pairs = []
    for arch in ("cnn_small", "cnn_large"):
        for s in (0.9, 0.95, 0.99):
            got = _robust(rows, arch=arch, sparsity=s)
            learned, fixed = _paired(got.get(("hydra", "learned"), {}), got.get(("hydra", "global"), {}))
            if learned:
                pairs.append((arch, s, learned, fixed))
    if pairs:
        below = [p for p in pairs if _mean(p[2]) < _mean(p[3])]
        lines.append("- (3b) Learned rates never below global rates (HYDRA): " + "; ".join(
            f"{a} {100 * s:g}% {100 * (_mean(l) - _mean(g)):+.1f}" for a, s, l, g in pairs) +
            # provisional while the 99% pairs lack seeds (the grid has one seed at 90 and 95%, by design)
            f": {verdict(not below, _seeds_note(*[g for p in pairs if p[1] == 0.99 for g in p[2:]] or [{}]))}.")
    else:
        lines.append("- (3b) Learned rates never below global rates: *not measured*.")
    # 4. HYDRA (any allocation) >= ADMM (any allocation) at every sparsity, on the seeds every allocation compared
    # has (the best of three-seed means against a one-seed figure would compare seeds, not methods).
    cmp, partial, few = [], [], []
    for s in (0.9, 0.95, 0.99):
        got = {k: v for k, v in _robust(rows, sparsity=s).items() if k[0] in ("hydra", "admm")}
        common = set.intersection(*(set(v) for v in got.values())) if got else set()
        h = [_mean({d: v[d] for d in common}) for (m, _), v in got.items() if m == "hydra"]
        a = [_mean({d: v[d] for d in common}) for (m, _), v in got.items() if m == "admm"]
        cmp.append((s, max(h) - max(a), len(common)) if h and a and common else (s, None, 0))
        # the best of each needs each allocation the grid plans for it
        partial += [f"{m} {r} {100 * s:g}%" for m, r in allocations(["hydra", "admm"], list(RATES))
                    if h and a and (m, r) not in got]
        few += [len(common)] if s == 0.99 and h and a and common and len(common) < SEEDS else []
    measured = [(s, d, n) for s, d, n in cmp if d is not None]
    missing = [f"{100 * s:g}%" for s, d, _ in cmp if d is None]
    notes = ([f"{', '.join(partial)} not measured"] if partial else []) + \
        [f"{n} of {SEEDS} seeds at 99%" for n in few]
    lines.append("- (4) HYDRA >= ADMM at every sparsity (best allocation of each, on the seeds all have): " +
                 ("; ".join(f"{100 * s:g}% {100 * d:+.1f}" + (f" ({n} seeds)" if n > 1 else "")
                            for s, d, n in measured) or "no pair") + ": " +
                 (f"*not measured* at {', '.join(missing)}" if missing else verdict(
                     all(d >= 0 for _, d, _ in measured),
                     f" (provisional: {'; '.join(notes)})" if notes else "")) + ".")
    # 5. Verified track: the 90%-sparse int8 model >= 70% verified with clean >= 78%.
    ver = [r for r in rows if r["experiment"] == "verified" and r["method"] == "hydra" and r["sparsity"] == 0.9
           and r["bits"] == 8 and r.get("verified_accuracy") is not None]
    if ver:
        best = max(ver, key=lambda r: (r["verified_accuracy"] >= 0.7 and r["clean_accuracy"] >= 0.78,
                                       r["verified_accuracy"]))
        lines.append(f"- (5) Verified track, 90% int8 >= 70% verified with clean >= 78%: {best.get('rates', 'uniform')} "
                     f"rates {100 * best['verified_accuracy']:.1f}% verified / {100 * best['clean_accuracy']:.1f}% "
                     f"clean: {verdict(best['verified_accuracy'] >= 0.7 and best['clean_accuracy'] >= 0.78)}.")
    else:
        lines.append("- (5) Verified track, 90% int8 >= 70% verified with clean >= 78%: *not measured*.")
    # 6. int8 costs < 0.5 points clean and robust, every model of the methods (not the ablations' variants).
    fp32 = {Results.key({**r, "bits": 0}): r for r in rows if r["bits"] == 32}
    costs = []
    for r in (r for r in rows if "-" not in r["method"]):
        f = fp32.get(Results.key({**r, "bits": 0}))
        if r["bits"] == 8 and f is not None:
            for field in ("clean_accuracy", "robust_accuracy"):
                costs.append((f[field] - r[field], field.split("_")[0], r))
    if costs:
        bad = [c for c in costs if c[0] >= 0.005]
        worst = max(costs, key=lambda c: c[0])
        lines.append(f"- (6) int8 costs < 0.5 points clean and robust: {len(costs) // 2} models, largest cost "
                     f"{100 * worst[0]:.1f} ({worst[1]}, {worst[2]['experiment']} {worst[2]['method']} "
                     f"{worst[2].get('rates', 'uniform')} {100 * worst[2]['sparsity']:g}%): {verdict(not bad)}" +
                     (f" ({len(bad)} of {len(costs)} figures at 0.5 or more: " + ", ".join(sorted({
                         f"{c[2]['experiment']} {c[2]['method']} {c[2].get('rates', 'uniform')} "
                         f"{100 * c[2]['sparsity']:g}% seed {c[2]['seed']}" for c in bad})) + ")" if bad else "") + ".")
    else:
        lines.append("- (6) int8 costs < 0.5 points: *not measured*.")
    # 7. A benign network's 90% HYDRA sub-network >= +30 points robust over the benign network.
    benign = _robust(rows, experiment="benign")
    sub = _robust(rows, experiment="benign", sparsity=0.9)
    if ("dense", "uniform") in benign and ("hydra", "uniform") in sub:
        gain = _mean(sub[("hydra", "uniform")]) - _mean(benign[("dense", "uniform")])
        lines.append(f"- (7) Benign network's 90% HYDRA sub-network >= +30 points robust: "
                     f"{_fig('sub-network', sub[('hydra', 'uniform')])} over "
                     f"{_fig('benign dense', benign[('dense', 'uniform')])}: {100 * gain:+.1f}: "
                     f"{verdict(gain >= 0.30)}.")
    else:
        lines.append("- (7) Benign network's 90% HYDRA sub-network >= +30 points robust: *not measured*.")
    return lines


def render_attack_gap(rows: list[dict]) -> str:
    """How far PGD alone (the card's attack, ``attack_steps`` x ``restarts``) overstates the AutoAttack-equivalent
    robust accuracy, per method over the adversarially trained fp32 models: the examples PGD's cross-entropy steps
    miss and the AutoAttack-equivalent attacks (APGD's adaptive steps, APGD-T's targeted losses, Square's queries)
    break."""
    gaps: dict[str, list[tuple[float, dict]]] = {}
    for r in rows:
        if r["experiment"] == "adversarial" and r["bits"] == 32 and "-" not in r["method"] and \
                r.get("pgd_robust_accuracy") is not None:
            gaps.setdefault(r["method"], []).append((r["pgd_robust_accuracy"] - r["robust_accuracy"], r))
    if not gaps:
        return ""
    worst, at = max((g for v in gaps.values() for g in v), key=lambda g: g[0])
    return ("PGD alone against the AutoAttack-equivalent attacks (adversarial rows, fp32): PGD's robust accuracy is "
            "higher by " + "; ".join(f"{100 * sum(g for g, _ in v) / len(v):.1f} points on average for {m} "
                                     f"({len(v)} model{'s' if len(v) != 1 else ''}, at most {100 * max(g for g, _ in v):.1f})"
                                     for m, v in sorted(gaps.items())) +
            f". The largest gap, {100 * worst:.1f} points, is {at['method']} {at.get('rates', 'uniform')} "
            f"{100 * at['sparsity']:g}% seed {at['seed']} ({at['arch']}).")


def render_block(rows: list[dict], goals: bool = True) -> str:
    """The table; with ``goals`` (the full grid's file) the goals judged from the rows and the PGD gap after it."""
    if not goals:
        return render_table(rows)
    gap = render_attack_gap(rows)
    return render_table(rows) + "\n\n" + "\n".join(render_goals(rows)) + ("\n\n" + gap if gap else "")


def readme_marks(name: str) -> tuple[str, str]:
    """The markers of results file ``name``'s generated block in a README (``fashion_full`` -> ``fashion-full``)."""
    block = name.replace("_", "-")
    return (f"<!-- generated:{block} by `benchmarks/fashion.py --table FILE --readme README`; do not edit -->",
            f"<!-- /generated:{block} -->")


def readme_with_table(readme: str, rows: list[dict], name: str = "fashion_full", goals: bool = True) -> str:
    """``readme`` with results file ``name``'s block replaced by :func:`render_table` (and the goals, judged
    from the rows, after it)."""
    from stages.figures import replace_block

    return replace_block(readme, readme_marks(name), render_block(rows, goals))


def draw(rows: list[dict], path: Path) -> None:
    """Robust accuracy (AutoAttack-equivalent) against sparsity, one line per (arch, method, rates) of the
    adversarial experiment's 32-bit rows; the seeds' range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, dict[float, list[float]]] = {}
    for (exp, arch, method, rates, sparsity, bits), g in _groups(rows).items():
        if exp == "adversarial" and bits == 32 and "-" not in method:  # variants (hydra-adam): the table only
            lines.setdefault((arch, method, rates), {})[sparsity] = [r["robust_accuracy"] for r in g]
    dense = {arch: pts[0.0] for (arch, method, _), pts in lines.items() if method == "dense" and 0.0 in pts}
    ticks = sorted({x for pts in lines.values() for x in pts} | ({0.0} if dense else set()))
    at = {x: i for i, x in enumerate(ticks)}  # evenly spaced: 90, 95 and 99% apart
    for (arch, method, rates), pts in sorted(lines.items()):
        if method == "dense":
            continue
        if arch in dense:
            pts = {0.0: dense[arch], **pts}
        xs = sorted(pts)
        means = [100 * sum(pts[x]) / len(pts[x]) for x in xs]
        err = [[100 * (sum(pts[x]) / len(pts[x]) - min(pts[x])) for x in xs],
               [100 * (max(pts[x]) - sum(pts[x]) / len(pts[x])) for x in xs]]
        ax.errorbar([at[x] for x in xs], means, yerr=err, marker="o", capsize=3, label=f"{arch} {method} {rates}")
    ax.set_xticks(range(len(ticks)), [f"{100 * x:g}%" for x in ticks])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("robust accuracy, AutoAttack-equivalent (%)")
    ax.set_title(f"Fashion-MNIST, eps {EPS} (L-inf), adversarial training\nerror bars: the seeds' range",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app()
