"""Final val loss of nanoGPT's small CPU config: nanoGPT's training loop against nanolib's Trainer, per seed.

    python benchmarks/side_by_side.py                      # seed 1337, the three columns (about 5 min on 2 cores)
    python benchmarks/side_by_side.py --seeds 1337-1342 --only nanogpt,trainer --tied   # the spread over six seeds
    python benchmarks/side_by_side.py --match              # the middle column made bit-for-bit nanoGPT
    python benchmarks/side_by_side.py --seeds 1337-1342 --only trainer --sampling=epochs  # every window once
    python benchmarks/side_by_side.py --seeds 1337-1342 --only trainer --tied   # nanoGPT's tied head

The config is nanoGPT's README command for a CPU: char-level Tiny Shakespeare, 4 layers, 4 heads, 128 wide,
block 64, batch 12, lr 1e-3 to 1e-4 over 2000 iterations, warmup 100, beta2 0.99, dropout 0, evaluation every
250 iterations on 20 batches; the figure is the val loss of the evaluation after the last step.

Three columns:
- nanogpt: what nanoGPT's train.py does for that config, restated around nanolib's GPT with nanoGPT's exact
  GELU and its head tied to the token embedding: `torch.manual_seed(seed)` then the model (module for
  module built like nanoGPT's, so the same initial weights), windows drawn with `torch.randint` from the global RNG (the first before the loop, each
  next one right after the forward pass), fresh eval batches at each evaluation, warmup
  `lr * (it + 1) / (warmup + 1)`, plain AdamW.
- draws: nanolib's Trainer as shipped, with nanoGPT's tied head, fed the very windows nanoGPT draws. With --match it also takes
  nanoGPT's three small differences (exact GELU, plain instead of fused AdamW, nanoGPT's warmup) and then
  prints the nanogpt column's figure: the Trainer's machinery is nanoGPT's.
- trainer: `python -m nanolib.train --preset=shakespeare-char-cpu --seed=SEED`, which draws batch i from
  (seed, i) so that resume and DDP are exact. For one seed it sees other windows than nanoGPT does, so its
  final loss differs by chance: compare the columns over several seeds, not one. Its model differs from
  nanoGPT's on purpose in its head, which has its own matrix instead of the token embedding's (lesson 05;
  `--tied` gives it nanoGPT's tied head), and, like the draws column without --match, in GELU's tanh
  approximation. `--sampling=epochs` makes it read every window once
  per epoch instead of drawing windows with replacement (lesson 02).
Each column gives two figures: `eval`, the val loss of the last evaluation (20 random batches, what
nanoGPT prints), and `whole`, the loss of the same final model over the whole val split, every character a
target once (nanolib.train.window_losses). An evaluation of 20 batches of 12 windows is an estimate with a
standard deviation of about 0.015 at this loss (predicted from the windows' spread, as lesson 06 shows),
as large as the spread over seeds:
compare runs by `whole`, which has no such noise.
A command, not a test: it prints figures and exits 0.
"""
import argparse
import dataclasses
import math
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from nanolib.data import SAMPLINGS, BatchSampler, prepare_tinyshakespeare
from nanolib.model import GPT, GPTConfig
from nanolib.train import Trainer, preset, window_losses

CONFIG = preset("shakespeare-char-cpu", save=False)


class NanoGPTDraws:
    """Random windows of one split drawn as nanoGPT's get_batch draws them: torch.randint, global RNG.

    `prefetch` keeps one batch drawn ahead, as nanoGPT's loop does (it draws the next training batch right
    after the forward pass). Has the sampler methods nanolib's Trainer calls; there is no position to save.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, prefetch: bool = False):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.ahead = self.draw() if prefetch else None

    def draw(self) -> tuple:
        ix = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy(self.tokens[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.tokens[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        return x, y

    def next_batch(self) -> tuple:
        if self.ahead is None:
            return self.draw()
        batch, self.ahead = self.ahead, self.draw()
        return batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:   # evaluate() rewinds; nanoGPT draws fresh batches instead
        pass


def read_splits() -> tuple:
    """({"train": tokens, "val": tokens}, vocab size) of char-level Tiny Shakespeare, from nanolib's shards."""
    folder = prepare_tinyshakespeare("char")
    samplers = {split: BatchSampler(folder, split, batch_size=1, block_size=1) for split in ("train", "val")}
    return {split: np.concatenate(s.shards) for split, s in samplers.items()}, samplers["train"].meta["n_vocab"]


