"""Tests of nanolib.tokenizer (lesson 01), against independent implementations: a minbpe-style trainer and
encoder written here, tiktoken's Rust encoder, tiktoken's GPT-2 vocabulary and its split patterns."""
import json
import random

import numpy as np
import pytest
import regex
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str

import nanolib.tokenizer as T
from nanolib.core import gpt2_encoding, tinyshakespeare

# GPT-2's pattern as released in openai/gpt-2 src/encoder.py
GPT2_ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k_base's pattern as tiktoken 0.14 ships it (a faster rewrite of the one minbpe copied)
CL100K_PATTERN_NOW = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                      r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


# ------------------------------------------------------------------ an independent reference BPE

def ref_train(text, vocab_size, pattern):
    """minbpe's RegexTokenizer.train, with ties broken by the smallest pair (as nanolib documents)."""
    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        words = [ref_merge(w, best, new_id) for w in words]
        merges.append(best)
    return merges


def ref_merge(ids, pair, new_id):
    """Replace `pair` left to right, comparing slices (written independently of nanolib's merge_pair)."""
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == list(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def ref_encode(text, merges, pattern):
    rank = {pair: 256 + n for n, pair in enumerate(merges)}
    ids = []
    for chunk in regex.findall(pattern, text):
        part = list(chunk.encode("utf-8"))
        while True:
            candidates = [(rank[p], p) for p in zip(part, part[1:]) if p in rank]
            if not candidates:
                break
            new_id, pair = min(candidates)
            part = ref_merge(part, pair, new_id)
        ids += part
    return ids


@pytest.fixture(scope="module")
def shakespeare():
    return tinyshakespeare().read_text(encoding="utf-8")  # from the data cache, or downloaded and verified


@pytest.fixture(scope="module")
def tok(shakespeare):
    return T.BPETokenizer().train(shakespeare[:200_000], 600)


def random_unicode(rng, n):
    """Text mixing ASCII, accents, combining marks, CJK, emoji (with skin tones, ZWJ), odd whitespace."""
    pools = [
        lambda: rng.choice("abcXYZ019 ,.!?'\"-\n\t\r"),
        lambda: chr(rng.randint(0xC0, 0x17F)),          # Latin-1 and Latin Extended-A
        lambda: chr(rng.randint(0x300, 0x36F)),         # combining marks
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),       # CJK ideographs
        lambda: chr(rng.randint(0x1F300, 0x1FAFF)),     # emoji
        lambda: rng.choice(["\u200d", "\U0001F3FD", "\u00a0", "\u2028", "\u3000", "\x0b", "\x85", "\ufeff"]),
        lambda: rng.choice(["'s", "'LL", " 12345", "  ", "\r\n", "<|", "|>"]),
    ]
    return "".join(rng.choice(pools)() for _ in range(n))


# ------------------------------------------------------------------ split patterns

def test_split_patterns_agree_with_tiktoken_and_gpt2():
    rng = random.Random(0)
    for _ in range(3000):
        s = random_unicode(rng, rng.randint(1, 12))
        assert T.split_chunks(s, T.GPT2_SPLIT_PATTERN) == regex.findall(r50k_pat_str, s) \
            == regex.findall(GPT2_ORIGINAL_PATTERN, s), repr(s)
        if not s[-1].isspace():  # the current cl100k rewrite differs only on whitespace ending the text
            assert T.split_chunks(s, T.GPT4_SPLIT_PATTERN) == regex.findall(CL100K_PATTERN_NOW, s), repr(s)


def test_gpt4_split_examples():
    assert T.split_chunks("WON'T 12345!\n\n  x") == ["WON", "'T", " ", "123", "45", "!\n\n", " ", " x"]


# ------------------------------------------------------------------ training

def test_fast_and_naive_trainers_match_an_independent_reference(shakespeare):
    text = shakespeare[:8_000]
    for pattern in (T.GPT4_SPLIT_PATTERN, T.GPT2_SPLIT_PATTERN):
        expected = ref_train(text, 320, pattern)
        chunks = T.split_chunks(text, pattern)
        assert T.train_merges(chunks, 320) == expected
        assert T.train_merges_naive(chunks, 320) == expected
        assert T.BPETokenizer().train(text, 320, pattern=pattern).merges == expected


