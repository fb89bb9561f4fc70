"""Tests for nanolib.data (lesson 02): loading text, token shards, the batch sampler.

Each test checks against something independent of the code under test: tiktoken itself, numpy's
generator called as the contract says, token ids that spell out their own position in the stream.
No test needs the network: the Hub is switched to offline mode, downloads use file:// URLs.
"""
import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # for anything that imports huggingface_hub after this point

import numpy as np
import pytest
import torch

import nanolib.data as data
from nanolib.core import DownloadError, data_dir, gpt2_encoding


# ---------------------------------------------------------------- helpers

class NumberTokenizer:
    """'0 1 2 ...' -> [0, 1, 2, ...]: every token id says where it came from."""

    def __init__(self, n_vocab=10_000):
        self.n_vocab = n_vocab

    def encode(self, text):
        return [int(word) for word in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def info(self):
        return {"kind": "numbers", "n_vocab": self.n_vocab}


class WideTokenizer:
    """Bytes shifted past 65535, so that only uint32 can hold them."""
    n_vocab = 65536 + 256

    def encode(self, text):
        return [65536 + b for b in text.encode("utf-8")]

    def info(self):
        return {"kind": "wide"}


class ByteTokenizer:
    n_vocab = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def info(self):
        return {"kind": "bytes"}


def numbers(n, start=0):
    return " ".join(str(i) for i in range(start, start + n))


def stream_of(out_dir, split):
    """A split's tokens, read back with numpy alone from the files meta.json lists."""
    meta = json.loads((out_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    parts = [np.fromfile(out_dir / s["file"], dtype=dtype) for s in meta["shards"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@pytest.fixture
def offline(monkeypatch):
    """The Hub in offline mode, as HF_HUB_OFFLINE=1 would set it, whatever was imported before."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def stream_dir(tmp_path):
    """1,000 tokens 0..999, 900 train (in shards of 64) and 100 val."""
    return data.write_shards(numbers(1000), NumberTokenizer(), tmp_path / "numbers", shard_tokens=64)


# ---------------------------------------------------------------- dtype, shards, meta

@pytest.mark.parametrize("n_vocab, expected", [(1, np.uint16), (65, np.uint16), (50257, np.uint16),
                                               (65536, np.uint16), (65537, np.uint32), (100277, np.uint32)])
def test_token_dtype_is_the_smallest_that_holds_every_id(n_vocab, expected):
    assert data.token_dtype(n_vocab) == expected
    assert np.iinfo(expected).max >= n_vocab - 1


@pytest.mark.parametrize("n_vocab", [0, -5, 2**32 + 1, 3.5])
def test_token_dtype_rejects_nonsense(n_vocab):
    with pytest.raises(ValueError, match="n_vocab"):
        data.token_dtype(n_vocab)


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    text = "héllo wörld, " * 50
    out = data.write_shards(text, WideTokenizer(), tmp_path / "wide")
    meta = data.read_meta(out)
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([stream_of(out, "train"), stream_of(out, "val")])
    assert ids.tolist() == [65536 + b for b in text.encode("utf-8")]
    assert (out / "train_0000.bin").stat().st_size == 4 * meta["train_tokens"]


def test_uint16_files_are_two_bytes_a_token(tmp_path):
    out = data.write_shards("to be or not to be " * 30, ByteTokenizer(), tmp_path / "bytes")
    meta = data.read_meta(out)
    assert meta["dtype"] == "uint16"
    assert (out / "train_0000.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (out / "val_0000.bin").stat().st_size == 2 * meta["val_tokens"]


def test_meta_round_trip_and_tokens_equal_tiktoken(tmp_path):
    enc = gpt2_encoding()
    docs = ["First Citizen:\nBefore we proceed any further, hear me speak.",
            "All:\nSpeak, speak.", "<|endoftext|> is text here, not a special token"]
    out = data.write_shards(docs, enc, tmp_path / "gpt2", val_fraction=0.25, shard_tokens=7)
    expected = enc.encode_ordinary(docs[0]) + [enc.eot_token] + enc.encode_ordinary(docs[1]) + \
        [enc.eot_token] + enc.encode_ordinary(docs[2])
    meta = data.read_meta(out)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
    assert (meta["dtype"], meta["n_vocab"]) == ("uint16", 50257)
    n_train = int(len(expected) * 0.75)
    assert (meta["train_tokens"], meta["val_tokens"]) == (n_train, len(expected) - n_train)
    assert stream_of(out, "train").tolist() == expected[:n_train]
    assert stream_of(out, "val").tolist() == expected[n_train:]
    sizes = [s["tokens"] for s in meta["shards"]["train"]]
    assert all(n == 7 for n in sizes[:-1]) and 0 < sizes[-1] <= 7 and sum(sizes) == n_train
    assert [s["file"] for s in meta["shards"]["train"]] == [f"train_{i:04d}.bin" for i in range(len(sizes))]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [s["file"] for split in meta["shards"].values() for s in split])


def test_explicit_separator_and_none(tmp_path):
    out = data.write_shards(["ab", "cd"], ByteTokenizer(), tmp_path / "sep", val_fraction=0.0, separator=0)
    assert stream_of(out, "train").tolist() == [97, 98, 0, 99, 100]
    out = data.write_shards(["", "ab", "", "cd", ""], ByteTokenizer(), tmp_path / "sep", val_fraction=0.0,
                            separator=0)
    assert stream_of(out, "train").tolist() == [97, 98, 0, 99, 100], "empty documents add no separator"
    out = data.write_shards(["ab", "cd"], ByteTokenizer(), tmp_path / "nosep", val_fraction=0.0)
    assert stream_of(out, "train").tolist() == [97, 98, 99, 100]  # no eot_token: plain concatenation


def test_rewrite_removes_stale_shards(tmp_path):
    out = data.write_shards(numbers(500), NumberTokenizer(), tmp_path / "d", shard_tokens=50)
    assert (out / "train_0008.bin").exists()
    data.write_shards(numbers(100), NumberTokenizer(), out, shard_tokens=50)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_0000.bin", "train_0001.bin", "val_0000.bin"]


class _HalfWriter:
    """A file whose write() stops half-way with a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, payload):
        self.f.write(bytes(payload)[:len(payload) // 2])
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fail_at", [1, 3])
def test_failure_mid_write_leaves_no_shard_and_no_meta(tmp_path, monkeypatch, fail_at):
    real_atomic_write, calls = data.atomic_write, []

    @contextlib.contextmanager
    def flaky_atomic_write(path, mode="wb"):
        calls.append(path)
        with real_atomic_write(path, mode) as f:
            yield _HalfWriter(f) if len(calls) == fail_at else f

    out = tmp_path / "d"
    data.write_shards(numbers(500), NumberTokenizer(), out, shard_tokens=100)  # a complete earlier run
    monkeypatch.setattr(data, "atomic_write", flaky_atomic_write)
    with pytest.raises(OSError, match="No space"):
        data.write_shards(numbers(400), NumberTokenizer(), out, shard_tokens=100)
    assert len(calls) == fail_at
    assert sorted(p.name for p in out.iterdir()) == [], "no shard, no meta.json, no temporary file"
    with pytest.raises(FileNotFoundError, match="write_shards"):
        data.BatchSampler(out, "train", batch_size=2, block_size=4)


def test_write_shards_bad_inputs(tmp_path):
    for texts in ([], [""], ["", ""], ""):
        for tokenizer in (ByteTokenizer(), gpt2_encoding()):  # GPT-2 has a separator: still nothing to write
            with pytest.raises(ValueError, match="no text"):
                data.write_shards(texts, tokenizer, tmp_path / "empty")
    assert not (tmp_path / "empty").exists(), "bad input must be refused before anything is written"
    with pytest.raises(ValueError, match="val_fraction"):
        data.write_shards("abc", ByteTokenizer(), tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ValueError, match="shard_tokens"):
        data.write_shards("abc", ByteTokenizer(), tmp_path / "x", shard_tokens=0)
    with pytest.raises(TypeError, match="not a tokenizer"):
        data.write_shards("abc", object(), tmp_path / "x")
    with pytest.raises(TypeError, match="not a str"):
        data.write_shards(["abc", 3], ByteTokenizer(), tmp_path / "x")
    with pytest.raises(ValueError, match="n_vocab"):
        data.write_shards("1 2 30", NumberTokenizer(n_vocab=10), tmp_path / "x")  # 30 >= n_vocab
    assert not (tmp_path / "x").exists()


def test_lesson_01_bpe_tokenizer_writes_and_decodes(tmp_path):
    tokenizer = pytest.importorskip("nanolib.tokenizer", reason="lesson 01's tokenizer is not exported yet")
    docs = ["to be, or not to be, that is the question " * 20, "whether 'tis nobler in the mind " * 20]
    bpe = tokenizer.BPETokenizer()
    bpe.train(" ".join(docs), 270)
    out = data.write_shards(docs, bpe, tmp_path / "bpe")
    meta = data.read_meta(out)
    rebuilt = tokenizer.load_tokenizer(meta["tokenizer"])
    ids = np.concatenate([stream_of(out, "train"), stream_of(out, "val")]).tolist()
    eot = [bpe.eot_token] if bpe.eot_token is not None else []
    assert ids == bpe.encode_ordinary(docs[0]) + eot + bpe.encode_ordinary(docs[1])
    assert rebuilt.decode(ids[:len(bpe.encode_ordinary(docs[0]))]) == docs[0]


def test_meta_holds_what_rebuilds_the_tokenizer(tmp_path):
    out = data.write_shards("abc", gpt2_encoding(), tmp_path / "g")
    assert data.read_meta(out)["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
    out = data.write_shards("abc", ByteTokenizer(), tmp_path / "b")
    assert data.read_meta(out)["tokenizer"] == {"kind": "bytes"}
    class NoInfo:
        n_vocab = 256

        def encode(self, text):
            return list(text.encode())

    with pytest.raises(TypeError, match="nanolib tokenizer or a tiktoken.Encoding"):
        data.write_shards("abc", NoInfo(), tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_meta_tokenizer_rebuilds_the_tokenizer(tmp_path):
    from nanolib.tokenizer import CharTokenizer, load_tokenizer, tokenizer_info
    for i, tok in enumerate((gpt2_encoding(), CharTokenizer.from_text("hello world"))):
        meta = data.read_meta(data.write_shards("hello world " * 50, tok, tmp_path / str(i)))
        assert meta["tokenizer"] == tokenizer_info(tok)
        assert load_tokenizer(meta["tokenizer"]).encode("hello") == tok.encode("hello")


# ---------------------------------------------------------------- the sampler

def test_shift_by_one_and_windows_are_consecutive_tokens(stream_dir):
    sampler = data.BatchSampler(stream_dir, "train", batch_size=16, block_size=50, seed=1)
    for _ in range(20):  # shards hold 64 tokens: many windows cross a shard boundary
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (16, 50) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])  # token i is the number i
            assert row_x.tolist() == list(range(start, start + 50))
            assert row_y.tolist() == list(range(start + 1, start + 51))
        assert int(y.max()) < 900, "train windows stay in the train split"
    val_x, val_y = data.BatchSampler(stream_dir, "val", batch_size=8, block_size=10).next_batch()
    assert int(val_x.min()) >= 900 and int(val_y.max()) <= 999


def test_bounds_every_window_inside_and_last_token_reachable(tmp_path):
    out = data.write_shards(numbers(60), NumberTokenizer(), tmp_path / "small", val_fraction=0.0, shard_tokens=25)
    sampler = data.BatchSampler(out, "train", batch_size=32, block_size=8, seed=0)
    starts, last = set(), 0
    for _ in range(60):
        x, y = sampler.next_batch()
        starts |= set(x[:, 0].tolist())
        last = max(last, int(y.max()))
        assert int(x.min()) >= 0 and int(y.max()) <= 59
    assert starts == set(range(60 - 8)), "every start 0 .. n - block_size - 1, and no other"
    assert last == 59, "the last token must be reachable as a target"


@pytest.mark.parametrize("n, block_size, batch_size", [(60, 8, 3), (65, 8, 3), (59, 8, 7), (30, 29, 4)])
def test_sequential_batches_make_every_token_a_target_once(tmp_path, n, block_size, batch_size):
    out = data.write_shards(numbers(n), NumberTokenizer(), tmp_path / "s", val_fraction=0.0, shard_tokens=25)
    sampler = data.BatchSampler(out, "train", batch_size=batch_size, block_size=block_size, seed=3)
    batches = list(sampler.sequential_batches())
    assert all(len(x) == batch_size for x, _ in batches[:-1]) and 1 <= len(batches[-1][0]) <= batch_size
    covered = (n - 1) // block_size * block_size   # whole windows only; a target needs its input token
    assert torch.cat([x for x, _ in batches]).flatten().tolist() == list(range(covered))
    assert torch.cat([y for _, y in batches]).flatten().tolist() == list(range(1, covered + 1))
    assert n - 1 - covered < block_size, "fewer than a window's worth of targets left out"
    assert sampler.step == 0 and torch.equal(sampler.next_batch()[0], sampler.batch(0)[0]), "random batches untouched"
    assert [len(x) for x, _ in sampler.sequential_batches(batch_size=1)] == [1] * (covered // block_size)


def test_block_size_just_fits(tmp_path):
    out = data.write_shards(numbers(30), NumberTokenizer(), tmp_path / "tiny", val_fraction=0.0)
    x, y = data.BatchSampler(out, "train", batch_size=3, block_size=29).next_batch()
    assert x[0].tolist() == list(range(29)) and y[0].tolist() == list(range(1, 30))
    with pytest.raises(ValueError, match="block_size=30 needs at least 31 tokens"):
        data.BatchSampler(out, "train", batch_size=3, block_size=30)


def test_batches_follow_the_contract_and_repeat(stream_dir):
    """Batch i's starts are default_rng([seed, i]).integers(0, n - T, world_size * B), rank's slice."""
    a = data.BatchSampler(stream_dir, "train", batch_size=5, block_size=12, seed=42)
    b = data.BatchSampler(stream_dir, "train", batch_size=5, block_size=12, seed=42)
    other = data.BatchSampler(stream_dir, "train", batch_size=5, block_size=12, seed=43)
    for i in range(6):
        expected = np.random.default_rng([42, i]).integers(0, 900 - 12, size=5)
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa[:, 0].tolist() == expected.tolist()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, other.next_batch()[0])
    assert torch.equal(a.batch(3)[0], data.BatchSampler(stream_dir, "train", 5, 12, seed=42).batch(3)[0])


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_union_of_ranks_is_one_process_with_the_global_batch(stream_dir, sampling):
    world = 3
    ranks = [data.BatchSampler(stream_dir, "train", batch_size=2, block_size=10, seed=9, rank=r, world_size=world,
                               sampling=sampling) for r in range(world)]
    single = data.BatchSampler(stream_dir, "train", batch_size=2 * world, block_size=10, seed=9, sampling=sampling)
    for _ in range(20):   # epochs: 89 windows of 10, so batches 14 and 15 cross into the second epoch
        per_rank = [r.next_batch() for r in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([b[0] for b in per_rank]), x)
        assert torch.equal(torch.cat([b[1] for b in per_rank]), y)


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_state_dict_resume_is_exact(stream_dir, sampling):
    a = data.BatchSampler(stream_dir, "train", batch_size=4, block_size=16, seed=11, sampling=sampling)
    for _ in range(13):   # epochs: 55 windows of 16, so the resumed batches cross into the second epoch
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint would store it
    assert state["seed"] == 11 and state["step"] == 13 and state["sampling"] == sampling
    expected = [a.next_batch() for _ in range(4)]
    b = data.BatchSampler(stream_dir, "train", batch_size=4, block_size=16, seed=0, sampling=sampling)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [b.next_batch() for _ in range(4)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchSampler(stream_dir, "train", batch_size=8, block_size=16, sampling=sampling).load_state_dict(state)
    other = "random" if sampling == "epochs" else "epochs"
    with pytest.raises(ValueError, match=f"sampling={other!r} but the state was saved with {sampling!r}"):
        data.BatchSampler(stream_dir, "train", batch_size=4, block_size=16, sampling=other).load_state_dict(state)


# ---------------------------------------------------------------- sampling="epochs"

@pytest.mark.parametrize("n, block_size, batch_size", [(1000, 10, 7), (1000, 16, 64), (60, 8, 3), (61, 8, 5),
                                                       (30, 20, 4), (30, 29, 2), (40, 13, 40)])
def test_epochs_read_every_window_of_a_shifted_tiling_once(tmp_path, n, block_size, batch_size):
    """Epoch e: windows_per_epoch starts phase, phase + T, phase + 2T, ... in some order, each once, all
    inside the split; tokens i are the number i, so x[:, 0] is the start and rows are real windows."""
    out = data.write_shards(numbers(n), NumberTokenizer(), tmp_path / "s", val_fraction=0.0, shard_tokens=25)
    sampler = data.BatchSampler(out, "train", batch_size=batch_size, block_size=block_size, seed=5,
                                sampling="epochs")
    per_epoch = sampler.windows_per_epoch
    assert per_epoch == max(1, (n - block_size) // block_size)
    batches = [sampler.next_batch() for _ in range(4 * per_epoch // batch_size + 1)]   # 4 epochs, in batches
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(x, x[:, :1] + torch.arange(block_size)) and torch.equal(y, x + 1), "windows of the stream"
    assert int(x.min()) >= 0 and int(y.max()) <= n - 1, "every window inside the split"
    starts = x[:, 0].numpy()
    for e in range(4):
        epoch = starts[e * per_epoch:(e + 1) * per_epoch]
        phase = int(epoch.min())
        assert 0 <= phase < block_size
        assert sorted(epoch - phase) == list(range(0, per_epoch * block_size, block_size)), f"epoch {e}"
    assert n - per_epoch * block_size < 2 * block_size, "an epoch leaves fewer than two windows' worth out"


def test_epochs_change_order_and_phase_between_epochs_and_seeds(stream_dir):
    def epoch_starts(seed, e, per_epoch=89):   # 900 train tokens, windows of 10: (900 - 10) // 10 per epoch
        s = data.BatchSampler(stream_dir, "train", batch_size=1, block_size=10, seed=seed, sampling="epochs")
        assert s.windows_per_epoch == per_epoch
        return np.concatenate([s.starts(i) for i in range(e * per_epoch, (e + 1) * per_epoch)])
    epochs = [epoch_starts(3, e) for e in range(4)]
    one = data.BatchSampler(stream_dir, "train", batch_size=7, block_size=10, seed=3, sampling="epochs")
    in_one_run = np.concatenate([one.starts(i) for i in range(4 * 89 // 7 + 1)])   # batches cross epochs
    assert np.array_equal(in_one_run[:4 * 89], np.concatenate(epochs)), "one sampler's epochs = fresh ones"
    assert len({int(e.min()) for e in epochs}) > 1, "the phase moves between epochs"
    assert len({tuple((e - e.min()) // 10) for e in epochs}) == 4, "each epoch its own order"
    assert not np.array_equal(epoch_starts(4, 0), epochs[0]), "another seed, other batches"
    assert np.array_equal(epoch_starts(3, 2), epochs[2]), "a pure function of (seed, batch number)"


def test_random_sampling_leaves_a_third_unread_where_epochs_read_everything(tmp_path):
    """Over one pass (n / block_size windows), random windows miss about 1/e of the tokens; epochs none."""
    out = data.write_shards(numbers(20_000), NumberTokenizer(n_vocab=20_000), tmp_path / "s", val_fraction=0.0)
    seen = {}
    for sampling in ("random", "epochs"):
        sampler = data.BatchSampler(out, "train", batch_size=20, block_size=10, seed=1, sampling=sampling)
        targets = torch.cat([sampler.next_batch()[1] for _ in range(sampler.windows_per_epoch // 20)])
        seen[sampling] = len(set(targets.flatten().tolist())) / 20_000
    assert sampler.windows_per_epoch // 20 * 20 == 1980   # windows of 10 in one pass: 198,000 targets
    assert 0.60 < seen["random"] < 0.66 and seen["epochs"] == 1980 * 10 / 20_000


def test_unknown_sampling_is_refused(stream_dir):
    with pytest.raises(ValueError, match="sampling must be 'random'.*or 'epochs'.*got 'shuffled'"):
        data.BatchSampler(stream_dir, "train", batch_size=4, block_size=8, sampling="shuffled")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-2), ValueError, "batch_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=900), ValueError, "block_size=900 needs at least 901"),
    (dict(rank=2, world_size=2), ValueError, "rank"),
    (dict(rank=-1, world_size=2), ValueError, "rank"),
    (dict(world_size=0), ValueError, "world_size"),
    (dict(split="test"), ValueError, "split"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_sampler_bad_inputs(stream_dir, kwargs, error, match):
    args = dict(split="train", batch_size=4, block_size=8) | kwargs
    with pytest.raises(error, match=match):
        data.BatchSampler(stream_dir, **args)


def test_sampler_missing_or_damaged_shards(tmp_path, stream_dir):
    with pytest.raises(FileNotFoundError, match="prepare_tinyshakespeare"):
        data.BatchSampler(tmp_path / "nowhere", "train", batch_size=4, block_size=8)
    with pytest.raises(FileNotFoundError, match="prepare_tinyshakespeare"):
        data.read_meta(tmp_path / "nowhere")
    shard = stream_dir / "train_0003.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(FileNotFoundError, match="do not match"):
        data.BatchSampler(stream_dir, "train", batch_size=4, block_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_equal_cpu_batches(stream_dir):
    cpu = data.BatchSampler(stream_dir, "train", batch_size=8, block_size=32, seed=4)
    gpu = data.BatchSampler(stream_dir, "train", batch_size=8, block_size=32, seed=4, device="cuda")
    for _ in range(3):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and yg.is_cuda
        torch.cuda.synchronize()
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# ---------------------------------------------------------------- loading text

def test_load_local_txt_and_jsonl_offline(tmp_path, offline):
    txt = tmp_path / "play.txt"
    content = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\nJULIET: ¿Sí?\n"
    txt.write_text(content, encoding="utf-8")
    texts = data.load_text(txt, cache_dir=tmp_path / "hf")
    assert list(texts) == [content], "a .txt file is one document, newlines kept"

    rows = [{"text": "one", "n": 1}, {"text": "two\nlines", "n": 2}, {"text": "", "n": 3}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert list(data.load_text(jsonl, cache_dir=tmp_path / "hf")) == [r["text"] for r in rows]
    body = tmp_path / "body.jsonl"
    body.write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert list(data.load_text(str(body), text_column="body", cache_dir=tmp_path / "hf")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body'\]"):
        data.load_text(body, cache_dir=tmp_path / "hf")


def test_load_text_caches_local_files_under_data_dir(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("NANOLIB_DATA", str(tmp_path / "cache"))
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n", encoding="utf-8")
    assert list(data.load_text(txt)) == ["hello\n"]
    assert (tmp_path / "cache" / "datasets").is_dir()


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict({"text": ["a story", "another"], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(data.load_text("roneneldan/TinyStories", split="validation")) == ["a story", "another"]
    assert calls == [("roneneldan/TinyStories", {"split": "validation", "cache_dir": None})]


def test_load_text_bad_inputs(tmp_path, offline):
    with pytest.raises(ValueError, match="unknown dataset 'tiny shakespeare'"):
        data.load_text("tiny shakespeare")
    with pytest.raises(FileNotFoundError, match="no file at"):
        data.load_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        data.load_text(tmp_path)
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"\.csv file"):
        data.load_text(csv)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 is set"):
        data.load_text("nanolib-course/no-such-dataset", cache_dir=tmp_path / "hf")


# ---------------------------------------------------------------- Tiny Shakespeare

needs_shakespeare = pytest.mark.skipif(not (data_dir() / "tinyshakespeare.txt").exists(),
                                       reason="Tiny Shakespeare is not in the data cache (and tests stay offline)")


def test_tinyshakespeare_offline_error_names_file_and_folder(tmp_path):
    missing = (tmp_path / "nothing_there.txt").as_uri()
    with pytest.raises(DownloadError) as err:
        data.tinyshakespeare(folder=tmp_path / "cache", url=missing)
    assert "tinyshakespeare.txt" in str(err.value) and str(tmp_path / "cache") in str(err.value)
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(DownloadError, match="sha256"):
        data.tinyshakespeare(folder=tmp_path / "cache", url=missing)


@needs_shakespeare
def test_tinyshakespeare_is_verified():
    path = data.tinyshakespeare()
    assert path.stat().st_size == 1_115_394


@needs_shakespeare
def test_prepare_gpt2_counts_and_reuse(tmp_path):
    enc = gpt2_encoding()
    text = data.tinyshakespeare().read_text(encoding="utf-8")
    out = data.prepare_tinyshakespeare("gpt2", out_dir=tmp_path / "g")
    expected = enc.encode_ordinary(text)
    meta = data.read_meta(out)
    assert meta["train_tokens"] == int(len(expected) * 0.9) and meta["val_tokens"] == len(expected) - meta["train_tokens"]
    assert np.concatenate([stream_of(out, "train"), stream_of(out, "val")]).tolist() == expected
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert data.prepare_tinyshakespeare("gpt2", out_dir=out) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp, "matching shards are reused, not rewritten"
    (out / "val_0000.bin").write_bytes(b"")  # damaged: the next call writes them again
    data.prepare_tinyshakespeare("gpt2", out_dir=out)
    assert stream_of(out, "val").tolist() == expected[meta["train_tokens"]:]


@needs_shakespeare
def test_prepare_char_matches_nanogpt(tmp_path):
    tokenizer = pytest.importorskip("nanolib.tokenizer", reason="lesson 01's tokenizer is not exported yet")
    text = data.tinyshakespeare().read_text(encoding="utf-8")
    out = data.prepare_tinyshakespeare("char", out_dir=tmp_path / "c")
    meta = data.read_meta(out)
    # nanoGPT's shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens
    assert (meta["n_vocab"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert meta["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(text)))}
    tok = tokenizer.load_tokenizer(meta["tokenizer"])
    assert tok.decode(stream_of(out, "val").tolist()) == text[1_003_854:]


def test_prepare_unknown_kind():
    with pytest.raises(ValueError, match="'char'.*'gpt2'"):
        data.prepare_tinyshakespeare("words")


# ---------------------------------------------------------------- Zipf

def test_token_frequencies_against_a_counter():
    from collections import Counter

    tokens = np.array([5, 1, 5, 5, 2, 1, 9, 5])
    assert data.token_frequencies(tokens).tolist() == sorted(Counter(tokens.tolist()).values(), reverse=True)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 0.5])
def test_zipf_slope_recovers_a_power_law(exponent):
    ranks = np.arange(1, 2001)
    counts = 1e9 / ranks ** exponent
    assert data.zipf_slope(counts) == pytest.approx(-exponent, abs=1e-6)
    with pytest.raises(ValueError):
        data.zipf_slope(np.array([3]))


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_atomic_write_gives_the_file_a_normal_mode_not_mkstemps_private_one(tmp_path):
    from nanolib.core import atomic_write
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "shared.txt", "w") as f:
            f.write("readable by the group and others, as any file written with open()")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("for comparison")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- review fixes: errors before any work

@pytest.mark.parametrize("separator", [-1, 256, True, "eot", 2.0])
def test_a_bad_separator_is_refused_before_anything_is_written(tmp_path, separator):
    with pytest.raises(ValueError, match="separator must be a token id"):
        data.write_shards(["ab", "cd"], ByteTokenizer(), tmp_path / "d", separator=separator)
    assert not (tmp_path / "d").exists()


def test_a_numpy_separator_is_stored_as_a_plain_int(tmp_path):
    out = data.write_shards(["ab", "cd"], ByteTokenizer(), tmp_path / "d", val_fraction=0.0, separator=np.int64(0))
    assert stream_of(out, "train").tolist() == [97, 98, 0, 99, 100]
    assert data.read_meta(out)["separator"] == 0


def test_extra_meta_json_cannot_store_fails_before_any_shard_is_written(tmp_path):
    with pytest.raises(ValueError, match="extra_meta must hold only what JSON can store"):
        data.write_shards(numbers(300), NumberTokenizer(), tmp_path / "d", shard_tokens=50,
                          extra_meta={"source": tmp_path})  # a Path is not JSON
    assert not (tmp_path / "d").exists() or sorted((tmp_path / "d").iterdir()) == []


def test_a_failing_meta_json_write_leaves_no_shard_behind(tmp_path, monkeypatch):
    real_atomic_write = data.atomic_write

    @contextlib.contextmanager
    def meta_fails(path, mode="wb"):
        if path.name == "meta.json":
            raise OSError(28, "No space left on device")
        with real_atomic_write(path, mode) as f:
            yield f

    monkeypatch.setattr(data, "atomic_write", meta_fails)
    with pytest.raises(OSError, match="No space"):
        data.write_shards(numbers(300), NumberTokenizer(), tmp_path / "d", shard_tokens=50)
    assert sorted((tmp_path / "d").iterdir()) == []


def test_ids_out_of_range_are_refused_before_the_cast_could_wrap_them(tmp_path):
    class Wraps(NumberTokenizer):  # 65,536 + 5 would wrap to 5 in uint16
        def encode(self, text):
            return [5, 65_541]

    with pytest.raises(ValueError, match="outside .* in document 0"):
        data.write_shards(["x"], Wraps(n_vocab=1000), tmp_path / "d")


@pytest.mark.parametrize("damage, match", [("{not json", "is damaged"), ('{"format": 1}', "lacks")])
def test_a_damaged_meta_json_is_named_and_prepare_writes_it_again(tmp_path, damage, match):
    out = data.write_shards(numbers(300), NumberTokenizer(), tmp_path / "d")
    (out / "meta.json").write_text(damage)
    with pytest.raises(ValueError, match=match):
        data.read_meta(out)
    with pytest.raises(ValueError, match="write the shards again"):
        data.BatchSampler(out, "train", batch_size=2, block_size=4)
    if (data_dir() / "tinyshakespeare.txt").exists():
        char = data.prepare_tinyshakespeare("char", out_dir=tmp_path / "c")
        (char / "meta.json").write_text(damage)
        data.prepare_tinyshakespeare("char", out_dir=char)  # rebuilds instead of raising
        assert data.read_meta(char)["train_tokens"] == 1_003_854


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8"])
def test_sequential_batches_refuse_a_bad_batch_size(stream_dir, batch_size):
    sampler = data.BatchSampler(stream_dir, "val", batch_size=4, block_size=8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(sampler.sequential_batches(batch_size=batch_size))


def test_a_file_that_is_not_utf8_is_refused_with_the_fix(tmp_path, offline):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text .*re-save it as UTF-8"):
        data.load_text(latin1, cache_dir=tmp_path / "hf")


def test_windows_line_ends_arrive_as_newlines(tmp_path, offline):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\r\n")
    assert list(data.load_text(crlf, cache_dir=tmp_path / "hf")) == ["a\nb\n"]


def test_a_hub_configuration_is_passed_on(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or
                        datasets.Dataset.from_dict({"text": ["x"]}))
    data.load_text("HuggingFaceFW/fineweb", name="sample-10BT")
    assert calls == [("HuggingFaceFW/fineweb", {"split": "train", "cache_dir": None, "name": "sample-10BT"})]


def test_a_jsonl_file_that_is_not_utf8_is_refused_with_the_fix(tmp_path, offline):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"rows\.jsonl is not UTF-8 text .*re-save it as UTF-8"):
        data.load_text(bad, cache_dir=tmp_path / "hf")


def test_a_configuration_name_is_refused_for_a_local_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="a local file has none"):
        data.load_text(tmp_path / "a.txt", name="sample-10BT")

# Behaviours no test checked until mutation testing (breaking the code on purpose, one change at a time)
# showed it: each test below fails on the change it was written for.


@pytest.mark.parametrize("bad_id", [-1, 1000])
def test_ids_just_outside_the_vocabulary_are_refused(tmp_path, bad_id):
    class Edge(NumberTokenizer):
        def encode(self, text):
            return [5, bad_id]
    with pytest.raises(ValueError, match="outside"):
        data.write_shards(["x"], Edge(n_vocab=1000), tmp_path / "d")


@needs_shakespeare
def test_prepare_rewrites_for_another_shard_size(tmp_path):
    out = data.prepare_tinyshakespeare("char", out_dir=tmp_path / "c")
    data.prepare_tinyshakespeare("char", out_dir=out, shard_tokens=400_000)
    meta = data.read_meta(out)
    assert meta["shard_tokens"] == 400_000 and len(meta["shards"]["train"]) == 3