def nanogpt_lr(it: int, cfg) -> float:
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def plain_adamw(model: nn.Module, cfg) -> torch.optim.AdamW:
    """nanoGPT's optimizer on a CPU: decay on 2-D parameters, the for-loop (not fused) AdamW."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=False)


def use_exact_gelu(model: GPT) -> None:
    for block in model.transformer.h:
        block.mlp.gelu = nn.GELU()


def nanogpt_loop(seed: int, cfg=CONFIG) -> tuple:
    """Train as nanoGPT's train.py does for `cfg` (a TrainConfig); return (final evaluation's val loss, model)."""
    splits, vocab_size = read_splits()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                          tie_embeddings=True))
    use_exact_gelu(model)
    optimizer = plain_adamw(model, cfg)
    train = NanoGPTDraws(splits["train"], cfg.batch_size, cfg.block_size, prefetch=True)
    evals = {split: NanoGPTDraws(tokens, cfg.batch_size, cfg.block_size) for split, tokens in splits.items()}

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = {split: [model(*draws.next_batch())[1].item() for _ in range(cfg.eval_iters)]
                  for split, draws in evals.items()}   # the train split too: its draws move the global RNG
        model.train()
        return sum(losses["val"]) / cfg.eval_iters

    for it in range(cfg.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it, cfg)
        if it % cfg.eval_interval == 0:
            last_val = val_loss()
        if it == cfg.max_iters:   # nanoGPT then takes one more step, which changes nothing it prints
            return last_val, model
        _, loss = model(*train.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class TrainerOnNanoGPTDraws(Trainer):
    """nanolib's Trainer with nanoGPT's tied head, fed nanoGPT's windows; `match` also takes nanoGPT's GELU,
    optimizer and warmup."""

    def __init__(self, config, match: bool = False):
        super().__init__(dataclasses.replace(config, tie_embeddings=True), log=lambda *args: None)
        splits, _ = read_splits()
        self.train_data = NanoGPTDraws(splits["train"], config.batch_size, config.block_size, prefetch=True)
        self.eval_data = {split: NanoGPTDraws(tokens, config.batch_size, config.block_size)
                          for split, tokens in splits.items()}
        self.match = match
        if match:
            use_exact_gelu(self.model)
            self.optimizer = plain_adamw(self.model, config)

    def lr(self, step: int | None = None) -> float:
        if not self.match:
            return super().lr(step)
        return nanogpt_lr(self.step if step is None else step, self.config)


def final_val_loss(trainer: Trainer) -> tuple:
    """Train; return (the last evaluation's val loss, the trained model)."""
    return trainer.fit()["eval"][-1]["val_loss"], trainer.raw_model


def whole_val_loss(model: nn.Module, cfg=CONFIG) -> tuple:
    """(the model's loss over the whole val split, every character a target once; the standard deviation
    of an evaluation on cfg.eval_iters random batches around it, from the spread of the windows' losses)."""
    val = BatchSampler(prepare_tinyshakespeare("char"), "val", batch_size=64, block_size=cfg.block_size)
    losses = window_losses(model, val)
    return losses.mean().item(), losses.std().item() / math.sqrt(cfg.eval_iters * cfg.batch_size)


def run(column: str, seed: int, match: bool, sampling: str = "random", tied: bool = False) -> tuple:
    """(last evaluation's val loss, whole-split val loss, an evaluation's std) of one column's run;
    `sampling` and `tied` are the trainer column's (the draws column always has nanoGPT's tied head)."""
    if column == "nanogpt":
        last_eval, model = nanogpt_loop(seed)
    else:
        with tempfile.TemporaryDirectory() as out_dir:
            trainer_column = column == "trainer"
            config = preset("shakespeare-char-cpu", seed=seed, save=False, out_dir=out_dir,
                            sampling=sampling if trainer_column else "random",
                            tie_embeddings=tied if trainer_column else True)
            trainer = TrainerOnNanoGPTDraws(config, match) if column == "draws" else Trainer(config, log=lambda *a: None)
            last_eval, model = final_val_loss(trainer)
    return (last_eval, *whole_val_loss(model))


def parse_seeds(text: str) -> list:
    """"1337" -> [1337]; "1337-1340" -> [1337, ..., 1340]; "1,5,9" -> [1, 5, 9]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        lo, hi = int(lo), int(hi or lo)
        if hi < lo:
            raise SystemExit(f"--seeds: the range {part} runs backwards; write {hi}-{lo}")
        seeds += list(range(lo, hi + 1))
    return seeds


def summary(values: list) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f} (mean +- std over {len(values)} seeds)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1337", help="e.g. 1337, 1337-1342 or 1337,2024")
    parser.add_argument("--only", default="nanogpt,draws,trainer", help="columns, comma-separated")
    parser.add_argument("--match", action="store_true",
                        help="the draws column also takes nanoGPT's exact GELU, plain AdamW and warmup")
    parser.add_argument("--sampling", default="random", choices=SAMPLINGS,
                        help="how the trainer column draws its windows: with replacement, or each once per epoch")
    parser.add_argument("--tied", action="store_true",
                        help="the trainer column ties its head to the token embedding, as nanoGPT does")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds must look like 1337, 1337-1342 or 1337,2024; got {args.seeds!r}")
    columns = args.only.split(",")
    if not columns or set(columns) - {"nanogpt", "draws", "trainer"}:
        parser.error(f"--only takes nanogpt, draws and trainer, comma-separated; got {args.only!r}")
    print(f"final val loss, nanoGPT's CPU config, {torch.get_num_threads()} threads"
          + (", draws column --match" if args.match else "")
          + (f", trainer column --sampling={args.sampling}" if args.sampling != "random" and "trainer" in columns
             else "")
          + (", trainer column --tied" if args.tied and "trainer" in columns else ""))
    print(f"{'':>6} " + "".join(f"{name:>20} {'':>5} " for name in columns))
    print(f"{'seed':>6} " + "".join(f"{'eval':>10}{'whole':>10} {'(s)':>5} " for _ in columns))
    results = {name: [] for name in columns}
    for seed in seeds:
        row = f"{seed:>6} "
        for name in columns:
            start = time.perf_counter()
            results[name].append(run(name, seed, args.match, args.sampling, args.tied))
            last_eval, whole, _ = results[name][-1]
            row += f"{last_eval:>10.4f}{whole:>10.4f} {time.perf_counter() - start:>5.0f} "
        print(row, flush=True)
    for name, values in results.items():
        print(f"{name:>8}: eval  {summary([v[0] for v in values])}")
        print(f"{'':>8}  whole {summary([v[1] for v in values])}")
        print(f"{'':>8}  (one evaluation of {CONFIG.eval_iters} batches scatters by +- "
              f"{statistics.mean(v[2] for v in values):.4f} around the whole-split loss)")
    return results


if __name__ == "__main__":
    main()