def test_ties_break_to_the_smallest_pair():
    # every pair occurs once: the first merge must be the smallest pair, (32, 99) = (" ", "c")
    assert T.train_merges(T.split_chunks("ab cd"), 257) == [(32, 99)]
    assert T.train_merges_naive(T.split_chunks("ab cd"), 257) == [(32, 99)]
    # repeated chunks: counts are weighted, "aaaa" twice gives (97, 97) four times
    assert T.train_merges(["aaaa", "aaaa", "bc"], 258) == [(97, 97), (256, 256)]


def test_training_runs_out_of_pairs_with_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size <= "):
        T.BPETokenizer().train("abc abc", 1000)
    with pytest.raises(ValueError, match="no pair"):
        T.train_merges_naive(["ab"], 258)


def test_special_tokens_are_never_merged_in_training(shakespeare):
    text = "<|endoftext|>".join(shakespeare[i * 500:(i + 1) * 500] for i in range(50)) + "<|endoftext|>"
    text += "<|user_start|>hi<|user_end|>" * 20
    tok = T.BPETokenizer().train(text, 300)
    assert not any(b"<|" in t or b"|>" in t for t in tok.token_bytes[:tok.vocab_size])
    assert tok.encode(text, allowed_special="all").count(tok.eot_token) == 50


# ------------------------------------------------------------------ encode / decode

def test_encode_matches_an_independent_reference_encoder(tok, shakespeare):
    rng = random.Random(1)
    samples = [shakespeare[200_000:230_000]] + [random_unicode(rng, 40) for _ in range(200)]
    for s in samples:
        if "<|" not in s:
            assert tok.encode(s) == ref_encode(s, tok.merges, T.GPT4_SPLIT_PATTERN)


def test_round_trip_of_random_unicode(tok):
    rng = random.Random(2)
    for _ in range(500):
        s = random_unicode(rng, rng.randint(0, 60))
        assert tok.decode(tok.encode(s, disallowed_special=())) == s
        assert tok.decode(tok.encode_ordinary(s)) == s
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_surrogates_are_repaired_as_tiktoken_does(tok):
    enc = tok.to_tiktoken()
    cases = {"lone \ud800 high": "lone \ufffd high", "lone \udfff low": "lone \ufffd low",
             "pair \ud83d\udc4b joined": "pair \U0001F44B joined", "\udc00\ud800": "\ufffd\ufffd"}
    for raw, repaired in cases.items():
        assert tok.decode(tok.encode(raw)) == repaired
        assert tok.encode(raw) == tok.encode(repaired) == enc.encode(raw)


def test_decode_replaces_invalid_utf8(tok):
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.decode(list("é".encode("utf-8"))[:1] + [104]) == "\ufffdh"
    assert tok.decode_bytes([0xC3]) == b"\xc3"


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("To be, or not to be")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "To be, or not to be"


# ------------------------------------------------------------------ special tokens

def test_special_token_policy(tok):
    assert tok.special_tokens == {t: 600 + i for i, t in enumerate(T.DEFAULT_SPECIAL_TOKENS)}
    assert tok.n_vocab == 605 and tok.vocab_size == 600 and tok.eot_token == 600
    assert T.CHAT_SPECIAL_TOKENS == ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
    text = "hi<|user_start|>there<|endoftext|>"
    with pytest.raises(ValueError, match="special token '<\\|user_start\\|>'"):
        tok.encode(text)
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        tok.encode(text, allowed_special={"<|user_start|>"})
    ids = tok.encode(text, allowed_special="all")
    assert ids[-1] == 600 and 601 in ids and tok.decode(ids) == text
    as_text = tok.encode(text, disallowed_special=())
    assert max(as_text) < 600 and tok.decode(as_text) == text
    # allowed one, the other as ordinary text
    mixed = tok.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert mixed[-1] == 600 and 601 not in mixed
    assert T.BPETokenizer(tok.merges, special_tokens=[]).encode(text) == as_text


