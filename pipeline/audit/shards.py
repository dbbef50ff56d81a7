"""One audit across machines (issue 26): ``--shard K/N`` audits examples K, K+N, ... and writes a *part*;
:func:`merge_parts` turns the N parts into exactly the report one process writes.

Why a merge can be exact: every example's verdict depends on that example alone (its random streams are seeded by
its index in the whole set, :mod:`pipeline.attacks.steps`; its bounds by its own box), and every figure of the
report is a count over the examples divided by ``n`` (``int(mask.sum()) / n``), a sum (attacked, broken, rejected,
row-steps) or a fact of the inputs alone. A shard loads the model and runs it on *every* example (the clean pass,
the parity check and the verifiers' sizing are the whole set's, so each shard takes the same decisions), then
audits only its own: the others count as neither verified nor robust, so each of its figures is its own count over
the whole ``n``. The merge reads each count back (``round(f * n)``, exact below 2**52), sums and divides once,
which is the one-process float bit for bit; the records are concatenated by index.

Under torchrun (``RANK``, ``WORLD_SIZE`` in the environment) ``hydra-pipe audit MODEL`` shards by rank on its own:
every rank audits its shard, the parts go to rank 0 over torch.distributed (gloo: no shared file system needed),
and rank 0 merges and writes the report.

Not sharded (one line if asked): the logit bounds file and randomized smoothing (its draws are one stream over all
examples). Wall times (``seconds``) are summed over the parts: machine time, not the wall time of the slowest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audit.records import ExampleRecord
from pipeline.audit.report import AuditReport, intervals
from pipeline.errors import HydraPipeError
from pipeline.reporting import atomic_write_bytes

PART_FORMAT = "hydra-pipe audit part"
PART_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the examples ``index``, ``index + count``, ... of the audited set."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """``"K/N"`` (0 <= K < N); one line otherwise."""
        k, sep, n = spec.partition("/")
        try:
            shard = cls(int(k), int(n)) if sep else None
        except ValueError:
            shard = None
        if shard is None or not 0 <= shard.index < shard.count:
            raise HydraPipeError(f"--shard: {spec!r}: expected K/N with 0 <= K < N, e.g. 0/4 (examples 0, 4, 8, ...)")
        return shard

    @classmethod
    def from_torchrun(cls) -> Shard | None:
        """This process's shard under torchrun (``RANK`` of ``WORLD_SIZE`` > 1), else None."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise HydraPipeError(f"torchrun: RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                                 "expected integers") from None
        return cls(rank, world) if world > 1 else None

    def mask(self, n: int) -> np.ndarray:
        """bool [n]: the examples of this shard."""
        out = np.zeros(n, dtype=bool)
        out[self.index::self.count] = True
        return out

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_journal(journal: Path | None, shard: Shard | None) -> Path | None:
    """A shard's own journal folder inside ``journal`` (``shard-K-of-N``): shards that share a folder (torchrun's
    ranks on one node, array tasks given one ``--journal``) each resume from, and once done empty, their own."""
    if journal is None or shard is None:
        return journal
    return Path(journal) / f"shard-{shard.index}-of-{shard.count}"


@dataclass(frozen=True)
class Part:
    """One shard's audit: its report (figures as counts over the whole ``n``), its examples' records."""

    source: str  # where it was read from, for messages
    shard: Shard
    key: str  # the inputs' hash (model bytes, data, audit params): parts of one audit share it
    report: AuditReport
    records: list[ExampleRecord]

    def dump(self) -> dict:
        return {"format": PART_FORMAT, "version": PART_VERSION, "shard": [self.shard.index, self.shard.count],
                "key": self.key, "report": self.report.model_dump(mode="json"),
                "examples": [r.as_json() for r in self.records]}


def write_part(path: Path, part: Part) -> Path:
    """Write ``part`` (whole or not at all)."""
    atomic_write_bytes(Path(path), (json.dumps(part.dump()) + "\n").encode())
    return Path(path)


