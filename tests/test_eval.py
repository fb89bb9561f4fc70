"""nanolib.eval (lesson 09), HellaSwag: reading the jsonl format, rendering, scores against a brute-force loss, acc vs
acc_norm, batching, ranks (and a real 2-process all-reduce), cropping to block_size, the offline error,
and the Trainer callback. All offline, on the CPU."""
import contextlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolib import eval as E
from nanolib.core import DownloadError, gpt2_encoding
from nanolib.model import GPT, GPTConfig

# ---------------------------------------------------------------- data in HellaSwag's exact format

def hs_example(ind, ctx_a, ctx_b, endings, label, activity="Making a sandwich"):
    """One example with every key of the real file, in its order."""
    ctx = f"{ctx_a} {ctx_b}" if ctx_b else ctx_a
    return {"ind": ind, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
            "split": "val", "split_type": "indomain", "label": label, "endings": endings,
            "source_id": f"activitynet~v_test{ind:04d}"}


EXAMPLES = [
    hs_example(0, "A man stands in a kitchen holding a loaf of bread.", "he",
               ["slices the bread and spreads butter on it.", "throws the bread into the river.",
                "begins to play the violin loudly.", "paints the ceiling a bright red."], 0),
    hs_example(1, "A woman is kneeling beside a bicycle with a flat tire.", "she",
               ["removes the wheel and patches the inner tube.", "rides away on a horse.",
                "eats the tire.", "sings to the bicycle until it is fixed."], 0, "Fixing a bike"),
    hs_example(2, "Two kids are building a sandcastle on the beach.", "the waves",
               ["wash over the castle and flatten it.", "start a conversation about taxes.",
                "climb the stairs into the house.", "turn the sand into chocolate."], 0, "Beach"),
    hs_example(3, "[header] How to water a cactus [title] Check the soil first.", "",
               ["Push a finger into the soil to feel whether it is dry.", "Paint the cactus green.",
                "Buy a new car.", "Sing to the cactus every morning."], 0, "Home and Garden"),
    hs_example(4, "A dog runs across the park chasing a ball.", "the dog",
               ["catches the ball and trots back.", "reads a newspaper.", "drives a bus.",
                "files its taxes."], 1, "Playing fetch"),
    hs_example(5, "A chef places a pan on the stove.", "he",
               ["cracks two eggs into the pan.", "jumps out of the window.", "knits a scarf.",
                "opens an umbrella indoors."], 2, "Cooking"),
    hs_example(6, "People gather on a field with rackets.", "a man",
               ["serves the ball over the net.", "plants a tree.", "swims across.", "sleeps."], 3, "Tennis"),
]


def write_jsonl(path, examples, extra_lines=()):
    lines = [json.dumps(e) for e in examples] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def enc():
    return gpt2_encoding()


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def chars(text):
    """A toy tokenizer: one token per ASCII character."""
    return [ord(c) for c in text]


class Prefers(nn.Module):
    """A stand-in model whose next-token distribution, everywhere, makes one token likely: logit
    `strength` for `token`, 0 for the other 127. It records the rows it is given, and its mode."""

    def __init__(self, token, strength=5.0, block_size=64):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=128)
        self.token, self.strength, self.seen, self.modes = token, strength, [], []
        self.dummy = nn.Parameter(torch.zeros(()))   # so that eval()/train() have something to act on

    def forward(self, idx, targets=None):
        self.seen.append(idx.clone())
        self.modes.append(self.training)
        logits = torch.zeros(*idx.shape, 128)
        logits[..., self.token] = self.strength
        return logits, None


