#!/usr/bin/env bash
# The GPU checks and benchmark rows behind docs/benchmarks.md ("GPU"), in one script for a machine with
# one CUDA GPU and the reference dataset in ../shared/datasets (or $SEGDIST_DATA):
#   1. the CUDA tests (nvJPEG under queued work, Kornia on the GPU, the prefetch thread, the steady-state
#      training step under torch.cuda.set_sync_debug_mode("error"), `bench train --device cuda`);
#   2. the sweep of `segdist train`'s own loop (`segdist bench train --sweep`, default recipe, bf16 +
#      channels_last by default on CUDA): eager at batch 16..256, then torch.compile at 64 and 256
#      (one compile per batch size, reported apart); no course loop, so the two sweeps take < 8 minutes;
#   3. `segdist bench data` (course loader vs stream vs decode limit; Kornia augment ms/batch on the GPU);
#   4. the human-seg recipe (configs/human_seg.yaml) on the course's split under bf16, channels_last
#      and nvJPEG decode, seeds 1..$SEEDS.
# Usage: bash launch/gpu_check.sh OUT_DIR [SECONDS]. Each step has a time limit, the whole script a budget
# (default: none); a failing step is logged and the script goes on. OUT_DIR gets log.txt (every step's
# output), results.jsonl (one line per bench: {"label", "rc", "result"}) and hs-sN.jsonl (per-epoch metrics).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-1000000}
py=${PYTHON:-python3}
data=${SEGDIST_DATA:-../shared/datasets}
workers=${WORKERS:-8}
seeds=${SEEDS:-3}
mkdir -p "$out" runs
log="$out/log.txt"
end=$((SECONDS + budget))

# limit_for WANTED: WANTED seconds, or what is left of the budget; prints nothing if under 20 s are left.
limit_for() { local left=$((end - SECONDS)); ((left < 20)) && return 1; echo $(($1 < left ? $1 : left)); }

# begin WANTED NAME WHAT: log the start of step NAME and set $limit, or log it as skipped and fail.
begin() {
    limit=$(limit_for "$1") || { echo "== $2: skipped (budget spent)" | tee -a "$log"; return 1; }
    echo "== $(date -u +%T) $2 (limit ${limit}s): $3" | tee -a "$log"
}

step() {  # step LIMIT NAME CMD...: run CMD with a time limit, output appended to log.txt
    local want=$1 name=$2 limit; shift 2
    begin "$want" "$name" "$*" || return 0
    timeout -k 30 "$limit" "$@" >> "$log" 2>&1  # -k: `segdist train` finishes its step on SIGTERM
    echo "   rc=$? after $((SECONDS - start_s))s" | tee -a "$log"
}

bench() {  # bench LIMIT LABEL ARGS...: `segdist bench train --json ARGS`, one line in results.jsonl
    local want=$1 label=$2 limit; shift 2
    begin "$want" "$label" "segdist bench $*" || return 0
    timeout -k 30 "$limit" "$py" -m segdist bench "$@" --json > "$out/.json" 2>> "$log"
    local rc=$?
    local result; result=$(cat "$out/.json" 2>/dev/null)
    printf '{"label": "%s", "rc": %d, "result": %s}\n' "$label" "$rc" "${result:-null}" |
        tee -a "$out/results.jsonl" >> "$log"
    rm -f "$out/.json"
}

start_s=$SECONDS
{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader; else echo "nvidia-smi: not found (no NVIDIA driver on this machine)"; fi
  "$py" -c "import torch, timm, kornia, segmentation_models_pytorch as smp, accelerate, webdataset as w
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'kornia', kornia.__version__,
      'smp', smp.__version__, 'accelerate', accelerate.__version__, 'webdataset', w.__version__)"
  nproc; date -u; } 2>&1 | tee -a "$log"

step 200 cuda-tests "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_augment.py \
    tests/test_step.py -k "cuda"

common=(--source "$data/human-segmentation" --device cuda --workers "$workers" --steps 30 --warmup 3)
bench 200 sweep-eager train "${common[@]}" --sweep 16,32,64,128,256
bench 270 sweep-compile train "${common[@]}" --sweep 64,256 --compile default
bench 90 data data --source "$data/human-segmentation" --workers "$workers" --min-seconds 5

step 60 course-split "$py" launch/course_split.py "$data/human-segmentation" runs/course_split.csv
[ -f runs/human-seg-course/manifest.json ] ||
    step 60 shards "$py" -m segdist shards build runs/course_split.csv --out runs/human-seg-course --workers "$workers"
for s in $(seq 1 "$seeds"); do
    rm -f "runs/gpu-hs-s$s/metrics.jsonl"  # an earlier run's metrics must not pass for this one's
    step 240 "recipe-seed$s" "$py" -m segdist train --config configs/human_seg.yaml train.seed="$s" \
        train.name="gpu-hs-s$s" train.out_dir=runs train.overwrite=true track.backend=none \
        data.decode=device data.num_workers="$workers"  # bf16 + channels_last: the CUDA defaults
    cp "runs/gpu-hs-s$s/metrics.jsonl" "$out/hs-s$s.jsonl" 2>/dev/null
done
echo "== done after $((SECONDS - start_s))s" | tee -a "$log"
