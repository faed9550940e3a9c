#!/usr/bin/env bash
# Every GPU measurement of the open GPU issues for a short device lease, in calls of
# under 10 minutes each (the device runs one command at most that long):
#   bench/gpu_session.sh 1   # the gpu test layer, bench/mfu.py GPT-2 1.1B at micro-batch 8, 16
#   bench/gpu_session.sh 2   # mfu with checkpointing on every block, ZeRO-3, the Llama and Qwen3 1B shapes
#   bench/gpu_session.sh 3   # compile cost: whole model vs per block, ZeRO-2 and ZeRO-3, 1.1B
#   bench/gpu_session.sh lease   # one call for a 15-minute lease: the tests, then the MFU rows
#                                # of 1 and 2 at micro-batch 16 by priority (a profile of the
#                                # GPT-2 row), each part cut to what is left of GPU_DEADLINE_S
# Each part has its own timeout so one hang does not eat the lease; logs land in $OUT
# (or ./gpu-logs), with summary.txt.
#
# The device image lacks some packages and has no index: build the wheels here first
# (recipe: ../shared/notes/gpu-device.md) into .whl/ (git-ignored locally via
# .git/info/exclude), then run this script there with .whl carried along.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu-logs}
mkdir -p "$LOGS"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .site .whl/*.whl
    export PYTHONPATH=$PWD/.site:$PWD
fi
export DS_ACCELERATOR=cuda WANDB_MODE=disabled PYTHONUNBUFFERED=1
git rev-parse --short HEAD > "$LOGS/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1

DEADLINE_S=${GPU_DEADLINE_S:-100000}  # the whole call's budget; a part gets what is left
run() {  # run NAME SECONDS COMMAND...: one part, its log, its exit code on one line
    local name=$1 limit=$2 left=$((DEADLINE_S - SECONDS))
    shift 2
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped (${left}s of GPU_DEADLINE_S left)" | tee -a "$LOGS/summary.txt"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
}

if [ "${1:-1}" = lease ]; then
    # Each process on a fresh machine compiles with a cold inductor cache: ~2-3 min for
    # the 1.1B shape (measured 2026-12-04), so a 9-minute call holds about four of them.
    run mfu-gpt2 330 python3 bench/mfu.py --micro-batch 16 --profile "$LOGS/profile-gpt2"
    run mfu-gpt2-zero3 180 python3 bench/mfu.py --micro-batch 16 --zero-stage 3 --no-reference
    run mfu-llama 240 python3 bench/mfu.py --family llama --micro-batch 16 --no-reference
    run mfu-gpt2-ckpt 240 python3 bench/mfu.py --micro-batch 16 --checkpointing 1.0
    run mfu-qwen3 240 python3 bench/mfu.py --family qwen3 --micro-batch 16 --no-reference
    run gpu-tests 180 python3 -m pytest -m gpu tests/gpu -q
elif [ "${1:-1}" = 1 ]; then
    run gpu-tests 180 python3 -m pytest -m gpu tests/gpu -q
    run mfu-gpt2 380 python3 bench/mfu.py --micro-batch 8 16
elif [ "$1" = 3 ]; then
    run compile-time 560 python3 bench/compile_time.py --layers 20 --hidden 2048 \
        --seq-len 1024 --micro-batch 8 --steps 6
else
    run mfu-gpt2-ckpt 180 python3 bench/mfu.py --micro-batch 16 --checkpointing 1.0
    run mfu-gpt2-zero3 180 python3 bench/mfu.py --micro-batch 16 --zero-stage 3
    run mfu-llama 200 python3 bench/mfu.py --family llama --micro-batch 16
    run mfu-qwen3 200 python3 bench/mfu.py --family qwen3 --micro-batch 16
fi
grep -h -E "MFU|ratio|passed|failed|eager|graph" "$LOGS"/*.log | tee -a "$LOGS/summary.txt"
