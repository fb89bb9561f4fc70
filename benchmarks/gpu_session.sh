#!/usr/bin/env bash
# Every GPU figure the README still lacks, in one call at small step counts, for a session lent a GPU:
#
#     bash benchmarks/gpu_session.sh              # on the GPU machine: logs to $OUT (or benchmarks/gpu_logs/)
#     SMOKE=1 bash benchmarks/gpu_session.sh      # the same steps, tiny, on any machine: checks the script runs
#
# Nothing is downloaded (the GPU machines reach no network): the shards are made from data/tinyshakespeare.txt
# and data/tiktoken/ (copy them there first, as .ci/run does), the models start from random weights. It prints:
# the model benchmark (ms a step, tokens/s, MFU), the KV cache's speed-up, the shard writer's tokens/s, the
# trainer's tokens/s and MFU with the gpt2-124m preset, and the chat finetune's tokens/s (chat-gpt2-124m's
# shape on lesson 08's tasks). Read the figures from the logs; every command is one of the repo's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu_logs}
tmp=$(mktemp -d)
mkdir -p "$out"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python}
if [ "${SMOKE:-0}" = 1 ]; then
    size=cpu-small; gen="--lengths 32"; steps=4
    model="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=4 --grad_accum_steps=1 --compile=False --device=cpu"
    shard=20000
else
    size=gpt2; gen="--lengths 256"; steps=30; model=""; shard=100000
fi
run() {   # run NAME COMMAND...: the command's output to the screen and to $out/NAME.log
    local name=$1; shift
    echo "== $name: $*" | tee "$out/$name.log"
    { /usr/bin/time -f "(%e s wall, %M KB peak)" "$@"; } 2>&1 | tee -a "$out/$name.log"
}
"$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$out/machine.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$out/machine.log"
run bench "$py" -m nanolib.bench --size "$size"
run generate "$py" -m nanolib.generate --bench $gen
run shards "$py" -m nanolib.shards --source=data/tinyshakespeare.txt --name= --out_dir="$tmp/shards" \
    --shard_tokens=$shard --block_size=64
run train "$py" -m nanolib.train --preset=gpt2-124m --data="$tmp/shards" --max_iters=$steps --eval_interval=$steps \
    --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 --eval_iters=2 --out_dir="$tmp/gpt2" $model
run sft "$py" -m nanolib.sft --preset=chat-gpt2-124m --init_from="$tmp/gpt2/ckpt.pt" --data=tasks --score_examples=5 \
    --max_iters=$steps --eval_interval=$steps --warmup_iters=2 --lr_decay_iters=$steps --log_interval=2 \
    --eval_iters=2 --out_dir="$tmp/chat" $( [ "${SMOKE:-0}" = 1 ] && echo "--batch_size=4 --compile=False --device=cpu" )
printf 'spell night\nreverse crown\n' | run chat "$py" -m nanolib.chat --ckpt="$tmp/chat/ckpt.pt" --max_new_tokens=16
rm -rf "$tmp"
echo "logs in $out"
