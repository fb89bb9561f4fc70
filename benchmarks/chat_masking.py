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

from nanolib.sft import main as sft_main
from nanolib.tasks import TASKS

ARMS = ("assistant", "all")


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    seeds = list(range(int(first), int(last or first) + 1))
    if not seeds:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}: write FIRST-LAST with FIRST <= LAST")
    return seeds


def finetune(init_from: str, seed: int, train_on: str, out_dir: Path, extra: list) -> dict:
    """The last evaluation's record of one finetuning run (its log is kept out of the table)."""
    argv = ["--preset=chat-tasks-cpu", f"--init_from={init_from}", f"--seed={seed}", f"--train_on={train_on}",
            f"--out_dir={out_dir}", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        history = sft_main(argv)
    return history["eval"][-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init_from", required=True, help="a checkpoint of nanolib.train (the base model)")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1337-1339"), help="FIRST-LAST (1337-1339)")
    parser.add_argument("extra", nargs="*", help="more --key=value options for nanolib.sft, after --")
    args = parser.parse_args(argv)
    scores = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="chat_masking_") as tmp:
        for seed in args.seeds:
            for arm in ARMS:
                start = time.perf_counter()
                rec = finetune(args.init_from, seed, arm, Path(tmp) / f"{arm}_{seed}", args.extra)
                per_task = [rec[f"exact_match/{t}"] for t in TASKS]
                scores[arm].append(statistics.mean(per_task))
                print(f"seed {seed}  train on {arm:<9}  " + "  ".join(f"{t} {s:4.0%}" for t, s in zip(TASKS, per_task))
                      + f"  ended {rec['ended']:4.0%}  mean {scores[arm][-1]:.3f}  val loss {rec['val_loss']:.3f}"
                      f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    for arm in ARMS:
        print(f"train on {arm:<9}: mean exact match {statistics.mean(scores[arm]):.3f} ± {spread(scores[arm]):.3f} "
              f"over {len(args.seeds)} seed(s)")
    gain = [a - b for a, b in zip(scores["assistant"], scores["all"])]
    print(f"assistant-only minus every token, paired by seed: {statistics.mean(gain):+.3f} ± {spread(gain):.3f}; "
          f"higher on {sum(g > 0 for g in gain)} of {len(gain)} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
