"""Lesson 08's masking experiment over several seeds: loss on the assistant's tokens only against loss on every token.

    python -m nanolib.train --preset=shakespeare-char-cpu --out_dir=out/shakespeare      # the base model, once
    python benchmarks/chat_masking.py --init_from=out/shakespeare/ckpt.pt --seeds 1337-1339

Each seed finetunes the same base model twice with `python -m nanolib.sft --preset=chat-tasks-cpu`, once with
`--train_on=assistant` (the preset) and once with `--train_on=all`; both arms get the same seed, so the same
training conversations in the same order, the same number of steps and the same held-out questions. It prints
the held-out exact match per task after the last step, the share of replies that end with <|assistant_end|>,
and the paired difference of the mean score. A command, not a test: it prints figures and exits 0.
"""
import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nanolib.chat import ChatData, ChatTokenizer
from nanolib.sft import main as sft_main
from nanolib.sft import sft_preset, task_conversations
from nanolib.tasks import TASKS
from nanolib.train import evaluate, model_from_checkpoint

ARMS = ("assistant", "all")


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    seeds = list(range(int(first), int(last or first) + 1))
    if not seeds:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}: write FIRST-LAST with FIRST <= LAST")
    return seeds


def finetune(init_from: str, seed: int, train_on: str, out_dir: Path, extra: list) -> dict:
    """The last evaluation's record of one finetuning run (its log is kept out of the table), with the loss
    over the replies' tokens of the held-out conversations: the same measure for both arms (each run's own
    val loss counts the questions too when it trains on every token)."""
    argv = ["--preset=chat-tasks-cpu", f"--init_from={init_from}", f"--seed={seed}", f"--train_on={train_on}",
            f"--out_dir={out_dir}", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        history = sft_main(argv)
    model, ckpt = model_from_checkpoint(out_dir / "ckpt.pt")
    tokenizer = ChatTokenizer.from_checkpoint(ckpt)
    replies = ChatData(task_conversations(sft_preset("chat-tasks-cpu", seed=seed)), tokenizer, train_on="assistant")
    sampler = replies.sampler("val", 50, model.config.block_size, "cpu", seed=0)
    return {**history["eval"][-1], "replies_loss": evaluate(model, sampler, 10).item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init_from", required=True, help="a checkpoint of nanolib.train (the base model)")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1337-1339"), help="FIRST-LAST (1337-1339)")
    parser.add_argument("extra", nargs="*", help="more --key=value options for nanolib.sft, after --")
    args = parser.parse_args(argv)
    scores, losses = {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="chat_masking_") as tmp:
        for seed in args.seeds:
            for arm in ARMS:
                start = time.perf_counter()
                rec = finetune(args.init_from, seed, arm, Path(tmp) / f"{arm}_{seed}", args.extra)
                per_task = [rec[f"exact_match/{t}"] for t in TASKS]
                scores[arm].append(statistics.mean(per_task))
                losses[arm].append(rec["replies_loss"])
                print(f"seed {seed}  train on {arm:<9}  " + "  ".join(f"{t} {s:4.0%}" for t, s in zip(TASKS, per_task))
                      + f"  ended {rec['ended']:4.0%}  mean {scores[arm][-1]:.3f}  replies' val loss {rec['replies_loss']:.3f}"
                      f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    for arm in ARMS:
        print(f"train on {arm:<9}: mean exact match {statistics.mean(scores[arm]):.3f} ± {spread(scores[arm]):.3f} "
              f"over {len(args.seeds)} seed(s); replies' val loss {statistics.mean(losses[arm]):.4f} ± "
              f"{spread(losses[arm]):.4f}")
    gain = [a - b for a, b in zip(scores["assistant"], scores["all"])]
    print(f"assistant-only minus every token, paired by seed: {statistics.mean(gain):+.3f} ± {spread(gain):.3f}; "
          f"higher on {sum(g > 0 for g in gain)} of {len(gain)} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
