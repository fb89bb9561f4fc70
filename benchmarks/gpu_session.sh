#!/usr/bin/env bash
# Every GPU figure the README still lacks, in one call at small step counts, for a session lent a GPU:
#
#     bash benchmarks/gpu_session.sh              # on the GPU machine: logs to $OUT (or benchmarks/gpu_logs/)
#     SMOKE=1 bash benchmarks/gpu_session.sh      # the same steps, tiny, on any machine: checks the script runs
#
# Nothing is downloaded (the GPU machines reach no network). Bring, in git-ignored paths (the device tool's
# `carry`): data/tinyshakespeare.txt and data/tiktoken/ (as .ci/run copies them), data/nanoGPT/ (train.py,
# model.py and configurator.py of github.com/karpathy/nanoGPT, for the side-by-side; skipped without it) and,
# where the machine lacks `datasets`, its wheels in .whl/ (pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl datasets dill multiprocess; for step 10, also nbclient ipykernel ipywidgets with
# their dependencies). The models start from random weights. ONLY="bench generate" runs just the steps named
# (sft and chat need train). In order:
#   1. the CUDA tests (the recorded decode step gives the plain loop's tokens)
#   2. the model benchmark (ms a step, tokens/s, MFU), eager and compiled
#   3. generation of GPT-2 124M's shape: no cache, KV cache, CUDA graph (same tokens, checked)
#   4. the shard writer's tokens/s
#   5. the trainer with the gpt2-124m preset (524,288 tokens a step): tokens/s and MFU
#   6. the profile of the step, eager and compiled
#   7. nanolib's trainer against nanoGPT's train.py, same shape, one after the other
#   8. the chat finetune and the chat command
#   9. the trainer with compile_mode=max-autotune-no-cudagraphs against nanoGPT (minutes of autotuning)
#  10. lesson 10 executed top to bottom on the GPU with NANOLIB_CAPSTONE_LOCAL=1 (local data, a 2-minute budget);
#      the executed notebook is kept in $out
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_logs}
tmp=$(mktemp -d)
mkdir -p "$out"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then     # SMOKE runs here, with this machine's packages
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${SMOKE:-0}" = 1 ]; then
    size=cpu-small; gen="--model shakespeare --lengths 32"; steps=4; dev=cpu
    model="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=4 --grad_accum_steps=1 --compile=False --device=cpu"
    prof_model="$model"; shard=20000; side="--smoke --steps 6 --skip 2 --batch 4 --block 64 --accum 1"
else
    size=gpt2; gen="--model gpt2 --lengths 64,256"; steps=30; dev=cuda; model=""; shard=100000
    prof_model="--batch_size=16 --grad_accum_steps=1"; side="--steps 30 --skip 10 --batch 64 --accum 2"
fi
run() {   # run NAME COMMAND...: the command's output to the screen and to $out/NAME.log, if ONLY wants it
    local name=$1; shift
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
    echo "== $name: $*" | tee "$out/$name.log"
    { /usr/bin/time -f "(%e s wall, %M KB peak)" "$@"; } 2>&1 | tee -a "$out/$name.log"
}
"$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$out/machine.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$out/machine.log"
date -u | tee -a "$out/machine.log"
run cuda_tests "$py" -m pytest -q -p no:cacheprovider tests/test_generate.py -k "cuda"
run bench "$py" -m nanolib.bench --size "$size" --device "$dev"
run bench_compiled "$py" -m nanolib.bench --size "$size" --device "$dev" --compile
run generate "$py" -m nanolib.generate --bench --graph $gen --device "$dev"
run shards "$py" -m nanolib.shards --source=data/tinyshakespeare.txt --name= --out_dir="$tmp/shards" \
    --shard_tokens=$shard --block_size=64
data="$tmp/shards"
if [ ! -f "$data/meta.json" ]; then     # without datasets: lesson 02's writer, which needs none
    "$py" -c "import sys; from nanolib.data import prepare_tinyshakespeare; prepare_tinyshakespeare('gpt2', sys.argv[1])" \
        "$tmp/shards2" && data="$tmp/shards2"
fi
run train "$py" -m nanolib.train --preset=gpt2-124m --data="$data" --max_iters=$steps --eval_interval=$steps \
    --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 --eval_iters=2 --out_dir="$tmp/gpt2" $model
run profile_eager "$py" -m nanolib.profiling --preset=gpt2-124m --data="$data" --compile=False $prof_model
run profile_compiled "$py" -m nanolib.profiling --preset=gpt2-124m --data="$data" $prof_model \
    $( [ "${SMOKE:-0}" = 1 ] || echo --compile=True )
if [ -f data/nanoGPT/train.py ]; then
    run vs_nanogpt "$py" benchmarks/train_vs_nanogpt.py --nanogpt data/nanoGPT --data "$data" $side --log_dir "$out/vs_nanogpt"
else
    echo "vs_nanogpt: skipped, no data/nanoGPT/train.py" | tee "$out/vs_nanogpt.log"
fi
run sft "$py" -m nanolib.sft --preset=chat-gpt2-124m --init_from="$tmp/gpt2/ckpt.pt" --data=tasks --score_examples=5 \
    --max_iters=$steps --eval_interval=$steps --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 \
    --eval_iters=2 --out_dir="$tmp/chat" $( [ "${SMOKE:-0}" = 1 ] && echo "--batch_size=4 --compile=False --device=cpu" )
printf 'spell night\nreverse crown\n' | run chat "$py" -m nanolib.chat --ckpt="$tmp/chat/ckpt.pt" --max_new_tokens=16
if [ -f data/nanoGPT/train.py ] && [ "${SMOKE:-0}" != 1 ]; then
    run vs_nanogpt_autotune timeout 420 "$py" benchmarks/train_vs_nanogpt.py --nanogpt data/nanoGPT --data "$data" \
        $side --compile_mode max-autotune-no-cudagraphs --log_dir "$out/vs_nanogpt_autotune"
fi
NANOLIB_CAPSTONE_LOCAL=1 NANOLIB_BUDGET_HOURS=0.03 NANOLIB_DATA="$PWD/data" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    run notebook "$py" -c "import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=1200, kernel_name='python3', resources={'metadata': {'path': 'notebooks'}}).execute()
nbformat.write(nb, sys.argv[2])
print('executed; all checks passed' if 'all checks passed' in str(nb.cells[-1].outputs) else 'executed')" \
    notebooks/10_train_gpt2.ipynb "$out/10_train_gpt2.executed.ipynb"
rm -rf "$tmp"
echo "logs in $out"
