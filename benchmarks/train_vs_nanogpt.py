"""Training speed, side by side in one run: nanolib's trainer (the gpt2-124m preset) against nanoGPT's train.py.

    python benchmarks/train_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT --data SHARDS      # on a CUDA GPU
    python benchmarks/train_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT --data SHARDS --smoke   # tiny, on a CPU

Both train GPT-2 124M from scratch for --steps steps of the same shape: --batch sequences of --block tokens a
micro-step, --accum micro-steps a step (16 x 1024 x 4 = 65,536 tokens by default), bf16 autocast, torch.compile,
fused AdamW, flash attention, gradient clipping at 1.0, biases on (as GPT-2; nanoGPT's default is off, so it is
passed --bias=True). They read the same tokens: the shards of --data (written by nanolib.shards or
nanolib.data) are copied into the train.bin and val.bin nanoGPT reads. nanoGPT is not part of this repository:
pass a checkout of github.com/karpathy/nanoGPT (its train.py, model.py and configurator.py are used as they are).

Each program runs in its own process, one after the other (--order says which first), and logs every step
(log_interval 1: both read the loss back each step, so each step's time ends at a sync). The figure is the
median of the step times each program prints, after the first --skip steps (compilation, warm-up). Tokens/s
and MFU are computed here in the same way for both: tokens a step over the median step time, and
nanolib.bench.flops_per_token over the GPU's dense bf16 peak from nanolib.bench.PEAK_TFLOPS (nanoGPT's own MFU
assumes an A100's 312 TFLOPS, so it is not used). A command, not a test: it prints figures and exits 0.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # nanolib from this checkout, installed or not
GPT2_SHAPE = dict(n_layer=12, n_head=12, n_embd=768)
SMOKE_SHAPE = dict(n_layer=2, n_head=2, n_embd=64)


def nanogpt_data(shards: Path, folder: Path) -> int:
    """The shards' train and val tokens as nanoGPT's train.bin and val.bin (raw uint16); returns train tokens."""
    from nanolib.data import read_meta
    meta = read_meta(shards)
    if meta["dtype"] != "uint16":
        raise SystemExit(f"{shards} holds {meta['dtype']} tokens; nanoGPT reads uint16")
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        with open(folder / f"{split}.bin", "wb") as out:
            for shard in meta["shards"][split]:   # both are raw uint16, so the bytes go across as they are
                with open(shards / shard["file"], "rb") as f:
                    shutil.copyfileobj(f, out)
    return os.path.getsize(folder / "train.bin") // 2


def run(name: str, cmd: list, cwd: Path, pattern: str, log_dir: Path | None) -> list:
    """Run one program; return the step times (ms) its log lines give, in order."""
    print(f"== {name}: {' '.join(map(str, cmd))}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if log_dir is not None:
        (log_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    times = [float(m) for m in re.findall(pattern, proc.stdout)]
    if not times:
        raise SystemExit(f"{name} printed no step times matching {pattern!r}:\n{proc.stdout[-2000:]}")
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--data", required=True, help="a folder of shards (nanolib.shards / nanolib.data)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the median")
    p.add_argument("--batch", type=int, default=16, help="sequences a micro-step")
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--accum", type=int, default=4, help="micro-steps a step")
    p.add_argument("--compile_mode", default="", help="nanolib's torch.compile mode (TrainConfig.compile_mode); "
                   "nanoGPT keeps torch's default")
    p.add_argument("--order", choices=["nanolib-first", "nanogpt-first"], default="nanolib-first")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, no compile, fp32: checks the harness")
    p.add_argument("--log_dir", default=None, help="keep each program's whole output here")
    args = p.parse_args(argv)
    nanogpt, shards = Path(args.nanogpt).resolve(), Path(args.data).resolve()
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "configurator.py").is_file():
        raise SystemExit(f"{nanogpt} is not a nanoGPT checkout (no train.py and configurator.py): "
                         "git clone https://github.com/karpathy/nanoGPT and pass its folder")
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")
    if args.smoke:
        shape, device, dtype, compile_ = SMOKE_SHAPE, "cpu", "float32", False
    else:
        shape, device, dtype, compile_ = GPT2_SHAPE, "cuda", "bfloat16", True
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    tokens_per_step = args.batch * args.block * args.accum
    common = dict(shape, block_size=args.block, device=device, dtype=dtype, compile=compile_)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = nanogpt_data(shards, tmp / "data" / "nanolib_bench")
        shutil.copy(nanogpt / "configurator.py", tmp)            # nanoGPT execs it from its working directory
        ours = [sys.executable, "-m", "nanolib.train", "--preset=gpt2-124m", f"--data={shards}",
                f"--out_dir={tmp / 'nanolib'}", f"--batch_size={args.batch}", f"--grad_accum_steps={args.accum}",
                f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}", "--warmup_iters=2",
                f"--eval_interval={args.steps}", "--eval_iters=1", "--log_interval=1", "--save=False"]
        ours += [f"--{k}={v}" for k, v in common.items()]
        ours += [f"--compile_mode={args.compile_mode}"] if args.compile_mode else []
        theirs = [sys.executable, str(nanogpt / "train.py"), "--dataset=nanolib_bench", f"--out_dir={tmp / 'nanogpt'}",
                  f"--batch_size={args.batch}", f"--gradient_accumulation_steps={args.accum}",
                  f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}", "--warmup_iters=2",
                  "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1", "--bias=True",
                  "--always_save_checkpoint=False", "--learning_rate=6e-4", "--min_lr=6e-5", "--beta2=0.95"]
        theirs += [f"--{k}={v}" for k, v in common.items()]
        programs = {"nanolib": (ours, ROOT, r"\|\s*([\d.]+) ms/step"),
                    "nanogpt": (theirs, tmp, r"iter \d+: loss [\d.]+, time ([\d.]+)ms")}
        order = list(programs) if args.order == "nanolib-first" else list(programs)[::-1]
        from nanolib.bench import flops_per_token, peak_tflops
        from nanolib.model import GPTConfig
        from nanolib.plan import non_embedding_params
        import torch
        config = GPTConfig(**shape, block_size=args.block, vocab_size=50304)
        per_token = flops_per_token(config, non_embedding_params(config), args.block)
        gpu = torch.cuda.get_device_name() if device == "cuda" else None
        peak = peak_tflops(gpu) if gpu else None
        print(f"{gpu or 'CPU (smoke)'} | torch {torch.__version__} | {shape} block {args.block} | "
              f"{args.batch} x {args.block} x {args.accum} = {tokens_per_step:,} tokens a step | {dtype}, "
              f"compile={compile_}{' (nanolib: ' + args.compile_mode + ')' if args.compile_mode else ''} | "
              f"{n_train:,} train tokens | median of steps {args.skip + 1}-{args.steps}", flush=True)
        result = {}
        for name in order:     # each program's figures as soon as it ends: a run cut short keeps the first
            kept = run(name, *programs[name], log_dir)[args.skip:]
            ms = statistics.median(kept)
            tok_s = tokens_per_step / (ms / 1000)
            mfu = tok_s * per_token / (peak * 1e12) if peak else None
            result[name] = {"ms": ms, "tokens_per_s": tok_s, "mfu": mfu, "steps_timed": len(kept)}
            print(f"{name:<8} {ms:8.1f} ms a step (min {min(kept):.1f}, max {max(kept):.1f}) | {tok_s:>10,.0f} tokens/s"
                  + (f" | MFU {mfu:.1%} of {peak:g} TFLOPS" if mfu else ""), flush=True)
    ratio = result["nanogpt"]["ms"] / result["nanolib"]["ms"]
    print(f"nanolib's step takes {1 / ratio:.3f}x nanoGPT's time ({'faster' if ratio > 1 else 'slower'} by "
          f"{abs(ratio - 1):.1%})")
    return result


if __name__ == "__main__":
    main()
