"""The audit sharded across worker processes (issue 14): wall time of ``hydra-pipe audit --workers N`` for each N,
back to back in one script, and whether each report (but ``seconds``) and bounds file equal the first one's.

    .venv/bin/python benchmarks/audit_shards.py                       # quantized digits model, all 450, 1000 x 100
    .venv/bin/python benchmarks/audit_shards.py --workers 1,2 --extra=--sweep-eps=0.05,0.1,0.2
    .venv/bin/python benchmarks/audit_shards.py --shards 2 --results benchmarks/results/audit_shards_merge.json

Writes ``benchmarks/results/audit_shards.json``: per run its wall time, the load average before it, and the CPU
seconds other processes used while it ran (``/proc/stat`` busy time less this run's own), so a contended run shows.
``--repeat R`` alternates the worker counts R times; the ratio is taken between the medians. ``--shards N``
(issue 26): N ``--shard K/N`` processes side by side, then ``hydra-pipe audit merge``, against one process, all on
one thread; whether the merged report equals the one-process report (but ``seconds``) and every verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from stages.cli import app; app()"]


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have been busy (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _audit(args: argparse.Namespace, workers: int, out: Path) -> float:
    cmd = [*CLI, "audit", args.model, "--data", args.data, "--eps", str(args.eps), "--steps", str(args.steps),
           "--restarts", str(args.restarts), "--workers", str(workers), "--out", str(out / f"w{workers}.json"),
           "--bounds-out", str(out / f"w{workers}.npz"), *args.extra]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HYDRA_PIPE_QUIET": "1"}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _same(out: Path, a: int, b: int) -> bool:
    ra, rb = (json.loads((out / f"w{w}.json").read_text()) for w in (a, b))
    ra.pop("seconds"), rb.pop("seconds")
    with np.load(out / f"w{a}.npz") as fa, np.load(out / f"w{b}.npz") as fb:
        bounds = fa.files == fb.files and all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    return ra == rb and bounds


def _shards(args: argparse.Namespace, count: int, out: Path) -> dict:
    """One process against ``count`` ``--shard K/N`` processes side by side and their merge, every process on one
    thread (the same numerics, so the merged report must equal the one-process report but ``seconds``); and, for
    context, one process on every core (the machine's default threads)."""
    base = [*CLI, "audit", args.model, "--data", args.data, "--eps", str(args.eps), "--steps", str(args.steps),
            "--restarts", str(args.restarts), *args.extra]
    one_thread = {**os.environ, "HYDRA_PIPE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    row: dict = {"shards": count, "load_before": round(os.getloadavg()[0], 2)}
    busy, ours = _busy_seconds(), _children_seconds()
    t = time.perf_counter()
    subprocess.run([*base, "--out", str(out / "one.json")], cwd=ROOT, check=True, env=one_thread,
                   stdout=subprocess.DEVNULL)
    row["one_process_1_thread_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    procs = [subprocess.Popen([*base, "--shard", f"{k}/{count}", "--out", str(out / f"part{k}.json")], cwd=ROOT,
                              env=one_thread, stdout=subprocess.DEVNULL) for k in range(count)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a shard failed")
    row["shards_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    subprocess.run([*CLI, "audit", "merge", *(str(out / f"part{k}.json") for k in range(count)), "--out",
                    str(out / "merged.json")], cwd=ROOT, check=True, env=one_thread, stdout=subprocess.DEVNULL)
    row["merge_s"] = round(time.perf_counter() - t, 2)
    row["shards_and_merge_s"] = round(row["shards_s"] + row["merge_s"], 2)
    row["ratio"] = round(row["shards_and_merge_s"] / row["one_process_1_thread_s"], 3)
    one, merged = (json.loads((out / f).read_text()) for f in ("one.json", "merged.json"))
    seconds = one.pop("seconds"), merged.pop("seconds")
    verdicts = [[ln.split(",")[:4] for ln in (out / f).read_text().splitlines()]
                for f in ("one.examples.csv", "merged.examples.csv")]
    row["report_equal"], row["verdicts_equal"] = one == merged, verdicts[0] == verdicts[1]
    row["others_cpu_s"] = round(max((_busy_seconds() - busy) - (_children_seconds() - ours), 0.0), 1)
    t = time.perf_counter()
    subprocess.run([*base, "--out", str(out / "all_cores.json")], cwd=ROOT, check=True,
                   env={**os.environ, "HYDRA_PIPE_QUIET": "1"}, stdout=subprocess.DEVNULL)
    row["one_process_all_cores_s"] = round(time.perf_counter() - t, 2)
    row["n"], row["seconds_one"], row["decided"] = one["n"], seconds[0], one["decided"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/quantized.onnx")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--restarts", type=int, default=100)
    ap.add_argument("--workers", default="1,2", help="worker counts to time, the first one the reference")
    ap.add_argument("--extra", action="append", default=[], help="more audit options, e.g. --extra=--no-crown")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the worker counts this many times")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "audit_shards.json")
    ap.add_argument("--shards", type=int, default=0,
                    help="time N --shard K/N processes side by side and their merge against one process instead")
    args = ap.parse_args()
    if args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            row = _shards(args, args.shards, Path(tmp))
        row["command"] = " ".join(["hydra-pipe audit", args.model, "--data", args.data, "--eps", str(args.eps),
                                   "--steps", str(args.steps), "--restarts", str(args.restarts), *args.extra])
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row, indent=2))
        return
    counts = [int(w) for w in args.workers.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        load_before = os.getloadavg()
        for _ in range(args.repeat):
            for w in counts:
                load, busy, ours = os.getloadavg()[0], _busy_seconds(), _children_seconds()
                seconds = _audit(args, w, out)
                others = (_busy_seconds() - busy) - (_children_seconds() - ours)
                report = json.loads((out / f"w{w}.json").read_text())
                runs.append({"workers": w, "wall_s": round(seconds, 2), "pgd_s": report["seconds"].get("pgd"),
                             "same_as_first": _same(out, counts[0], w), "load_before": round(load, 2),
                             "others_cpu_s": round(max(others, 0.0), 1)})
                print(f"workers {w}: {seconds:7.1f} s wall (pgd part {report['seconds'].get('pgd')} s; load "
                      f"{load:.2f} before, other processes used {others:.1f} CPU s meanwhile), report and bounds "
                      f"equal to workers {counts[0]}'s: {runs[-1]['same_as_first']}", flush=True)
        first = json.loads((out / f"w{counts[0]}.json").read_text())
    median = {w: float(np.median([r["wall_s"] for r in runs if r["workers"] == w])) for w in counts}
    ratios = {str(w): round(median[w] / median[counts[0]], 3) for w in counts}
    summary = {"command": " ".join(["hydra-pipe audit", args.model, "--data", args.data, "--eps", str(args.eps),
                                    "--steps", str(args.steps), "--restarts", str(args.restarts), *args.extra]),
               "n": first["n"], "cpus": os.cpu_count(), "load_before": [round(v, 2) for v in load_before],
               "load_after": [round(v, 2) for v in os.getloadavg()], "runs": runs,
               "median_wall_s": median, "ratio_of_medians": ratios,
               "seconds_of_first": first["seconds"], "settled": first["settled"]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
