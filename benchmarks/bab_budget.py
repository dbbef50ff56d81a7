"""What branch and bound's domain budget buys in the audit: undecided examples against seconds (issue 12).

    .venv/bin/python benchmarks/bab_budget.py [--domains 50,100,200,400] [--n 500] [--work /tmp/aa]

The Fashion-MNIST CNN-small of the AutoAttack benchmark (``audit_speed.fashion_model``: PGD-trained here, 3
epochs, cached in ``--work``), exported to ONNX and audited by ``pipeline.audit.run.run_audit`` on the first ``--n``
test images at eps 0.1 (L-inf) with APGD-CE and APGD-T as its attacks (the card's PGD and Square off: this measures
the verifier's side), CROWN, alpha-CROWN, then branch and bound with each ``audit.bab_domains`` of ``--domains``
and the audit's other defaults (its shortfall gate, 30 s cap). One thread. Rows: the budget, the examples left to branch
and bound (what APGD and alpha-CROWN did not decide; its gate searches only those within reach), those it proved
and those it left, the audit's undecided count, branch and bound's seconds and the audit's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit_speed import fashion_model  # noqa: E402

from pipeline.audit.run import run_audit  # noqa: E402
from pipeline.config import AuditParams  # noqa: E402
from pipeline.onnx_io import export_onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", default="50,100,200,400")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/aa"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    model, x, y = fashion_model(args.work, 3, 1)
    path = args.work / "fashion_cnn_small.onnx"
    if not path.exists():
        export_onnx(model, path, (1, 28, 28))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{args.n} Fashion-MNIST test images, eps 0.1, 1 thread, {when}")
    print("| domains per example | left to it | proved | still undecided | audit undecided | branch and bound s "
          "| audit s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for domains in (int(d) for d in args.domains.split(",")):
        params = AuditParams(eps=0.1, threads=1, n_examples=None, attacks=["apgd-ce", "apgd-t"],
                             bab_domains=domains)
        rep = run_audit(path, x[:args.n], y[:args.n], params, progress=False)
        bab = rep.bab
        print(f"| {domains} | {bab.attacked if bab else 0} | {bab.verified if bab else 0} "
              f"| {bab.undecided if bab else 0} "
              f"| {rep.decided.undecided} | {(rep.seconds.bab or 0.0):.1f} | {rep.seconds.total:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