def brute_force(model, encode, example):
    """(sum, mean) loss of each ending, one ending at a time: context + ending through the model alone,
    cross-entropy of the ending's tokens only."""
    ctx = encode(example["ctx"])
    out = []
    for ending in example["endings"]:
        end = encode(" " + ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logits, _ = model(ids)
        loss = F.cross_entropy(logits[0, len(ctx) - 1:-1], ids[0, len(ctx):], reduction="none")
        assert loss.numel() == len(end)
        out.append((loss.sum().item(), loss.mean().item()))
    return torch.tensor(out)   # (4, 2)


# ---------------------------------------------------------------- reading

def test_read_examples_returns_every_example_of_a_hellaswag_file(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", EXAMPLES)
    assert E.read_examples(path) == EXAMPLES
    assert E.read_examples(path, limit=3) == EXAMPLES[:3]
    assert E.read_examples(path, limit=0) == []


BAD_LINES = {
    "not JSON": ('{"ctx": "a", ', "not valid JSON"),
    "a list": ("[1, 2]", "JSON object"),
    "no ctx": (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "ctx"}), "'ctx'"),
    "no label": (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "label"}), "'label'"),
    "3 endings": (json.dumps({**EXAMPLES[0], "endings": ["a", "b", "c"]}), "4 strings"),
    "a number ending": (json.dumps({**EXAMPLES[0], "endings": ["a", "b", "c", 4]}), "4 strings"),
    "label 4": (json.dumps({**EXAMPLES[0], "label": 4}), "0 to 3"),
    "label as a string": (json.dumps({**EXAMPLES[0], "label": "2"}), "0 to 3"),
    "label true": (json.dumps({**EXAMPLES[0], "label": True}), "0 to 3"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_a_bad_line_raises_a_value_error_naming_the_file_and_line_number(tmp_path, name):
    line, why = BAD_LINES[name]
    path = write_jsonl(tmp_path / "bad.jsonl", EXAMPLES[:2], extra_lines=["", line])   # line 4: after a blank
    with pytest.raises(ValueError) as info:
        E.read_examples(path)
    message = str(info.value)
    assert f"{path}, line 4:" in message and why in message, message


def test_a_line_that_is_not_utf8_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(EXAMPLES[0]).encode() + b"\n" + b'{"ctx": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8"):
        E.read_examples(path)


def test_offline_the_download_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError) as info:
        E.hellaswag_val(folder=tmp_path)
    message = str(info.value)
    assert E.HELLASWAG_VAL_URL in message and str(tmp_path / "hellaswag_val.jsonl") in message
    assert E.HELLASWAG_VAL_SHA256 in message and "offline" in message
    assert not (tmp_path / "hellaswag_val.jsonl").exists()


# ---------------------------------------------------------------- rendering and scoring

def test_render_puts_the_context_then_each_spaced_ending_and_masks_the_ending(enc):
    example = EXAMPLES[0]
    tokens, mask, label = E.render_example(example, enc.encode)
    ctx = enc.encode(example["ctx"])
    ends = [enc.encode(" " + e) for e in example["endings"]]
    T = len(ctx) + max(map(len, ends))
    assert tokens.shape == mask.shape == (4, T) and tokens.dtype == mask.dtype == torch.long and label == 0
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end and tokens[i, n:].eq(0).all()
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (T - n)
    assert enc.decode(tokens[0, :len(ctx) + len(ends[0])].tolist()) == example["ctx"] + " " + example["endings"][0]


def test_scores_equal_a_brute_force_per_ending_loss(gpt, enc):
    for example in EXAMPLES[:4]:
        tokens, mask, _ = E.render_example(example, enc.encode)
        with torch.no_grad():
            sum_loss, mean_loss = E.score_endings(gpt, tokens, mask)
        expected = brute_force(gpt, enc.encode, example)
        torch.testing.assert_close(sum_loss, expected[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean_loss, expected[:, 1], rtol=1e-5, atol=1e-5)
        # and the mean once more through the model's own loss, -1 marking the targets it must ignore
        ctx = enc.encode(example["ctx"])
        for i, ending in enumerate(example["endings"]):
            end = enc.encode(" " + ending)
            idx = torch.tensor([ctx + end])
            targets = torch.tensor([[-1] * (len(ctx) - 1) + end + [-1]])
            with torch.no_grad():
                _, loss = gpt(idx, targets)
            assert mean_loss[i].item() == pytest.approx(loss.item(), rel=1e-5)


def test_accuracies_follow_the_brute_force_choices(gpt, enc):
    expected = [brute_force(gpt, enc.encode, ex) for ex in EXAMPLES]
    acc = sum(int(e[:, 0].argmin()) == ex["label"] for e, ex in zip(expected, EXAMPLES)) / len(EXAMPLES)
    acc_norm = sum(int(e[:, 1].argmin()) == ex["label"] for e, ex in zip(expected, EXAMPLES)) / len(EXAMPLES)
    got = E.evaluate_hellaswag(gpt, EXAMPLES, enc.encode, "cpu", batch_examples=3)
    assert got == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": len(EXAMPLES)}


def test_a_model_that_prefers_one_ending_picks_it():
    for k, letter in enumerate("wxyz"):
        model = Prefers(ord(letter))
        examples = [hs_example(i, "It was late.", "she", ["wwww", "xxxx", "yyyy", "zzzz"], label)
                    for i, label in enumerate([k, (k + 1) % 4, (k + 2) % 4])]
        got = E.evaluate_hellaswag(model, examples, chars, "cpu")
        assert got == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3), "n": 3}, letter


