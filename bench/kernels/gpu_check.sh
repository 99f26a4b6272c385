#!/usr/bin/env bash
# The first command to run on a GPU (one H100 or H200, about 9 minutes; one device command):
#
#   bash bench/kernels/gpu_check.sh OUTDIR                  # every stage below; logs and results under OUTDIR
#   bash bench/kernels/gpu_check.sh --only parity,tests OUTDIR  # some stages (a rerun within the device budget)
#   bash bench/kernels/gpu_check.sh --dry-run OUTDIR        # any machine: the plan, the validation order,
#                                                           # the configurations and the predictions
#
# 1. parity    first, the kernels no CPU can run: each candidate the dispatcher could pick at the target
#              shapes (persistent kernels, the CUDA-graphed step loop) against the per-step path and the
#              float64 truth (outputs, states, every gradient), then timed; ByteLM.generate's graphed step
#              against its eager step. Verdicts -> OUTDIR/parity.json and the verdict cache the later
#              stages use (XDG_CACHE_HOME=OUTDIR/cache)
# 2. tests     the GPU test suite at real sizes: Triton and the CUDA extension (built here) against
#              the reference and the float64 truth, the dispatcher, the graphs, the persistent schedules
# 3. ceilings  HBM copy and L2 read bandwidth, the host cost of a Triton launch; the cost model again
#              with those numbers in place of its table's
# 4. sweep     a correctness-gated sweep over the launch configurations at the target shapes; the best
#              plan per shape goes to fastmlstm/ops/triton/tuned.py (read by the dispatcher) and OUTDIR
# 5. bench     bench/run.py --preset gpu-targets (fastmlstm as dispatched, cuDNN, the eager loop), each
#              measurement printed with the cost model's prediction beside it
#
# Each stage has its own time limit and the script goes on after a failed stage (the exit status
# is that of the first failure). OUTDIR gets run.json (device, driver, versions, commit, date, each
# stage's exit status and seconds), log.txt (everything), one log per stage, parity.json,
# ceilings.json, sweep.json, tuned.py (copy it over fastmlstm/ops/triton/tuned.py and commit it),
# gpu-targets.json/.md, and gpu_check.tar.gz holding all of them (one file to bring back).
# Where the tree travels without .git, FASTMLSTM_COMMIT=<commit> names the commit in the results.
set -uo pipefail

STAGE_NAMES="parity tests ceilings sweep bench"
usage() { echo "usage: bash bench/kernels/gpu_check.sh [--dry-run] [--only STAGE,...] OUTDIR (stages: ${STAGE_NAMES// /, })" >&2; exit 2; }
DRY=0
OUT=""
ONLY="$STAGE_NAMES"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only)
            [ $# -ge 2 ] || usage
            ONLY="${2//,/ }"
            for s in $ONLY; do case " $STAGE_NAMES " in *" $s "*) ;; *) usage ;; esac; done
            shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

cd "$(dirname "$0")/../.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# Stage limits in seconds: 550 in all, inside one 10-minute device command.
LIMIT_PARITY=120
LIMIT_TESTS=170
LIMIT_CEILINGS=25
LIMIT_SWEEP=100
LIMIT_BENCH=135

if [ "$DRY" = 1 ]; then
    {
        echo "== dry run: nothing is executed; on a GPU each stage runs under its time limit (s):"
        echo "   parity ${LIMIT_PARITY}, tests ${LIMIT_TESTS}, ceilings ${LIMIT_CEILINGS}, sweep ${LIMIT_SWEEP}, bench ${LIMIT_BENCH}; outputs in $OUT"
        echo "   stages to run, in this order: $ONLY"
        python bench/kernels/gpu_check.py plan
    } 2>&1 | tee "$OUT/plan.txt"
    exit "${PIPESTATUS[0]}"
fi

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA GPU here; use --dry-run to see the plan" >&2
    exit 1
fi

# Verdicts of the kernels no CPU can run: made by the parity stage, read by every later one.
export XDG_CACHE_HOME="$OUT/cache"
STATUS=0
STAGES_RUN=""
stage() {  # stage NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    echo "== [$(date -u +%H:%M:%S)] $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" >>"$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
    STAGES_RUN="$STAGES_RUN $name=$rc:$((SECONDS - start))"
    if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee -a "$OUT/log.txt"

if wanted parity; then rm -rf "$XDG_CACHE_HOME/fastmlstm/kernels"; fi  # check afresh, never from an old run
stage parity "$LIMIT_PARITY" python bench/kernels/gpu_check.py parity --out "$OUT"
# Left out to fit the device budget: the dispatch-space parity (tests/bench/test_sweep.py; the sweep's
# gate checks every candidate at the target shapes; CI runs the space under the interpreter) and
# test_recurrence's H = 4096 float64 truth, computed on the CPU (test_cuda_extension checks H = 4096
# against a float64 truth computed on the GPU, Triton included).
stage tests "$LIMIT_TESTS" python -m pytest -q -x -p no:cacheprovider tests/ops/test_recurrence.py tests/ops/test_cuda.py \
    tests/ops/test_triton_configs.py tests/ops/test_dispatch.py tests/ops/test_graphs.py tests/ops/test_persistent_*.py \
    tests/nn/test_modules.py -k "not (float64_truth and H4096)"
stage ceilings "$LIMIT_CEILINGS" python bench/kernels/gpu_check.py ceilings --out "$OUT"
stage sweep "$LIMIT_SWEEP" python bench/kernels/gpu_check.py sweep --out "$OUT"
stage bench "$LIMIT_BENCH" python bench/run.py --preset gpu-targets \
    --impls fastmlstm-triton,fastmlstm-cuda,cudnn-lstm,mlstm-eager --warmup-ms 30 --rep-ms 150 --min-runs 5 \
    --no-plots --out "$OUT" --name gpu-targets

python - "$OUT" "$STATUS" $STAGES_RUN <<'PY' || true
import json, sys
sys.path.insert(0, "bench/kernels")
import gpu_check
out, status, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
stages = {r.split("=")[0]: {"exit": int(r.split("=")[1].split(":")[0]), "seconds": int(r.split(":")[1])} for r in runs}
json.dump({**gpu_check.provenance(), "exit": status, "stages": stages}, open(f"{out}/run.json", "w"), indent=1)
PY
tar czf "$OUT/gpu_check.tar.gz.part" -C "$OUT" --exclude=gpu_check.tar.gz --exclude=gpu_check.tar.gz.part . \
    && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
echo "== done in ${SECONDS} s, exit ${STATUS}; results in $OUT" | tee -a "$OUT/log.txt"
exit "$STATUS"
