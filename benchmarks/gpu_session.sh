#!/usr/bin/env bash
# Every GPU figure the README still lacks, at small step counts, in parts that each fit one device call
# (one command may run 10 minutes; estimates for an H100 by a review, not measured):
#
#     PART=1 bash benchmarks/gpu_session.sh   # CUDA tests, model bench, generation, shards, trainer, chat  (~8 min)
#     PART=2 bash benchmarks/gpu_session.sh   # the profile, eager and compiled; nanolib against nanoGPT     (~5 min)
#     PART=3 bash benchmarks/gpu_session.sh   # lesson 10 executed on the GPU on local data                 (~9 min)
#     PART=4 bash benchmarks/gpu_session.sh   # nanolib with max-autotune against nanoGPT                   (~7 min)
#     ONLY="bench generate" bash benchmarks/gpu_session.sh   # just the steps named (sft and chat need train)
#     SMOKE=1 PART=1 bash benchmarks/gpu_session.sh          # tiny, on any machine: checks the script runs
#
# Nothing is downloaded (the GPU machines reach no network). Bring, in git-ignored paths (the device tool's
# `carry`): data/tinyshakespeare.txt and data/tiktoken/ (as .ci/run copies them); data/nanoGPT/ with train.py,
# model.py and configurator.py of github.com/karpathy/nanoGPT (the side-by-side is skipped without it); and
# .whl/, wheels of what the machine lacks (pip download --no-deps --only-binary=:all: --python-version 3.12
# -d .whl datasets dill multiprocess, and for PART=3 nbclient ipykernel ipywidgets with their dependencies).
# The models start from random weights. Logs go to benchmarks/gpu_logs/ and, when $OUT is set (the device
# tool), into $OUT/gpu_logs_partN.tgz after every step, so a call cut short still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${PART:-1}
logs=benchmarks/gpu_logs/part$part
[ "${SMOKE:-0}" = 1 ] && logs=/tmp/nanolib_gpu_smoke/part$part     # a rehearsal's logs are not the GPU's
tmp=$(mktemp -d)
mkdir -p "$logs"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then     # SMOKE runs here, with this machine's packages
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
case $part in
    1) steps_in_part="cuda_tests bench bench_compiled generate shards train sft chat" ;;
    2) steps_in_part="profile_eager profile_compiled vs_nanogpt" ;;
    3) steps_in_part="notebook" ;;
    4) steps_in_part="vs_nanogpt_autotune" ;;
    *) echo "PART must be 1, 2, 3 or 4"; exit 2 ;;
esac
wanted=${ONLY:-$steps_in_part}
if [ "${SMOKE:-0}" = 1 ]; then
    size=cpu-small; gen="--model shakespeare --lengths 32"; steps=4; dev=cpu
    model="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=4 --grad_accum_steps=1 --compile=False --device=cpu"
    prof_model="$model"; shard=20000; side="--smoke --steps 6 --skip 2 --batch 4 --block 64 --accum 1"
else
    size=gpt2; gen="--model gpt2 --lengths 64,256"; steps=30; dev=cuda; model=""; shard=100000
    prof_model="--batch_size=16 --grad_accum_steps=1"; side="--steps 30 --skip 10 --batch 64 --accum 2"
fi
timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "(%e s wall, %M KB peak)")
run() {   # run NAME COMMAND...: if wanted, the command's output to the screen and to $logs/NAME.log
    local name=$1; shift
    [[ " $wanted " == *" $name "* ]] || return 0
    echo "== $name: $*" | tee "$logs/$name.log"
    local start=$SECONDS
    { "${timer[@]}" "$@"; } 2>&1 | tee -a "$logs/$name.log"
    echo "($name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s)" | tee -a "$logs/$name.log"
    [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_logs_part$part.tgz" -C "$logs" .
    return 0
}
{ "$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
  date -u; git log -1 --format="commit %H" 2>/dev/null; } | tee "$logs/machine.log"
run cuda_tests "$py" -m pytest -q -o addopts="" -p no:cacheprovider tests/test_generate.py -k "cuda"
run bench "$py" -m nanolib.bench --size "$size" --device "$dev"
run bench_compiled "$py" -m nanolib.bench --size "$size" --device "$dev" --compile
run generate "$py" -m nanolib.generate --bench --graph $gen --device "$dev"
run shards "$py" -m nanolib.shards --source=data/tinyshakespeare.txt --name= --out_dir="$tmp/shards" \
    --shard_tokens=$shard --block_size=64
data="$tmp/shards"
if [ ! -f "$data/meta.json" ]; then     # part 2, or no datasets: lesson 02's writer, which needs none
    "$py" -c "import sys; from nanolib.data import prepare_tinyshakespeare; prepare_tinyshakespeare('gpt2', sys.argv[1])" \
        "$tmp/shards2" && data="$tmp/shards2"
fi
run train "$py" -m nanolib.train --preset=gpt2-124m --data="$data" --max_iters=$steps --eval_interval=$steps \
    --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 --eval_iters=2 --out_dir="$tmp/gpt2" $model
run sft "$py" -m nanolib.sft --preset=chat-gpt2-124m --init_from="$tmp/gpt2/ckpt.pt" --data=tasks --score_examples=5 \
    --max_iters=$steps --eval_interval=$steps --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 \
    --eval_iters=2 --out_dir="$tmp/chat" $( [ "${SMOKE:-0}" = 1 ] && echo "--batch_size=4 --compile=False --device=cpu" )
printf 'spell night\nreverse crown\n' | run chat "$py" -m nanolib.chat --ckpt="$tmp/chat/ckpt.pt" --max_new_tokens=16
run profile_eager "$py" -m nanolib.profiling --preset=gpt2-124m --data="$data" --compile=False $prof_model
run profile_compiled "$py" -m nanolib.profiling --preset=gpt2-124m --data="$data" $prof_model \
    $( [ "${SMOKE:-0}" = 1 ] || echo --compile=True )
if [ -f data/nanoGPT/train.py ]; then
    run vs_nanogpt "$py" benchmarks/train_vs_nanogpt.py --nanogpt data/nanoGPT --data "$data" $side \
        --log_dir "$logs/vs_nanogpt"
    [ "${SMOKE:-0}" = 1 ] || run vs_nanogpt_autotune timeout 560 "$py" benchmarks/train_vs_nanogpt.py --nanogpt data/nanoGPT --data "$data" \
        $side --compile_mode max-autotune-no-cudagraphs --log_dir "$logs/vs_nanogpt_autotune"
else
    echo "vs_nanogpt: skipped, no data/nanoGPT/train.py" | tee "$logs/vs_nanogpt.log"
fi
NANOLIB_CAPSTONE_LOCAL=1 NANOLIB_BUDGET_HOURS=0.03 NANOLIB_DATA="$PWD/data" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    run notebook timeout 580 "$py" -c "import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
try:
    nbclient.NotebookClient(nb, timeout=560, kernel_name='python3', resources={'metadata': {'path': 'notebooks'}}).execute()
finally:
    nbformat.write(nb, sys.argv[2])   # executed so far, outputs and all
print('executed; all checks passed' if 'all checks passed' in str(nb.cells[-1].outputs) else 'executed')" \
    notebooks/10_train_gpt2.ipynb "$logs/10_train_gpt2.executed.ipynb"
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_logs_part$part.tgz" -C "$logs" .
rm -rf "$tmp"
echo "logs in $logs"
