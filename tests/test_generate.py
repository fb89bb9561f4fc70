"""nanolib.generate: the KV cache against plain forward passes, the sampling filters against hand-computed
sets and Hugging Face's warpers, generate()'s stop tokens, seeding and argument checks, and the
`python -m nanolib.sample` command."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanolib.generate import (KVCache, check_sampling_args, generate, next_logits, one_row_linear, sample_next,
                              time_generation, top_k_filter, top_p_filter, use_one_row_linear)
from nanolib.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_model(seed=0, std=0.3, **overrides):
    """A small GPT with large random weights, so attention is sharp and any cache mistake shows in the logits."""
    config = dict(block_size=8, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    config.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0.0, std)
    return model.eval()


def reference_logits(model, idx):
    """Independent of the cache code: one plain forward pass over the last block_size tokens."""
    with torch.no_grad():
        logits, _ = model(idx[:, -model.config.block_size:])
    return logits[:, -1, :]


def naive_greedy(model, idx, n):
    for _ in range(n):
        idx = torch.cat([idx, reference_logits(model, idx).argmax(-1, keepdim=True)], dim=1)
    return idx


# ---------------------------------------------------------------- the KV cache

@pytest.mark.parametrize("prompt_len", [1, 5, 12])   # 12 > block_size: the prompt itself is cropped
def test_cached_logits_equal_uncached_at_every_step_past_block_size(prompt_len):
    model = make_model()
    tokens = torch.randint(0, 37, (3, 30), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model, 3, model.config.block_size)
    with torch.no_grad():
        for t in range(prompt_len, 31):
            cached = next_logits(model, tokens[:, :t], cache)
            expected = reference_logits(model, tokens[:, :t])
            assert cached.shape == (3, 37)
            torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0, msg=f"step with {t} tokens")
            assert cache.length == min(t, model.config.block_size)


def test_the_cache_is_really_used():
    """Equal logits alone would also hold for code that ignores the cache: count the tokens fed."""
    model = make_model()
    fed = []
    model.transformer.wte.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].size(1)))
    generate(model, torch.tensor([[1, 2, 3]]), 10, temperature=0)   # 3 + 10 tokens, block_size 8
    # prefill 3, then one token per step until the window is full (8), then the whole window each step
    assert fed == [3, 1, 1, 1, 1, 1, 8, 8, 8, 8]
    fed.clear()
    generate(model, torch.tensor([[1, 2, 3]]), 10, temperature=0, use_cache=False)
    assert fed == [3, 4, 5, 6, 7, 8, 8, 8, 8, 8]


def test_kvcache_preallocates_and_returns_views():
    model = make_model()
    cache = KVCache(model, batch_size=2, max_len=6)
    assert cache.length == 0 and len(cache.layers) == 2
    layer = cache.layer(0)
    assert layer.k.shape == layer.v.shape == (2, 2, 6, 8)   # (B, n_head, max_len, head_size)
    k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    all_k, all_v = layer.update(k, v)
    assert layer.length == 4 and all_k.shape == (2, 2, 4, 8)
    assert all_k.data_ptr() == layer.k.data_ptr()              # a view of the buffer, not a copy
    k2, v2 = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    all_k, all_v = layer.update(k2, v2)
    assert torch.equal(all_k, torch.cat([k, k2], dim=2)) and torch.equal(all_v, torch.cat([v, v2], dim=2))
    with pytest.raises(ValueError, match="overflow"):
        layer.update(k2[:, :, :1], v2[:, :, :1])
    with pytest.raises(ValueError, match="do not fit"):
        cache.layer(1).update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(RuntimeError, match="reset"):
        cache.length                                            # layer 0 holds 6, layer 1 holds 0
    cache.reset()
    assert cache.length == 0


def test_kvcache_checks_and_defaults():
    config = GPTConfig(block_size=8, vocab_size=37, n_layer=3, n_head=2, n_embd=16)
    cache = KVCache(config, 1, 8)
    assert len(cache.layers) == 3 and cache.layer(2).k.dtype == torch.float32
    assert KVCache(config, 1, 8, dtype=torch.float64).layer(0).k.dtype == torch.float64
    with pytest.raises(ValueError, match="block_size"):
        KVCache(config, 1, 9)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            KVCache(config, bad, 4)


def test_model_refuses_to_run_past_a_full_cache():
    model = make_model()
    cache = KVCache(model, 1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------- generate()

def test_greedy_is_identical_with_and_without_cache_and_matches_a_naive_loop():
    model = make_model()
    prompt = torch.tensor([[5, 6, 7], [1, 1, 2]])
    cached = generate(model, prompt, 25, temperature=0)
    assert cached.shape == (2, 28) and cached.dtype == torch.long
    assert torch.equal(cached, generate(model, prompt, 25, temperature=0, use_cache=False))
    assert torch.equal(cached, naive_greedy(model, prompt, 25))


def test_sampling_is_identical_with_and_without_cache_for_the_same_seed():
    model = make_model(std=0.1)
    prompt = torch.tensor([[3]])
    a = generate(model, prompt, 20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 20, top_p=0.9, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_seeded_output_repeats_and_seeds_differ():
    model = make_model(std=0.05)   # flat distributions: different seeds must give different text
    prompt = torch.tensor([[1, 2]])
    runs = [generate(model, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    torch.manual_seed(11)                                     # without a generator: the global RNG
    c = generate(model, prompt, 30)
    torch.manual_seed(11)
    assert torch.equal(c, generate(model, prompt, 30))


def test_stop_tokens_end_each_row_and_pad_with_the_stop_token():
    model = make_model()
    prompt = torch.tensor([[5, 6, 7], [1, 1, 2]])
    full = naive_greedy(model, prompt, 20)
    new = full[:, 3:]
    # a stop token that appears in row 0's continuation; find where each row first produces it
    stop = int(new[0, 4])
    firsts = [next((i for i, t in enumerate(row.tolist()) if t == stop), None) for row in new]
    out = generate(model, prompt, 20, temperature=0, stop_tokens=[stop])
    ends = [f if f is not None else 19 for f in firsts]
    assert out.size(1) == 3 + max(ends) + 1                  # the loop ends when every row has stopped
    for row, first in enumerate(firsts):
        if first is None:
            assert torch.equal(out[row], full[row, :out.size(1)])
        else:
            assert torch.equal(out[row, :3 + first + 1], full[row, :3 + first + 1])   # stop token kept
            assert (out[row, 3 + first:] == stop).all()                               # then padding
    # batch of one: stops right after the stop token
    single = generate(model, prompt[:1], 20, temperature=0, stop_tokens={stop})
    assert single.size(1) == 3 + firsts[0] + 1 and int(single[0, -1]) == stop


def test_zero_new_tokens_returns_the_prompt_and_dropout_is_off_and_mode_restored():
    model = make_model(dropout=0.5).train()
    prompt = torch.tensor([[4, 2]])
    assert torch.equal(generate(model, prompt, 0), prompt)
    a = generate(model, prompt, 12, temperature=0)
    b = generate(model, prompt, 12, temperature=0)
    assert torch.equal(a, b), "dropout was active during generation"
    assert model.training, "generate() must put the model back in training mode"
    assert not a.is_inference() and not a.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"stop_tokens": [37]}, "stop_tokens"),
    ({"stop_tokens": 3}, r"list of token ids, e\.g\. \[3\]"),
    ({"n_vocab": 0}, "n_vocab"),
    ({"n_vocab": 38}, r"n_vocab must be None or an int in \[1, 37\]"),
    ({"idx": torch.zeros(1, 0, dtype=torch.long)}, "empty prompt"),
    ({"idx": torch.tensor([1, 2, 3])}, "batch, time"),
    ({"idx": torch.tensor([[1.0, 2.0]])}, r"idx holds torch.float32.*idx.long\(\)"),
    ({"idx": torch.tensor([[1, 99]])}, r"\[0, 37\)"),
])
def test_bad_arguments_are_refused(kwargs, match):
    model = make_model()
    args = {"idx": torch.tensor([[1, 2]]), "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


@pytest.mark.parametrize("temperature", [0, 1.0, 5.0])
def test_n_vocab_keeps_padded_ids_out_of_the_samples(temperature):
    model = make_model(vocab_size=64)              # as if a 40-token vocabulary had been padded to 64
    with torch.no_grad():
        model.lm_head.weight[40:] *= 10            # make the padded ids tempting
    out = generate(model, torch.tensor([[1, 2], [3, 4]]), 30, temperature=temperature, n_vocab=40,
                   generator=torch.Generator().manual_seed(0))
    assert out[:, 2:].max() < 40
    free = generate(model, torch.tensor([[1, 2], [3, 4]]), 30, temperature=temperature,
                    generator=torch.Generator().manual_seed(0))
    assert free[:, 2:].max() >= 40                 # without it they do come up: the test can fail


def test_check_sampling_args_accepts_the_edges():
    check_sampling_args(0, temperature=0, top_k=1, top_p=1.0)
    check_sampling_args(5, temperature=2.5, top_k=None, top_p=1e-6)


# ---------------------------------------------------------------- the filters

def test_top_k_never_samples_outside_the_top_k():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    top = torch.topk(logits, 5, dim=-1).indices
    draws = sample_next(logits.repeat_interleave(500, dim=0), top_k=5, generator=torch.Generator().manual_seed(1))
    allowed = top.repeat_interleave(500, dim=0)
    assert (draws == allowed).any(dim=-1).all()
    assert len(draws.unique()) > 10                            # it did sample, from more than one row's argmax


def test_top_p_keeps_the_smallest_nucleus_of_a_crafted_distribution():
    probs = torch.tensor([0.05, 0.40, 0.005, 0.15, 0.25, 0.03, 0.10, 0.015])
    logits = probs.log()
    order = [1, 4, 3, 6, 0, 5, 7, 2]                           # token ids by decreasing probability
    for p, size in [(0.2, 1), (0.39, 1), (0.41, 2), (0.7, 3), (0.79, 3), (0.81, 4), (0.99, 7), (1.0, 8)]:
        kept = set(torch.nonzero(top_p_filter(logits, p).isfinite()).flatten().tolist())
        assert kept == set(order[:size]), (p, kept)
    draws = sample_next(logits.expand(5000, 8), top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == {1, 4, 3}          # never outside, and every nucleus member appears
    wide = torch.randn(3, 50_304, generator=torch.Generator().manual_seed(0)) * 5
    assert top_p_filter(wide, 1.0).isfinite().all()             # p = 1 keeps every token of a large vocabulary
    one = top_p_filter(logits, 1e-9)                            # tiny p still keeps the most likely token
    assert torch.nonzero(one.isfinite()).flatten().tolist() == [1]


def test_filters_agree_with_hugging_face_warpers():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 7, 500):
        expected = warpers.TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k).isfinite(), expected.isfinite())
    for p in (0.1, 0.5, 0.9, 0.999):
        expected = warpers.TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, p).isfinite(), expected.isfinite())


def test_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert sample_next(logits, temperature=0).tolist() == [[0]]
    gen = torch.Generator().manual_seed(0)
    for t in (0.5, 2.0):
        draws = sample_next(logits.expand(40_000, 4), temperature=t, generator=gen)[:, 0]
        freq = torch.bincount(draws, minlength=4) / len(draws)
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, dim=0), atol=0.01, rtol=0)


# ---------------------------------------------------------------- the commands

def save_tiny_checkpoint(path, tokenizer_info="char", model=None):
    """A checkpoint written by lesson 06's save_checkpoint, of `model` (default: a tiny random one) with a
    char tokenizer of 9 characters."""
    from nanolib.tokenizer import CharTokenizer
    from nanolib.train import save_checkpoint

    tok = CharTokenizer.from_text("hello world\n")
    model = make_model(vocab_size=tok.n_vocab, std=0.1) if model is None else model
    info = tok.info() if tokenizer_info == "char" else tokenizer_info
    save_checkpoint(path, model, None, {"note": "test"}, step=0, data_state={}, tokenizer_info=info)
    return model, tok


def test_sample_command_samples_repeatably_from_a_checkpoint(tmp_path, capsys):
    from nanolib.sample import main

    model, tok = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    argv = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=hello", "--max_new_tokens=12", "--num_samples=3",
            "--seed=4", "--top_k=5", "--device=cpu"]
    texts = main(argv)
    printed = capsys.readouterr().out
    assert len(texts) == 3 and all(t.startswith("hello") and len(t) == 5 + 12 for t in texts)
    assert all(t in printed for t in texts) and len(set(texts)) > 1
    assert main(argv) == texts                                    # seeded: the same samples again
    # the options reach generate(): the same draws, made directly
    gen = torch.Generator().manual_seed(4)
    prompt = torch.tensor([tok.encode("hello")])
    direct = [tok.decode(generate(model, prompt, 12, temperature=0.8, top_k=5, generator=gen)[0].tolist())
              for _ in range(3)]
    assert texts == direct
    # greedy through the command equals an independent greedy loop
    greedy = main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=hello", "--max_new_tokens=12", "--temperature=0"])
    assert greedy == [tok.decode(naive_greedy(model, prompt, 12)[0].tolist())]


@pytest.mark.parametrize("case, extra, match", [
    ("missing", [], "no checkpoint at"),
    ("corrupt", [], "not a readable checkpoint"),
    ("not_ours", [], "not a nanolib checkpoint"),
    ("no_tokenizer", [], "carries no tokenizer"),
    ("good", ["--prompt=hello!"], "not in this tokenizer's vocabulary"),
    ("good", ["--prompt="], "--prompt is empty"),
    ("good", ["--top_k=0"], "top_k"),
    ("good", ["--top_p=2"], "top_p"),
    ("good", ["--temperature=-1"], "temperature"),
    ("good", ["--max_new_tokens=-5"], "max_new_tokens"),
    ("good", ["--num_samples=0"], "num_samples"),
    ("good", ["--seed=-1"], "seed"),
])
def test_sample_command_refuses_bad_input_before_building_a_model(tmp_path, monkeypatch, case, extra, match):
    import nanolib.sample as sample_module

    path = tmp_path / "ckpt.pt"
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif case == "not_ours":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case != "missing":
        save_tiny_checkpoint(path, tokenizer_info=None if case == "no_tokenizer" else "char")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(sample_module, "model_from_checkpoint", no_model)
    with pytest.raises(SystemExit, match=match):
        sample_module.main([f"--ckpt={path}", *extra])


def test_sample_command_checks_options_before_reading_the_checkpoint(tmp_path):
    from nanolib.sample import main

    with pytest.raises(SystemExit, match="top_p"):          # not "no checkpoint": the cheap checks come first
        main([f"--ckpt={tmp_path / 'missing.pt'}", "--top_p=0"])


def test_sample_command_runs_as_a_module(tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt.pt")
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanolib.sample", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=120)
    ok = run(f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=hello", "--max_new_tokens=8", "--device=cpu")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("hello") and "-" * 40 in ok.stdout
    missing = run(f"--ckpt={tmp_path / 'nope.pt'}")
    assert missing.returncode != 0
    assert "nanolib.sample: error: no checkpoint at" in missing.stderr and "Traceback" not in missing.stderr


def test_bench_command_returns_its_numbers():
    from nanolib.generate import bench

    timings = bench(["--bench", "--lengths=2,3", "--repeats=1", "--device=cpu"])
    assert list(timings) == [2, 3] and all(a > 0 and b > 0 for a, b in timings.values())
    plain = bench(["--bench", "--lengths=2", "--repeats=1", "--device=cpu", "--matvec=torch"])
    assert list(plain) == [2]
    for argv in (["--bench", "--lengths=0"], [], ["--bench", "--matvec=fast"]):
        with pytest.raises(SystemExit):
            bench(argv)


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-39, 1e-45):
        assert sample_next(logits, temperature=temperature).flatten().tolist() == [1, 0]


def test_a_prompt_of_the_wrong_dtype_names_the_fix():
    model = make_model()
    with pytest.raises(ValueError, match=r"idx holds torch.uint16.*idx.long\(\)"):
        generate(model, torch.tensor([[1, 2]], dtype=torch.uint16), 2)


def test_the_sample_command_accepts_endoftext_as_a_prompt(tmp_path, monkeypatch):
    import nanolib.sample
    from nanolib.core import gpt2_encoding

    monkeypatch.setattr(nanolib.sample, "load_tokenizer", lambda info: gpt2_encoding())  # GPT-2's tokenizer
    prompts = []

    def record_the_prompt(model, prompt, *args, **kwargs):
        prompts.append(prompt.tolist())
        return prompt

    monkeypatch.setattr(nanolib.sample, "generate", record_the_prompt)
    save_tiny_checkpoint(tmp_path / "ckpt.pt")
    texts = nanolib.sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=<|endoftext|>", "--device=cpu",
                                 "--num_samples=1"])
    assert prompts == [[[50256]]] and texts == ["<|endoftext|>"]

# Behaviours no test checked until mutation testing (breaking the code on purpose, one change at a time)
# showed it: each test below fails on the change it was written for.


def test_rows_that_stop_early_are_padded_not_continued():
    model = make_model()
    prompt = torch.tensor([[5, 6, 7], [1, 1, 2]])
    full = naive_greedy(model, prompt, 20)
    stop = int(full[1, 3])                          # row 1 stops at its first new token...
    assert int(full[1, 4]) != stop and stop not in full[0, 3:].tolist()   # ...and would go on otherwise
    out = generate(model, prompt, 20, temperature=0, stop_tokens=[stop])
    assert out.shape == (2, 23) and torch.equal(out[0], full[0])
    assert (out[1, 3:] == stop).all()


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_k_filter(logits, 50), logits)
    sample_next(logits, top_k=50, generator=torch.Generator().manual_seed(0))


def test_top_p_drops_a_token_once_the_mass_above_it_reaches_p_exactly():
    logits = torch.zeros(1, 4)                      # four tokens of probability 0.25 exactly
    assert top_p_filter(logits, 0.5).isfinite().sum() == 2
    assert top_p_filter(logits, 0.75).isfinite().sum() == 3


def test_temperature_is_applied_before_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    draws = sample_next(probs.log().expand(2000, 3), temperature=0.25, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    # at T=0.25 the probabilities are ~[0.87, 0.11, 0.02]: the 0.9-nucleus is {0, 1}, not all three
    assert set(draws.flatten().tolist()) == {0, 1}


def test_next_logits_with_a_cache_that_already_holds_the_prompt():
    model = make_model()
    idx = torch.tensor([[1, 2, 3, 4]])
    cache = KVCache(model, 1, 8)
    with torch.no_grad():
        next_logits(model, idx, cache)
        again = next_logits(model, idx, cache)          # the same prompt again, or a shorter one
        shorter = next_logits(model, idx[:, :2], cache)
    torch.testing.assert_close(again, reference_logits(model, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(shorter, reference_logits(model, idx[:, :2]), atol=1e-5, rtol=0)


def test_sample_command_keeps_padded_ids_out(tmp_path):
    from nanolib.sample import main
    model = make_model(vocab_size=64, std=0.1)            # vocabulary padded past the tokenizer's 9
    with torch.no_grad():
        model.lm_head.weight[9:] *= 20                    # make the padded ids tempting
    save_tiny_checkpoint(tmp_path / "ckpt.pt", model=model)
    for t in ("0", "1.0"):
        texts = main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=hello", "--max_new_tokens=20",
                      f"--temperature={t}", "--device=cpu"])
        assert len(texts[0]) == 25


def test_sample_command_passes_top_p_on(tmp_path, monkeypatch):
    import nanolib.sample
    save_tiny_checkpoint(tmp_path / "ckpt.pt")
    seen = []
    monkeypatch.setattr(nanolib.sample, "generate", lambda model, prompt, *a, **kw: seen.append(kw) or prompt)
    nanolib.sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=hello", "--top_p=0.7", "--top_k=3", "--device=cpu"])
    assert seen[0]["top_p"] == 0.7 and seen[0]["top_k"] == 3


def test_generate_leaves_an_eval_model_in_eval_mode():
    model = make_model(dropout=0.5)          # make_model returns it in eval mode
    generate(model, torch.tensor([[1, 2]]), 3)
    assert not model.training


# ---------------------------------------------------------------- the batched one-row product (CPU)

@pytest.mark.parametrize("out_features, in_features, shape", [(48, 16, (1, 16)), (64, 16, (1, 1, 16)),
                                                              (16, 64, (64,))])
def test_one_row_linear_computes_what_f_linear_does(out_features, in_features, shape):
    torch.manual_seed(0)
    weight, bias, row = torch.randn(out_features, in_features), torch.randn(out_features), torch.randn(shape)
    for b in (None, bias):
        torch.testing.assert_close(one_row_linear(row, weight, b), F.linear(row, weight, b), atol=1e-5, rtol=1e-5)


def route_counter(monkeypatch):
    """Record the input shape of every product handed to one_row_linear."""
    import nanolib.generate as G

    calls, real = [], G.one_row_linear

    def recording(input, *args, **kwargs):
        calls.append(input.shape)
        return real(input, *args, **kwargs)

    monkeypatch.setattr(G, "one_row_linear", recording)
    return calls


def test_use_one_row_linear_routes_only_one_fp32_row_on_the_cpu(monkeypatch):
    calls = route_counter(monkeypatch)
    torch.manual_seed(0)
    layers = torch.nn.ModuleDict({"even": torch.nn.Linear(4, 8), "odd": torch.nn.Linear(4, 7),
                                  "bf16": torch.nn.Linear(4, 8).bfloat16(), "strided": torch.nn.Linear(4, 8),
                                  "subclass": type("MyLinear", (torch.nn.Linear,), {})(4, 8)})
    layers.strided.weight = torch.nn.Parameter(torch.randn(4, 8).t())   # not contiguous
    row, rows = torch.randn(1, 1, 4), torch.randn(2, 4)
    expected = {name: layer(row.to(layer.weight.dtype)) for name, layer in layers.items()}
    with torch.no_grad(), use_one_row_linear(layers):
        for name, layer in layers.items():                 # each gives what it gave before
            torch.testing.assert_close(layer(row.to(layer.weight.dtype)), expected[name])
        layers.even(rows)                                  # two rows: F.linear
        with pytest.raises(RuntimeError):                  # a wrong width gets F.linear's own error
            layers.even(torch.randn(1, 5))
    layers.even(row)                                       # outside the block
    assert calls == [(1, 1, 4)]                            # only the even fp32 contiguous nn.Linear, one row
    assert all("forward" not in vars(layer) for layer in layers.values())


def test_use_one_row_linear_restores_the_layers_after_an_error_and_nests():
    layer = torch.nn.Linear(4, 8)
    with use_one_row_linear(layer) as same:
        assert same is layer
    with pytest.raises(KeyError):
        with use_one_row_linear(layer):
            assert "forward" in vars(layer)
            raise KeyError("inside")
    assert "forward" not in vars(layer)
    with use_one_row_linear(layer):
        patched = vars(layer)["forward"]
        with use_one_row_linear(layer):                    # the inner block leaves the outer one's forward
            assert vars(layer)["forward"] is patched
        assert vars(layer)["forward"] is patched
    assert "forward" not in vars(layer)


def test_cached_logits_with_one_row_linear_equal_the_plain_forward_pass():
    model = make_model()
    tokens = torch.randint(0, 37, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model, 1, model.config.block_size)
    with torch.no_grad():
        for t in range(1, 21):
            expected = reference_logits(model, tokens[:, :t])
            with use_one_row_linear(model):
                cached = next_logits(model, tokens[:, :t], cache)
            torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0, msg=f"step with {t} tokens")


def test_one_row_linear_stays_out_of_autocast():
    layer, row = torch.nn.Linear(4, 8), torch.randn(1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(row)
        with use_one_row_linear(layer):
            got = layer(row)
    assert expected.dtype == got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_generate_uses_batched_matvec_on_an_mkl_cpu_unless_told_not_to(monkeypatch):
    calls = route_counter(monkeypatch)
    model, prompt = make_model(), torch.tensor([[1, 2, 3]])
    batched = generate(model, prompt, 12, temperature=0.8, generator=torch.Generator().manual_seed(0))
    products_per_step = 2 * 4        # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj); the odd lm_head is not
    routed = products_per_step * 5 if torch.backends.mkl.is_available() else 0   # 5 one-token steps (positions 4-8)
    assert len(calls) == routed
    plain = generate(model, prompt, 12, temperature=0.8, generator=torch.Generator().manual_seed(0),
                     batched_matvec=False)
    assert len(calls) == routed and torch.equal(batched, plain)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="generate uses one_row_linear only with MKL")
def test_time_generation_passes_batched_matvec_on(monkeypatch):
    calls = route_counter(monkeypatch)
    time_generation(make_model(), [3], batched_matvec=False)
    assert calls == []
    time_generation(make_model(), [3])
    assert len(calls) > 0


def test_bench_passes_its_matvec_choice_to_generate(monkeypatch, capsys):
    import nanolib.generate as G

    seen = []
    monkeypatch.setattr(G, "time_generation", lambda model, lengths, repeats, batched_matvec, graph, on_mismatch:
                        seen.append(batched_matvec) or {n: (1.0, 0.5) for n in lengths})
    G.bench(["--bench", "--lengths=4", "--device=cpu"])
    G.bench(["--bench", "--lengths=4", "--device=cpu", "--matvec=torch"])
    assert seen == [True, False]
    assert "matvec: torch" in capsys.readouterr().out


# ---------------------------------------------------------------- section 6b: the fixed-shape step, CUDA graphs
def test_static_step_equals_the_forward_pass_over_stale_slots():
    from nanolib.generate import StaticKVCache, static_step

    model = make_model(block_size=12)
    tokens = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(1))
    cache = StaticKVCache(model, 3)
    assert cache.k.shape == (2, 3, 2, 12, 8) and cache.positions.tolist() == list(range(12))
    cache.k.normal_(), cache.v.normal_()            # what an earlier, longer call leaves behind
    with torch.no_grad():
        prefill = static_step(model, tokens[:, :4], cache.positions[:4], cache)
        assert (prefill - model(tokens[:, :4])[0]).abs().max() < 1e-5          # every prompt position
        for t in range(5, 13):
            step = static_step(model, tokens[:, t - 1:t], cache.positions[t - 1:t], cache)[:, -1]
            assert (step - reference_logits(model, tokens[:, :t])).abs().max() < 1e-5
        k_before = cache.k.data_ptr()
        static_step(model, tokens[:, :1], cache.positions[:1], cache)       # a new prompt overwrites slot 0
    assert cache.k.data_ptr() == k_before                                  # the buffers never move


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=0.9, top_k=5),
                                    dict(temperature=1.0, top_p=0.8, stop_tokens=[3, 4])])
def test_cuda_graph_generation_gives_the_tokens_of_the_plain_loop(kwargs):
    model = make_model(block_size=16)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for n in (1, 13, 30):                       # within block_size (the decoder) and past it (KVCache)
        seeded = lambda: torch.Generator().manual_seed(7)
        expected = generate(model, prompt, n, use_cache=False, generator=seeded(), **kwargs)
        assert torch.equal(generate(model, prompt, n, cuda_graph=True, generator=seeded(), **kwargs), expected)


def test_graphed_decoder_is_reused_and_made_again_when_what_it_recorded_changes():
    import gc

    import nanolib.generate as G

    model = make_model(block_size=16)
    prompt = torch.tensor([[1, 2, 3]])
    expected = generate(model, prompt, 10, temperature=0, use_cache=False)
    generate(model, prompt, 10, temperature=0, cuda_graph=True)
    first = G._DECODERS[model]
    assert torch.equal(generate(model, prompt[:, :2], 5, temperature=0, cuda_graph=True),
                       generate(model, prompt[:, :2], 5, temperature=0))        # a shorter prompt, same decoder
    assert G._DECODERS[model] is first and first.length == 6
    generate(model, prompt.repeat(2, 1), 4, temperature=0, cuda_graph=True)  # another batch size
    assert G._DECODERS[model] is not first
    second = G._DECODERS[model]
    model.double()                                                            # new weights, new addresses
    again = generate(model, prompt, 10, temperature=0, cuda_graph=True)
    assert G._DECODERS[model] is not second and torch.equal(again, expected)
    with torch.no_grad():                                                     # trained in place: same recording
        for p in model.parameters():
            p.add_(0.01)
    third = G._DECODERS[model]
    assert torch.equal(generate(model, prompt, 10, temperature=0, cuda_graph=True),
                       generate(model, prompt, 10, temperature=0, use_cache=False))
    assert G._DECODERS[model] is third
    del model, first, second, third
    gc.collect()
    assert len(G._DECODERS) == 0                # the registry does not keep a model alive


def test_cuda_graph_needs_the_cache():
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(make_model(), torch.tensor([[1]]), 3, use_cache=False, cuda_graph=True)


def test_bench_times_the_fixed_shape_step_and_checks_its_tokens(capsys):
    from nanolib.generate import bench

    timings = bench(["--bench", "--lengths=2,3", "--repeats=1", "--device=cpu", "--graph"])
    assert list(timings) == [2, 3] and all(len(t) == 3 and min(t) > 0 for t in timings.values())
    out = capsys.readouterr().out
    assert "fixed-shape cache (no graph off CUDA)" in out and "greedy tokens compared" in out and "warning:" not in out
    with pytest.raises(SystemExit):
        bench(["--bench", "--lengths=257"])                  # past the Shakespeare shape's block_size
    assert list(bench(["--bench", "--lengths=1", "--repeats=1", "--device=cpu", "--model=gpt2"])) == [1]


def test_time_generation_refuses_ways_that_disagree(monkeypatch, capsys):
    import nanolib.generate as G

    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, cuda_graph=False, **k: real(*a, **k) + int(cuda_graph))
    with pytest.raises(RuntimeError, match="differs"):
        G.time_generation(make_model(), [3], graph=True)
    timings = G.time_generation(make_model(), [3], graph=True, on_mismatch="warn")   # the bench's: figures kept
    assert len(timings[3]) == 3 and "warning: greedy generation of 3 tokens differs" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: runs in benchmarks/gpu_session.sh")
def test_on_cuda_the_step_is_recorded_once_and_replayed():
    import nanolib.generate as G

    model = make_model(block_size=64).cuda()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    expected = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(generate(model, prompt, 40, temperature=0, cuda_graph=True), expected)
    decoder = G._DECODERS[model]
    assert decoder.graph is not None
    graph = decoder.graph
    assert torch.equal(generate(model, prompt, 40, temperature=0, cuda_graph=True), expected)
    assert G._DECODERS[model].graph is graph            # replayed, not recorded again
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_bf16 = generate(model, prompt, 8, temperature=0)
        assert torch.equal(generate(model, prompt, 8, temperature=0, cuda_graph=True), eager_bf16)
    assert G._DECODERS[model] is not decoder                  # another recording for autocast
    torch.cuda.empty_cache()
    with torch.autocast("cuda", dtype=torch.bfloat16):       # a new autocast block: its weight copies are gone
        torch.randn(4096, 4096, device="cuda")                # and their memory may hold something else
        assert torch.equal(generate(model, prompt, 8, temperature=0, cuda_graph=True), eager_bf16)