def load_part(body: dict, source: str) -> Part:
    """A part from its JSON body; a foreign or damaged file is one line naming ``source``."""
    from pydantic import ValidationError

    if not isinstance(body, dict) or body.get("format") != PART_FORMAT:
        raise HydraPipeError(f"{source}: not an audit part (written by hydra-pipe audit --shard K/N)")
    if body.get("version") != PART_VERSION:
        raise HydraPipeError(f"{source}: audit part version {body.get('version')!r}, this hydra-pipe reads "
                             f"{PART_VERSION}: rerun the shard with this version")
    try:
        k, n = body["shard"]
        records = [ExampleRecord(**r) for r in body["examples"]]
        return Part(source, Shard(int(k), int(n)), str(body["key"]), AuditReport.model_validate(body["report"]),
                    records)
    except ValidationError as e:
        err = e.errors()[0]
        raise HydraPipeError(f"{source}: damaged audit part (report.{'.'.join(map(str, err['loc']))}: "
                             f"{err['msg']})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise HydraPipeError(f"{source}: damaged audit part ({type(e).__name__}: {e})") from None


def read_part(path: Path) -> Part:
    """The part written at ``path`` (one line if it is missing, unreadable or foreign)."""
    try:
        body = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise HydraPipeError(f"{path}: audit part not found") from None
    except (OSError, ValueError) as e:
        raise HydraPipeError(f"{path}: not a readable audit part ({type(e).__name__})") from None
    return load_part(body, str(path))


# the report's fields that are counts over the n examples (fractions), sums, or facts every part shares
_FRACTIONS = ("clean_accuracy", "ibp_verified_accuracy", "crown_verified_accuracy", "alpha_crown_verified_accuracy",
              "bab_verified_accuracy", "verified_accuracy", "pgd_robust_accuracy", "robust_accuracy")
_SUMS = ("rejected_candidates", "rejected_examples")
_MERGED = {*_FRACTIONS, *_SUMS, "attack_work", "robust_accuracy_by_restart", "robust_accuracy_by_step", "attacks",
           "bab", "decided", "settled", "square", "eps_sweep", "confidence_intervals", "seconds", "model"}


def _count(f: float | None, n: int, source: str) -> int | None:
    """The count behind a fraction ``f`` of ``n`` (``int / n`` in float64 reads back exactly)."""
    if f is None:
        return None
    k = round(f * n)
    if abs(k - f * n) > 1e-6:
        raise HydraPipeError(f"{source}: a figure ({f!r}) is not a count of {n} examples: not an audit part")
    return k


def _total(values: list, n: int, sources: list[str]) -> float | None:
    """The merged fraction: the parts' counts summed, over ``n``; None when the part did not run."""
    if values[0] is None:
        return None
    return sum(_count(v, n, s) for v, s in zip(values, sources)) / n


def _sum_models(models: list, fields: tuple[str, ...]):
    """The first of ``models`` (pydantic) with ``fields`` summed over all; None when the part did not run."""
    if models[0] is None:
        return None
    return models[0].model_copy(update={f: sum(getattr(m, f) for m in models) for f in fields})


def merge_parts(parts: list[Part]) -> AuditReport:
    """The report (records attached) that one process auditing every example writes, from the N parts of one
    audit (any order); one line when they are not exactly shards 0..N-1 of the same model, data and settings.
    ``seconds``: each part's summed (machine time)."""
    if not parts:
        raise HydraPipeError("audit merge: no parts given")
    first = parts[0]
    for p in parts[1:]:
        if p.key != first.key:
            raise HydraPipeError(f"audit merge: {p.source} and {first.source} are parts of different audits (model, "
                                 "data or settings differ)")
        if p.shard.count != first.shard.count:
            raise HydraPipeError(f"audit merge: {p.source} is a shard of {p.shard.count}, {first.source} of "
                                 f"{first.shard.count}")
    count = first.shard.count
    seen: dict[int, str] = {}
    for p in parts:
        if p.shard.index in seen:
            raise HydraPipeError(f"audit merge: {p.source} and {seen[p.shard.index]} are both shard "
                                 f"{p.shard.index}/{count}")
        seen[p.shard.index] = p.source
    missing = [str(k) for k in range(count) if k not in seen]
    if missing:
        raise HydraPipeError(f"audit merge: shard(s) {', '.join(missing)} of {count} missing; give every part")
    parts = sorted(parts, key=lambda p: p.shard.index)
    reports, sources = [p.report for p in parts], [p.source for p in parts]
    n = first.report.n
    facts = [{k: v for k, v in r.model_dump(mode="json").items() if k not in _MERGED} for r in reports]
    for r, f, s in zip(reports, facts, sources):
        if f != facts[0]:
            diff = sorted(k for k in f if f[k] != facts[0].get(k))
            raise HydraPipeError(f"audit merge: {s} disagrees with {sources[0]} on {', '.join(diff)} (parts run with "
                                 "other code or numerics?)")
    records = sorted((r for p in parts for r in p.records), key=lambda r: r.index)
    indices = [r.index for r in records]
    if indices != list(range(n)):
        raise HydraPipeError(f"audit merge: the parts hold {len(indices)} example records for {n} examples "
                             "(a damaged or hand-edited part?)")

    def each(name: str) -> list:
        return [getattr(r, name) for r in reports]

    update: dict = {k: _total(each(k), n, sources) for k in _FRACTIONS}
    update |= {k: None if each(k)[0] is None else sum(each(k)) for k in _SUMS}
    base = reports[0]
    if base.attack_work is not None:
        plain = max(n * base.restarts * base.steps, 1)
        update["attack_work"] = sum(_count(w, plain, s) for w, s in zip(each("attack_work"), sources)) / plain
    update["robust_accuracy_by_restart"] = [_total(list(v), n, sources)
                                            for v in zip(*each("robust_accuracy_by_restart"))]
    update["robust_accuracy_by_step"] = {k: _total([r.robust_accuracy_by_step[k] for r in reports], n, sources)
                                         for k in base.robust_accuracy_by_step}
    update["attacks"] = [_sum_models(list(a), ("attacked", "broken", "rejected_candidates", "near_boundary_checked"))
                         for a in zip(*each("attacks"))]
    update["bab"] = _sum_models(each("bab"), ("attacked", "verified", "undecided", "skipped", "timed_out"))
    update["decided"] = _sum_models(each("decided"), ("verified", "broken", "undecided", "timeout", "error"))
    update["settled"] = _sum_models(each("settled"), ("verification", "earlier_attacks", "clean_wrong", "broken",
                                                      "convergence", "full_budget"))
    square = _sum_models(each("square"), ("attacked", "broken_beyond_pgd", "rejected_candidates"))
    if square is not None:
        square = square.model_copy(update={"gradient_masking_suspected": square.broken_beyond_pgd > 0})
    update["square"] = square
    update["eps_sweep"] = [pts[0].model_copy(update={
        k: _total([getattr(p, k) for p in pts], n, sources)
        for k in ("clean", "pgd_robust", "ibp_verified", "crown_verified", "alpha_crown_verified")})
        for pts in zip(*each("eps_sweep"))]
    update["seconds"] = base.seconds.model_copy(update={
        k: None if all(v is None for v in vals) else round(sum(v or 0.0 for v in vals), 3)
        for k, vals in ((k, [getattr(r.seconds, k) for r in reports]) for k in type(base.seconds).model_fields)})
    merged = base.model_copy(update=update)
    merged = merged.model_copy(update={"confidence_intervals": intervals(merged)})
    merged = AuditReport.model_validate(merged.model_dump())  # checked as a whole, as a read report is
    merged.attach(records)
    return merged


def gather_parts(part: Part) -> list[Part] | None:
    """Under torchrun: every rank's part, on rank 0 (None on the others), over torch.distributed (gloo, any
    number of nodes, no shared file system). Rank 0 waits for the slowest shard."""
    from datetime import timedelta

    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:  # a day: a shard of a large audit may finish hours after another
        dist.init_process_group("gloo", timeout=timedelta(days=1))
    try:
        rank = dist.get_rank()
        gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(part.dump(), gathered, dst=0)
    finally:
        if own:
            dist.destroy_process_group()
    if gathered is None:
        return None
    return [load_part(body, f"rank {i}") for i, body in enumerate(gathered)]