def test_special_tokens_match_tiktoken(tok):
    enc = tok.to_tiktoken()
    text = "a<|assistant_start|>b<|assistant_end|>c<|endoftext|>"
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    with pytest.raises(ValueError):
        enc.encode(text)


# ------------------------------------------------------------------ tiktoken

def test_tiktoken_wrapper_gives_identical_ids(tok, shakespeare):
    enc = tok.to_tiktoken()
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == tok.n_vocab
    assert enc.encode(shakespeare) == tok.encode(shakespeare)
    rng = random.Random(3)
    for _ in range(300):
        s = random_unicode(rng, rng.randint(1, 50))
        assert enc.encode(s, disallowed_special=()) == tok.encode(s, disallowed_special=()), repr(s)
    ids = tok.encode(shakespeare[:5000])
    assert enc.decode(ids) == tok.decode(ids)


def test_gpt2_ids_through_tiktoken():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("hello world") == [31373, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    rebuilt = T.load_tokenizer(T.tokenizer_info(enc))
    assert T.tokenizer_info(enc) == {"kind": "tiktoken", "name": "gpt2"}
    assert rebuilt.encode("Hello world") == [15496, 995]


# ------------------------------------------------------------------ save / load

def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tok.bpe")
    lines = path.read_text().splitlines()
    assert lines[0] == "nanolib-bpe 1" and lines[-1] == "end" and json.loads(lines[1][8:]) == tok.pattern
    loaded = T.BPETokenizer.load(path)
    assert loaded.info() == tok.info()
    assert loaded.encode("Wherefore art thou?") == tok.encode("Wherefore art thou?")
    assert not list(tmp_path.glob("**/*.tmp")), "atomic_write leaves no temporary file"
    custom = T.BPETokenizer(tok.merges[:10], T.GPT2_SPLIT_PATTERN, ['<|a "quoted"\ttoken|>', "<|é|>"])
    again = T.BPETokenizer.load(custom.save(tmp_path / "custom.bpe"))
    assert again.info() == custom.info()


def test_truncated_files_never_load(tok, tmp_path):
    good = tok.save(tmp_path / "tok.bpe").read_bytes()
    broken = tmp_path / "broken.bpe"
    for cut in list(range(0, len(good) - 1, max(1, len(good) // 60))) + [len(good) - 2]:
        broken.write_bytes(good[:cut])
        with pytest.raises(ValueError, match="broken.bpe"):
            T.BPETokenizer.load(broken)


def _corrupt(text, tok):
    first = "{} {}".format(*tok.merges[0])
    second = "{} {}".format(*tok.merges[1])
    return {
        "bad magic": ("minbpe v1\n" + text.split("\n", 1)[1], "not a tokenizer file"),
        "newer version": (text.replace("nanolib-bpe 1", "nanolib-bpe 2", 1), "version"),
        "binary": (b"\x80\x81\xfe\xff".decode("latin-1") + text, "not a tokenizer file"),
        "merge out of range": (text.replace(f"\n{first}\n", "\n1 999\n", 1), "does not exist yet"),
        "repeated merge": (text.replace(f"\n{second}\n", f"\n{first}\n", 1), "repeats"),
        "not a merge": (text.replace(f"\n{first}\n", "\n1,2\n", 1), "two token ids"),
        "extra line": (text + "1 2\n", "'end'"),
        "bad count": (text.replace("special_tokens 5", "special_tokens five", 1), "count"),
        "count too small": (text.replace("special_tokens 5", "special_tokens 4", 1), "merges"),
        "bad pattern json": (text.replace('pattern "', "pattern ", 1), "JSON"),
        "bad regex": (text.split("\n", 2)[0] + '\npattern "(unclosed"\n' + text.split("\n", 2)[2], "regular"),
        "special token not a str": (text.replace('"<|user_end|>"', "42", 1), "special token"),
        "empty": ("", "truncated"),
    }


@pytest.mark.parametrize("case", ["bad magic", "newer version", "binary", "merge out of range", "repeated merge",
                                  "not a merge", "extra line", "bad count", "count too small", "bad pattern json",
                                  "bad regex", "special token not a str", "empty"])
def test_corrupt_files_give_clear_errors(tok, tmp_path, case):
    text = tok.save(tmp_path / "tok.bpe").read_text()
    content, message = _corrupt(text, tok)[case]
    bad = tmp_path / "bad.bpe"
    bad.write_bytes(content.encode("latin-1") if case == "binary" else content.encode("utf-8"))
    with pytest.raises(ValueError, match="bad.bpe") as err:
        T.BPETokenizer.load(bad)
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bpe"):
        T.BPETokenizer.load(tmp_path / "nope.bpe")
    with pytest.raises(FileNotFoundError):
        T.BPETokenizer.load(tmp_path)  # a folder is not a tokenizer file


# ------------------------------------------------------------------ the contract

def test_char_tokenizer_contract(shakespeare):
    tok = T.CharTokenizer.from_text(shakespeare)
    assert tok.n_vocab == 65 and tok.chars == "".join(sorted(set(shakespeare)))
    assert tok.info() == {"kind": "char", "chars": tok.chars}
    assert tok.encode("\n !") == [0, 1, 2] and tok.decode(tok.encode(shakespeare[:1000])) == shakespeare[:1000]
    rebuilt = T.load_tokenizer(json.loads(json.dumps(T.tokenizer_info(tok))))
    assert rebuilt.encode("Romeo") == tok.encode("Romeo")
    odd = T.CharTokenizer.from_text("b\ud800a👋")  # a char tokenizer takes any code point, surrogates too
    assert odd.decode(odd.encode("a\ud800")) == "a\ud800"


def test_bpe_info_round_trips_through_json(tok):
    info = T.tokenizer_info(tok)
    assert info["kind"] == "bpe" and len(info["merges"]) == 344
    rebuilt = T.load_tokenizer(json.loads(json.dumps(info)))
    assert rebuilt.info() == info and rebuilt.n_vocab == tok.n_vocab


def test_tokenizer_info_refuses_what_it_cannot_rebuild(tok):
    with pytest.raises(ValueError, match="BPETokenizer"):
        T.tokenizer_info(tok.to_tiktoken())
    with pytest.raises(TypeError):
        T.tokenizer_info(object())


def test_tokenizer_info_refuses_an_encoding_that_only_borrows_a_registered_name(tok):
    # our merges under GPT-2's name: {"kind": "tiktoken", "name": "gpt2"} would load the real GPT-2
    for registered in ["gpt2", "cl100k_base"]:
        with pytest.raises(ValueError, match=f"tiktoken's own '{registered}' encoding"):
            tok.to_tiktoken(registered)
    impostor = tok.to_tiktoken()
    impostor.name = "gpt2"
    with pytest.raises(ValueError, match="is not tiktoken's 'gpt2' encoding"):
        T.tokenizer_info(impostor)
    gpt2 = gpt2_encoding()
    near = tiktoken.Encoding(name="gpt2", pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                             special_tokens={"<|endoftext|>": 50256, "<|pad|>": 50257})  # one extra token
    with pytest.raises(ValueError, match="is not tiktoken's 'gpt2' encoding"):
        T.tokenizer_info(near)
    # a faithful copy (built as tiktoken's README extends encodings) is GPT-2 and may be stored as such
    copy = tiktoken.Encoding(name="gpt2", pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                             special_tokens=gpt2._special_tokens)
    assert copy is not gpt2 and T.tokenizer_info(copy) == {"kind": "tiktoken", "name": "gpt2"}
    assert tok.to_tiktoken("shakespeare").name == "shakespeare"  # any other name is fine


BAD_CALLS = {
    "vocab_size < 256": (lambda t: T.BPETokenizer().train("hello", 255), ValueError),
    "vocab_size float": (lambda t: T.BPETokenizer().train("hello", 300.0), TypeError),
    "vocab_size bool": (lambda t: T.train_merges(["ab"], True), TypeError),
    "train bytes": (lambda t: T.BPETokenizer().train(b"hello", 300), TypeError),
    "train None": (lambda t: T.BPETokenizer().train(None, 300), TypeError),
    "encode bytes": (lambda t: t.encode(b"hello"), TypeError),
    "encode list": (lambda t: t.encode(["hello"]), TypeError),
    "unknown allowed special": (lambda t: t.encode("x", allowed_special={"<|nope|>"}), ValueError),
    "unknown disallowed special": (lambda t: t.encode("x", disallowed_special={"<|nope|>"}), ValueError),
    "allowed special as str": (lambda t: t.encode("x", allowed_special="<|endoftext|>"), TypeError),
    "decode str": (lambda t: t.decode("hello"), TypeError),
    "decode floats": (lambda t: t.decode([1.0, 2.0]), TypeError),
    "decode out of range": (lambda t: t.decode([0, 605]), ValueError),
    "decode negative": (lambda t: t.decode([-1]), ValueError),
    "decode 2-D tensor": (lambda t: t.decode(torch.zeros(2, 2, dtype=torch.long)), TypeError),
    "special_tokens str": (lambda t: T.BPETokenizer(special_tokens="<|endoftext|>"), TypeError),
    "special_tokens repeated": (lambda t: T.BPETokenizer(special_tokens=["<|a|>", "<|a|>"]), ValueError),
    "special token empty": (lambda t: T.BPETokenizer(special_tokens=[""]), ValueError),
    "special token surrogate": (lambda t: T.BPETokenizer(special_tokens=["<|\ud800|>"]), ValueError),
    "pattern not str": (lambda t: T.BPETokenizer(pattern=None), TypeError),
    "pattern invalid": (lambda t: T.BPETokenizer(pattern="(unclosed"), ValueError),
    "pattern with group": (lambda t: T.BPETokenizer(pattern=r"(\w+)|\s+"), ValueError),
    "pattern skipping text": (lambda t: T.BPETokenizer().train("hello, world", 260, pattern=r"\w+"), ValueError),
    "merges future id": (lambda t: T.BPETokenizer([(1, 2), (256, 300)]), ValueError),
    "merges not pairs": (lambda t: T.BPETokenizer([(1, 2, 3)]), ValueError),
    "merges str": (lambda t: T.BPETokenizer("12"), TypeError),
    "char tokenizer unknown char": (lambda t: T.CharTokenizer.from_text("abc").encode("abd"), ValueError),
    "char tokenizer empty": (lambda t: T.CharTokenizer.from_text(""), ValueError),
    "char tokenizer repeated": (lambda t: T.CharTokenizer("aab"), ValueError),
    "char tokenizer bytes": (lambda t: T.CharTokenizer.from_text(b"abc"), TypeError),
    "load_tokenizer not dict": (lambda t: T.load_tokenizer("gpt2"), TypeError),
    "load_tokenizer unknown kind": (lambda t: T.load_tokenizer({"kind": "wordpiece"}), ValueError),
    "load_tokenizer char no chars": (lambda t: T.load_tokenizer({"kind": "char"}), ValueError),
    "load_tokenizer bpe partial": (lambda t: T.load_tokenizer({"kind": "bpe", "version": 1}), ValueError),
    "load_tokenizer bpe version": (lambda t: T.load_tokenizer({**t.info(), "version": 9}), ValueError),
    "load_tokenizer unknown tiktoken": (lambda t: T.load_tokenizer({"kind": "tiktoken", "name": "x"}), ValueError),
    "split_chunks bytes": (lambda t: T.split_chunks(b"abc"), TypeError),
    "train_merges on a str": (lambda t: T.train_merges("hello world", 260), TypeError),
    "encode allowed_special none": (lambda t: t.encode("x", allowed_special=None), TypeError),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_inputs_raise_clear_errors(tok, name):
    call, error = BAD_CALLS[name]
    with pytest.raises(error) as err:
        call(tok)
    assert len(str(err.value)) > 20, "the message should say what is wrong and how to fix it"
