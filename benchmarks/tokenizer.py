"""BPE training speed: nanolib's trainer against the lesson's naive one (lesson 01). A command, not a test.

    python benchmarks/tokenizer.py                    # whole text at vocab 1024 + naive vs fast on a slice
    python benchmarks/tokenizer.py --naive-chars 0    # run the naive trainer on the whole text too (minutes)

What it measures, all with the GPT-4 split pattern on Tiny Shakespeare:
1. `BPETokenizer().train(text, 1024)` on the whole text (split included), best of --repeat runs: the target is
   under 10 s (minbpe's pure-Python RegexTokenizer took 334 s for the same job on the reference machine);
2. the naive trainer (`train_merges_naive`, recounting every pair at every merge) and the fast one
   (`train_merges`) on the SAME chunks of a slice of the text: the measured speed-up must be at least 10x,
   and the merges must be identical;
3. the naive trainer's time on the whole text, extrapolated from the slice (its cost per merge grows
   linearly with the text), unless --naive-chars 0 measures it.
Exits with status 1 if a target is missed. Timings need a quiet machine: other processes inflate them.
"""
import argparse
import sys
import time

from nanolib.core import tinyshakespeare
from nanolib.tokenizer import GPT4_SPLIT_PATTERN, BPETokenizer, split_chunks, train_merges, train_merges_naive


def best_time(fn, repeat=1):
    """(smallest wall time, smallest CPU time of this process) over `repeat` calls, and the last result.

    The CPU time is what the work cost even when other processes share the cores; the targets use wall time.
    """
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--naive-chars", type=int, default=20_000,
                        help="characters of the text the naive trainer runs on (0: the whole text)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each fast measurement; the best counts")
    args = parser.parse_args(argv)
    if args.vocab_size < 256 or args.naive_chars < 0 or args.repeat < 1:
        parser.error("need --vocab-size >= 256, --naive-chars >= 0 and --repeat >= 1")

    text = tinyshakespeare().read_text(encoding="utf-8")   # from the cache, or downloaded and verified
    print(f"Tiny Shakespeare: {len(text):,} characters; vocab_size {args.vocab_size}, GPT-4 split")

    full_seconds, full_cpu, tok = best_time(
        lambda: BPETokenizer().train(text, args.vocab_size, GPT4_SPLIT_PATTERN), args.repeat)
    print(f"fast trainer, whole text:  {full_seconds:7.2f} s wall, {full_cpu:.2f} s CPU "
          f"(best of {args.repeat}; split included)")

    part = text if args.naive_chars == 0 else text[:args.naive_chars]
    chunks = split_chunks(part, GPT4_SPLIT_PATTERN)
    naive_seconds, naive_cpu, naive_merges = best_time(lambda: train_merges_naive(chunks, args.vocab_size))
    fast_seconds, fast_cpu, fast_merges = best_time(lambda: train_merges(chunks, args.vocab_size), args.repeat)
    speedup = naive_seconds / fast_seconds
    same = naive_merges == fast_merges
    print(f"on the first {len(part):,} characters ({len(chunks):,} chunks, the same input for both):")
    print(f"  naive trainer:           {naive_seconds:7.2f} s wall, {naive_cpu:.2f} s CPU")
    print(f"  fast trainer:            {fast_seconds:7.3f} s wall, {fast_cpu:.3f} s CPU (best of {args.repeat})")
    print(f"  measured speed-up:       {speedup:7.0f}x wall, {naive_cpu / fast_cpu:.0f}x CPU")
    print(f"  identical merges:        {same}")
    if len(part) < len(text):
        scale = len(text) / len(part)
        print(f"naive trainer, whole text: ~{naive_seconds * scale:.0f} s wall, ~{naive_cpu * scale:.0f} s CPU "
              f"(extrapolated from the slice): ~{naive_cpu * scale / full_cpu:.0f}x the fast trainer's CPU time")
    else:
        print(f"whole text: naive {naive_seconds:.1f} s vs fast {full_seconds:.2f} s wall: "
              f"{naive_seconds / full_seconds:.0f}x")
    print(f"the trained tokenizer: {tok}")

    ok = same and full_seconds < 10 and speedup >= 10
    print(f"targets (whole text < 10 s, speed-up >= 10x, identical merges): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
