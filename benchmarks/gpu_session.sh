#!/usr/bin/env bash
# One prepared GPU session for issue 7: correctness checks, the speed table and a real training run on the GPU,
# all inside one command that ends within ~9.5 minutes (a lent GPU machine gives a session 15 minutes in all).
#
# Here (the dev machine, with network access to the package index), once:
#     make gpu-kit SAMPLE_JPEGS=../shared/data/imagenet-sample   # wheels the GPU image lacks -> .whl/, the sample
#                                                                 # JPEGs -> .gpu-data/ (both git-ignored)
# On the GPU machine (the device tool runs this in the repository root; carry .whl and .gpu-data):
#     bash benchmarks/gpu_session.sh            # writes everything under $OUT (or ./gpu-session-out)
#
# Stages, each under `timeout` against one deadline so a hang in one still leaves the others their time:
#   1. environment: GPU, driver, torch / torchvision / timm versions (the image's torch, the carried timm);
#   2. is the fast path right here? python -m dino_model.fast_path on the paper's ViT-S/16 recipe and generated
#      images: the run's own checks (device data path vs CPU workers, compiled bf16 fused step vs fp32 eager,
#      bf16 vs fp32 features), every verdict and its figures -> $OUT/fast-path.txt, printed before any speed;
#   3. benchmarks/speed.py: the device data path and the fast step checked against the CPU / fp32 paths, then
#      the table (ViT-S/16, ViT-B/16 at 2x224+8x96 and 2x128+8x64) -> $OUT/speed.txt;
#   4. torchrun -m dino_model.train on generated images for a few dozen steps with everything on (device
#      decode + augmentation on the prefetch thread's side stream, bf16, torch.compile, fused AdamW) and
#      train.fast_path_check=strict (a failed check stops the run with exit code 4) -> train.txt;
#   5. the same with train.compile_mode=reduce-overhead (CUDA graphs) -> train-cudagraphs.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-560}"          # the whole script
FAST_PATH_S="${FAST_PATH_S:-150}"  # stage 2
SPEED_BUDGET_S="${SPEED_BUDGET_S:-280}"
deadline=$(( $(date +%s) + TOTAL_S ))
left() { echo $(( deadline - $(date +%s) )); }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# 1. environment -------------------------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 - <<'EOF'
import torch, torchvision, timm, webdataset
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__,
      "webdataset", webdataset.__version__ if hasattr(webdataset, "__version__") else "?")
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
} 2>&1 | tee "$OUT/env.txt"

shared=()
[ -d .gpu-data/imagenet-sample ] && shared=(--shared .gpu-data)
data=/tmp/gpu-session-images
python3 -m dino_model.data.synthetic "$data" --classes 8 --per-class 64 --size 256 >/dev/null || exit 1
photos="$data"  # real photographs for the data check when carried (the synthetic shapes have hard colour edges)
[ -d .gpu-data/imagenet-sample ] && photos="$PWD/.gpu-data/imagenet-sample"

# 2. is the fast path right here? ---------------------------------------------------------------------------------
# FAST_PATH_ARGS / SPEED_ARGS / TRAIN_ARGS: extra arguments (e.g. a CPU smoke run: see docs/benchmarks.md)
# --steps 0: the checks only; the training stages below take their first steps under the guard (strict).
# shellcheck disable=SC2086
timeout -k 10 "$FAST_PATH_S" python3 -m dino_model.fast_path --steps 0 data.source="\"$photos\"" \
    data.batch_size_per_gpu=32 data.num_workers=4 train.epochs=2 optim.warmup_epochs=1 ${FAST_PATH_ARGS:-} \
    2>&1 | tee "$OUT/fast-path.txt"
echo "fast-path check exit: ${PIPESTATUS[0]} (0 = no fallback, 4 = a fallback)" | tee -a "$OUT/fast-path.txt"

# 3. speed table -------------------------------------------------------------------------------------------------
# shellcheck disable=SC2086
timeout -k 10 $(( $(left) - 150 )) python3 benchmarks/speed.py --budget-s "$SPEED_BUDGET_S" "${shared[@]}" \
    ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.txt"
echo "speed.py exit: ${PIPESTATUS[0]}" | tee -a "$OUT/speed.txt"

# 4./5. the real training loop on the GPU --------------------------------------------------------------------------
train() {  # $1 = log name, the rest = extra overrides
    local name="$1"; shift
    local budget=$(( $(left) - ${RESERVE_S:-0} ))
    if [ "$budget" -lt 40 ]; then echo "skipped: ${budget}s left" | tee "$OUT/$name.txt"; return; fi
    # the defaults are the paper's ViT-S/16 recipe (2x224 + 8x96 crops, K = 65,536); only data and length change
    # shellcheck disable=SC2086
    timeout -k 10 "$budget" python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m dino_model.train \
        data.source="\"$data\"" data.batch_size_per_gpu=64 data.num_workers=8 \
        train.epochs=4 train.max_steps=24 optim.warmup_epochs=1 train.fast_path_check=strict \
        logging.log_every=4 logging.loggers='["console"]' logging.progress=false \
        checkpoint.uri="\"/tmp/gpu-session-ckpt-$name\"" checkpoint.every_n_steps=12 "$@" ${TRAIN_ARGS:-} \
        2>&1 | tee "$OUT/$name.txt"
    echo "train exit: ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}
RESERVE_S=60 train train
train train-cudagraphs train.compile_mode='"reduce-overhead"'
echo "session done, $(left)s before the deadline" | tee -a "$OUT/env.txt"
