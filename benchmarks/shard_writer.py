"""Tokens per second of lesson 09's shard writer against build-nanogpt's fineweb.py approach, on one local
corpus, side by side in one run (these machines are noisy: compare within a run, not across runs).

    python benchmarks/shard_writer.py                 # a corpus of Tiny Shakespeare's paragraphs x 20 (about 7M tokens)
    python benchmarks/shard_writer.py --copies 60 --repeats 3

Both write 100M-token-style shards (here 1M tokens, so that several are written) of GPT-2 tokens, each
document after <|endoftext|>, the first shard validation. The columns:
- ours: `nanolib.shards.write_stream_shards`: the corpus streamed through `datasets` a thousand rows at a
  time, encoded in chunks of 256 documents in this process (--workers N: by a pool of N processes),
  atomic writes and a progress file after each shard (what makes it resumable).
- build-nanogpt: its fineweb.py's approach restated: `datasets.load_dataset` (not streamed), a
  multiprocessing pool of max(1, cores // 2) processes running encode_ordinary over the rows with
  `imap(chunksize=16)`, each document's list turned into a uint16 array, shards saved with np.save.
Each figure is the best of --repeats runs (a fresh output folder each time). A command, not a test.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nanolib.core import gpt2_encoding, tinyshakespeare
from nanolib.shards import StreamConfig, write_stream_shards

SHARD_TOKENS = 1_000_000


def make_corpus(path: Path, copies: int) -> Path:
    paragraphs = [p for p in tinyshakespeare().read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for i in rng.permutation(len(paragraphs)):
                f.write(json.dumps({"text": paragraphs[i], "id": f"{c}-{i}"}) + "\n")
    return path


def ours(corpus: Path, out_dir: Path, workers: int | None = None) -> int:
    config = StreamConfig(source=str(corpus), name=None, shard_tokens=SHARD_TOKENS, block_size=1024)
    folder = write_stream_shards(config, out_dir, workers=workers, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


_enc = None


def _tokenize(row) -> np.ndarray:
    global _enc
    _enc = _enc or gpt2_encoding()
    tokens = [_enc.eot_token, *_enc.encode_ordinary(row["text"])]
    return np.array(tokens).astype(np.uint16)


def build_nanogpt(corpus: Path, out_dir: Path) -> int:
    from datasets import load_dataset
    rows = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(out_dir / "cache"))
    buffer, count, index, total = np.empty(SHARD_TOKENS, dtype=np.uint16), 0, 0, 0
    with mp.Pool(max(1, (os.cpu_count() or 2) // 2)) as pool:
        for tokens in pool.imap(_tokenize, rows, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(len(tokens), SHARD_TOKENS - count)
                buffer[count:count + take], count, tokens = tokens[:take], count + take, tokens[take:]
                if count == SHARD_TOKENS:
                    np.save(out_dir / f"{'val' if index == 0 else 'train'}_{index:06d}", buffer)
                    index, count = index + 1, 0
    if count:
        np.save(out_dir / f"{'val' if index == 0 else 'train'}_{index:06d}", buffer[:count])
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="Tiny Shakespeare's paragraphs, this many times")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is kept")
    parser.add_argument("--workers", type=int, default=None, help="ours: processes (default: as the command)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shard_writer_") as tmp:
        corpus = make_corpus(Path(tmp) / "corpus.jsonl", args.copies)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB of text, {os.cpu_count()} cores", flush=True)
        best = {}
        for repeat in range(args.repeats):
            for name, writer in (("ours", lambda c, o: ours(c, o, args.workers)), ("build-nanogpt", build_nanogpt)):
                out = Path(tmp) / f"{name}_{repeat}"
                out.mkdir()
                start = time.perf_counter()
                tokens = writer(corpus, out)
                seconds = time.perf_counter() - start
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"{name:<14} run {repeat + 1}: {tokens:,} tokens in {seconds:.2f} s, "
                      f"{tokens / seconds / 1e6:.2f}M tokens/s", flush=True)
                shutil.rmtree(out)
        print(f"best of {args.repeats}: ours {tokens / best['ours'] / 1e6:.2f}M tokens/s, build-nanogpt's "
              f"approach {tokens / best['build-nanogpt'] / 1e6:.2f}M tokens/s: "
              f"ours is {best['build-nanogpt'] / best['ours']:.2f}x as fast")


if __name__ == "__main__":
    main(sys.argv[1:])