def test_acc_and_acc_norm_differ_when_sum_and_mean_disagree():
    """'a' is likely (loss ~0.62 a token), all else unlikely (~5.62): a long ending of 'a's has the lowest
    loss per token but a higher total than the shortest ending."""
    model = Prefers(ord("a"))
    endings = ["b", "a" * 20, "bc", "bcd"]
    sum_loss, mean_loss, _ = E.score_examples(model, [hs_example(0, "Go.", "", endings, 1)], chars, "cpu")
    assert int(sum_loss.argmin()) == 0 and int(mean_loss.argmin()) == 1
    long_is_right = E.evaluate_hellaswag(model, [hs_example(0, "Go.", "", endings, 1)], chars, "cpu")
    short_is_right = E.evaluate_hellaswag(model, [hs_example(0, "Go.", "", endings, 0)], chars, "cpu")
    assert (long_is_right["acc"], long_is_right["acc_norm"]) == (0.0, 1.0)
    assert (short_is_right["acc"], short_is_right["acc_norm"]) == (1.0, 0.0)


def test_batched_scoring_equals_one_example_at_a_time(gpt, enc):
    batched = E.score_examples(gpt, EXAMPLES, enc.encode, "cpu")
    alone = [E.score_examples(gpt, [ex], enc.encode, "cpu") for ex in EXAMPLES]
    for part in range(3):
        torch.testing.assert_close(batched[part], torch.cat([a[part] for a in alone]), rtol=1e-5, atol=1e-5)
    results = [E.evaluate_hellaswag(gpt, EXAMPLES, enc.encode, "cpu", batch_examples=b) for b in (1, 3, 100)]
    assert results[0] == results[1] == results[2]


def test_evaluation_runs_in_eval_mode_and_gives_the_model_back_in_its_mode():
    model = Prefers(ord("x")).train()
    E.evaluate_hellaswag(model, [hs_example(0, "Hi.", "", ["xx", "yy", "zz", "ww"], 0)] * 3, chars, "cpu",
                         batch_examples=2)
    assert model.modes == [False, False] and model.training


def test_ranks_0_and_1_of_a_world_of_2_cover_every_example_once():
    examples = [hs_example(i, chr(ord("A") + i) + " went home.", "", ["xx", "yy", "zz", "ww"], i % 4)
                for i in range(7)]
    seen, results = {}, {}
    for rank in (0, 1):
        model = Prefers(ord("x"))
        results[rank] = E.evaluate_hellaswag(model, examples, chars, "cpu", batch_examples=2, rank=rank, world_size=2)
        rows = torch.cat(model.seen)
        seen[rank] = [chr(c) for c in rows[::4, 0].tolist()]   # every 4th row starts a new example
    assert seen[0] == list("ACEG") and seen[1] == list("BDF")
    whole = E.evaluate_hellaswag(Prefers(ord("x")), examples, chars, "cpu")
    assert results[0]["n"] + results[1]["n"] == whole["n"] == 7
    right = lambda r: round(r["acc"] * r["n"])
    assert right(results[0]) + right(results[1]) == right(whole) == 2   # labels 0 at examples 0 and 4


def _ddp_worker(rank, init_file, examples, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = E.evaluate_hellaswag(Prefers(ord("x")), examples, chars, "cpu", batch_examples=2,
                                      rank=rank, world_size=2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_their_counts_into_the_whole_sets_accuracy(tmp_path):
    examples = [hs_example(i, "She sat down.", "", ["xx", "yy", "zz", "ww"], [0, 0, 1, 0, 2][i]) for i in range(5)]
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), examples, str(tmp_path)), nprocs=2)
    whole = E.evaluate_hellaswag(Prefers(ord("x")), examples, chars, "cpu")
    assert whole == {"acc": 0.6, "acc_norm": 0.6, "n": 5}
    for rank in (0, 1):   # rank 0 alone holds 3 examples, 1 right; rank 1 holds 2, both right
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == whole


