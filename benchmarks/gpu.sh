#!/usr/bin/env bash
# GPU readiness (issue 26, item 4): in under 8 minutes on a CUDA machine, the audit against AutoAttack on
# torchvision ResNet-18 at 32x32 and one DDP training epoch of the project's pretrain stage under torchrun; one
# JSON row appended to benchmarks/results/gpu.json, then a short table. What each part measures: benchmarks/gpu.py.
#
#     benchmarks/gpu.sh               # CUDA only: without a CUDA device, one line and exit code 2
#     benchmarks/gpu.sh --cpu-smoke   # (or HYDRA_GPU_SMOKE=1) a tiny version on the CPU, well under a minute;
#                                     # its row goes to the scratch folder, not to benchmarks/results/gpu.json
#     benchmarks/gpu.sh --table       # the table of benchmarks/results/gpu.json
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_N (test images, 50), GPU_AUDIT_LIMIT_S (300),
# GPU_DDP_LIMIT_S (120), GPU_OUT (the results file), GPU_WORK (scratch folder, default a new one under /tmp).
# Each part runs under `timeout`; a part stopped by its limit keeps what it finished and the row says so.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=${HYDRA_GPU_SMOKE:-0}
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) smoke=1 ;;
        --table) exec "${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}" \
                      benchmarks/gpu.py table "${GPU_OUT:-benchmarks/results/gpu.json}" ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $arg (--cpu-smoke, --table)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HYDRA_GPU_SMOKE=$smoke
[ "$smoke" = 1 ] && export CUDA_VISIBLE_DEVICES=""  # the smoke run is the CPU's, on a CUDA machine too

start=$(date +%s)
"$PY" benchmarks/gpu.py check || exit $?

work=${GPU_WORK:-$(mktemp -d /tmp/hydra-gpu.XXXXXX)}
mkdir -p "$work"
if [ "$smoke" = 1 ]; then
    # eps 0.25: a ResNet trained for one SGD step is robust at 2/255, and AutoAttack's fixed budget on a robust
    # example takes minutes on the CPU; at 0.25 its APGD-CE breaks them and the rest is skipped
    n=${GPU_N:-4}; train_n=64; threads=1; eps=0.25
    audit_limit=${GPU_AUDIT_LIMIT_S:-90}; ddp_limit=${GPU_DDP_LIMIT_S:-90}  # 20-35 s each measured on the shared 2 cores
    out=${GPU_OUT:-$work/gpu_smoke.json}
else
    n=${GPU_N:-50}; train_n=5000; threads=$(( $(nproc) < 8 ? $(nproc) : 8 )); eps=0.00784313725490196  # 2/255
    audit_limit=${GPU_AUDIT_LIMIT_S:-300}; ddp_limit=${GPU_DDP_LIMIT_S:-120}
    out=${GPU_OUT:-benchmarks/results/gpu.json}
fi

run_part() {  # name limit command...: the part under `timeout` (SIGTERM, SIGKILL 10 s later), its log kept
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "gpu.sh: $name (limit ${limit} s, log $work/$name.log)" >&2
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "gpu.sh: $name exited with code $rc$( [ "$rc" -ge 124 ] && echo ' (time limit)' ) after" \
             "$(( $(date +%s) - t0 )) s; its log ends:" >&2
        tail -n 12 "$work/$name.log" | sed 's/^/    /' >&2
    else
        echo "gpu.sh: $name done in $(( $(date +%s) - t0 )) s" >&2
    fi
    return "$rc"
}

run_part audit "$audit_limit" "$PY" benchmarks/gpu.py audit --n "$n" --train-n "$train_n" --eps "$eps" \
    --threads "$threads" --work "$work/audit" --out "$work/audit.json"
audit_rc=$?
# the DDP part stops torchrun itself 15 s before its limit, so it can still write what happened
run_part ddp "$ddp_limit" "$PY" benchmarks/gpu.py ddp --limit "$(( ddp_limit - 15 ))" --work "$work/ddp" \
    --out "$work/ddp.json"
ddp_rc=$?

echo >&2
"$PY" benchmarks/gpu.py collect --audit "$work/audit.json" --ddp "$work/ddp.json" --audit-rc "$audit_rc" \
    --ddp-rc "$ddp_rc" --audit-limit "$audit_limit" --ddp-limit "$ddp_limit" \
    --total "$(( $(date +%s) - start ))" --out "$out" || exit $?
echo "gpu.sh: $(( $(date +%s) - start )) s in all; logs and part files in $work" >&2
[ "$audit_rc" -eq 0 ] && [ "$ddp_rc" -eq 0 ]