def test_long_examples_lose_their_oldest_context_tokens_and_keep_every_ending_token(enc):
    torch.manual_seed(1)
    small = GPT(GPTConfig(block_size=24, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    example = hs_example(0, "On a grey morning, a long line of tired people waits outside the old bakery "
                            "for the doors to open.", "a baker",
                         ["opens the door.", "waves.", "hands out warm bread to everyone.", "sighs."], 2)
    ctx = enc.encode(example["ctx"])
    longest = max(len(enc.encode(" " + e)) for e in example["endings"])
    assert len(ctx) + longest > 24, "the example must be too long for block_size 24"
    kept = 24 - longest
    cropped = {**example, "ctx": enc.decode(ctx[-kept:])}
    assert enc.encode(cropped["ctx"]) == ctx[-kept:]   # so the brute force sees the very same tokens
    sum_loss, mean_loss, _ = E.score_examples(small, [example], enc.encode, "cpu")
    expected = brute_force(small, enc.encode, cropped)
    torch.testing.assert_close(sum_loss[0], expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_loss[0], expected[:, 1], rtol=1e-5, atol=1e-5)

    too_long = {**example, "endings": ["and " * 30, "waves.", "sighs.", "nods."]}
    with pytest.raises(ValueError, match="example 0: an ending of 31 tokens does not fit in block_size 24"):
        E.score_examples(small, [too_long], enc.encode, "cpu")


def test_a_model_that_returns_only_the_last_logits_is_refused():
    class LastOnly(Prefers):
        def forward(self, idx, targets=None):
            return super().forward(idx)[0][:, -1:], None
    with pytest.raises(ValueError, match="every position"):
        E.evaluate_hellaswag(LastOnly(ord("x")), [hs_example(0, "Hi.", "", ["a", "b", "c", "d"], 0)], chars, "cpu")


# ---------------------------------------------------------------- the Trainer callback

def fake_trainer(model, tokenizer=None):
    logs = []
    return SimpleNamespace(raw_model=model, device=torch.device("cpu"), rank=0, world_size=1,
                           autocast=contextlib.nullcontext, log=logs.append, logs=logs,
                           meta={"tokenizer": tokenizer})


def test_the_callback_runs_on_every_nth_evaluation_starting_with_the_first():
    examples = [hs_example(0, "Hi.", "", ["xx", "yy", "zz", "ww"], 0)]
    callback = E.HellaSwagEval(examples, encode=chars, every=2)
    trainer = fake_trainer(Prefers(ord("x")))
    records = [{"step": s} for s in (0, 10, 20, 30, 40)]
    for rec in records:
        callback.on_eval(trainer, rec)
    assert [("hellaswag" in r) for r in records] == [True, False, True, False, True]
    assert records[0]["hellaswag"] == 1.0 and [h["step"] for h in callback.history] == [0, 20, 40]
    assert len(trainer.logs) == 3 and "hellaswag acc_norm 1.0000" in trainer.logs[0]


def test_the_callback_refuses_a_model_trained_on_other_tokens_than_gpt2s():
    callback = E.HellaSwagEval(EXAMPLES)
    char_info = {"kind": "char", "chars": "abc"}
    with pytest.raises(ValueError, match="GPT-2's tokenizer.*encode="):
        callback.on_eval(fake_trainer(Prefers(ord("x")), char_info), {"step": 0})


def test_the_callback_adds_hellaswag_to_the_trainers_eval_records(tmp_path):
    from nanolib import train as T
    from nanolib.data import prepare_tinyshakespeare

    config = T.preset("smoke", data=str(prepare_tinyshakespeare("gpt2")), out_dir=str(tmp_path / "run"),
                      save=False, n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304,
                      max_iters=2, eval_interval=2)
    logs = []
    trainer = T.Trainer(config, log=logs.append)
    callback = E.HellaSwagEval(EXAMPLES, batch_examples=4)
    history = trainer.fit(callbacks=[callback])
    assert [r["step"] for r in history["eval"]] == [0, 2]
    for rec in history["eval"]:
        assert 0.0 <= rec["hellaswag"] <= 1.0
        assert rec["hellaswag"] == pytest.approx(round(rec["hellaswag"] * len(EXAMPLES)) / len(EXAMPLES))
    assert [h["n"] for h in callback.history] == [len(EXAMPLES)] * 2
    assert sum("hellaswag acc_norm" in line for line in logs) == 2
    # the same number as evaluating the trained model directly
    direct = E.evaluate_hellaswag(trainer.raw_model, EXAMPLES, gpt2_encoding().encode, "cpu")
    assert history["eval"][-1]["hellaswag"] == direct["acc_norm"]
