"""nanolib.shards (lesson 09): streaming a corpus into shards. The shards equal an in-memory tokenization;
local .jsonl, .parquet, .txt files and folders go the same path; an interrupted run (after a shard, in the
middle of one, while a shard is being written) continues into the very bytes of an uninterrupted one;
bad input fails before any work; the trainer reads the folder; the command's errors are one line."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nanolib import shards as S
from nanolib.core import gpt2_encoding, tinyshakespeare
from nanolib.data import BatchSampler, read_meta
from nanolib.tokenizer import tokenizer_info


@pytest.fixture(scope="module")
def paragraphs():
    return [p for p in tinyshakespeare().read_text(encoding="utf-8").split("\n\n") if p.strip()][:1200]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, paragraphs):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    return path


def config(source, **overrides):
    return S.StreamConfig(**{"source": str(source), "name": None, "shard_tokens": 5_000, "block_size": 32,
                             **overrides})


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != S.PROGRESS}


def expected_tokens(texts):
    enc = gpt2_encoding()
    return np.concatenate([[enc.eot_token, *enc.encode_ordinary(t)] for t in texts]).astype(np.uint16)


def read_all(folder):
    meta = read_meta(folder)
    files = [s["file"] for s in meta["shards"]["val"] + meta["shards"]["train"]]
    return meta, files, np.concatenate([np.fromfile(folder / f, dtype="<u2") for f in files])


@pytest.fixture(scope="module")
def whole(tmp_path_factory, corpus):
    return S.write_stream_shards(config(corpus), tmp_path_factory.mktemp("whole"), progress=False)


def test_the_shards_hold_every_document_after_an_endoftext_and_the_first_is_validation(whole, paragraphs):
    meta, files, tokens = read_all(whole)
    assert np.array_equal(tokens, expected_tokens(paragraphs))
    assert files[0] == "val_0000.bin" and files[1] == "train_0000.bin"
    assert meta["val_tokens"] == 5_000 and meta["train_tokens"] == len(tokens) - 5_000
    assert [s["tokens"] for s in meta["shards"]["train"][:-1]] == [5_000] * (len(files) - 2)
    assert meta["tokenizer"] == tokenizer_info(gpt2_encoding()) and meta["dtype"] == "uint16"
    assert json.loads((whole / S.PROGRESS).read_text())["done"] is True


def test_the_trainer_s_sampler_reads_windows_across_shard_boundaries(whole):
    sampler = BatchSampler(whole, "train", batch_size=4, block_size=32, sampling="epochs")
    _, _, tokens = read_all(whole)
    train = tokens[5_000:]
    for start in (4_990, 9_995, 0):                     # across the first and second boundaries, and the start
        assert np.array_equal(sampler._window(start), train[start:start + 33])


def test_max_tokens_stops_there_with_a_short_last_shard(tmp_path, corpus, whole):
    out = S.write_stream_shards(config(corpus, max_tokens=12_345), tmp_path, progress=False)
    meta, _, tokens = read_all(out)
    assert len(tokens) == 12_345 and [s["tokens"] for s in meta["shards"]["train"]] == [5_000, 2_345]
    assert np.array_equal(tokens, read_all(whole)[2][:12_345])


@pytest.mark.parametrize("kind", ["parquet", "txt folder", "jsonl folder"])
def test_parquet_files_and_folders_go_the_same_path(tmp_path, paragraphs, kind):
    texts = paragraphs[:300]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        source = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), source)
    else:
        source = tmp_path / "folder"
        source.mkdir()
        for i in range(0, len(texts), 100):       # sorted file names keep the documents' order
            if kind == "txt folder":
                for j, t in enumerate(texts[i:i + 100]):
                    (source / f"{i + j:05d}.txt").write_text(t, encoding="utf-8")
            else:
                (source / f"part{i:05d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                                  for t in texts[i:i + 100]))
    out = S.write_stream_shards(config(source, shard_tokens=2_000), tmp_path / "out", progress=False)
    assert np.array_equal(read_all(out)[2], expected_tokens(texts))


class Interrupt(Exception):
    pass


def test_a_run_stopped_after_a_shard_continues_into_the_same_bytes(tmp_path, corpus, whole, monkeypatch):
    real = S._save_shard

    def save(out_dir, state, *args):
        if len(state["shards"]) == 3:
            raise Interrupt
        real(out_dir, state, *args)

    monkeypatch.setattr(S, "_save_shard", save)
    with pytest.raises(Interrupt):
        S.write_stream_shards(config(corpus), tmp_path, progress=False)
    assert len(json.loads((tmp_path / S.PROGRESS).read_text())["shards"]) == 3
    assert not (tmp_path / "meta.json").exists()              # the trainer never reads a folder half done
    monkeypatch.setattr(S, "_save_shard", real)
    S.write_stream_shards(config(corpus), tmp_path, progress=False)
    assert digests(tmp_path) == digests(whole)


def test_a_run_stopped_mid_shard_or_while_writing_one_continues_into_the_same_bytes(tmp_path, corpus, whole,
                                                                                    monkeypatch):
    real_open = S.open_corpus

    def breaks_after(n):
        def broken(*args, **kwargs):
            for i, doc in enumerate(real_open(*args, **kwargs)):
                if i == n:
                    raise Interrupt
                yield doc
        return broken

    for n in (150, 700):                                      # two interruptions, at different places
        monkeypatch.setattr(S, "open_corpus", breaks_after(n))
        with pytest.raises(Interrupt):
            S.write_stream_shards(config(corpus), tmp_path, progress=False)
    state = json.loads((tmp_path / S.PROGRESS).read_text())
    assert state["doc_offset"] > 0 or state["next_doc"] > 0
    # then a crash in the middle of writing a shard's bytes: the temporary file goes, the old files stay
    monkeypatch.setattr(S, "open_corpus", real_open)
    real_write = S.atomic_write

    def failing_write(path, mode="wb"):
        if str(path).endswith(".bin"):
            raise Interrupt
        return real_write(path, mode)

    monkeypatch.setattr(S, "atomic_write", failing_write)
    with pytest.raises(Interrupt):
        S.write_stream_shards(config(corpus), tmp_path, progress=False)
    monkeypatch.setattr(S, "atomic_write", real_write)
    S.write_stream_shards(config(corpus), tmp_path, progress=False)
    assert digests(tmp_path) == digests(whole) and not list(tmp_path.glob(".*.tmp"))


def test_a_finished_folder_is_left_as_it_is(whole, corpus):
    before = {p.name: p.stat().st_mtime_ns for p in whole.iterdir()}
    S.write_stream_shards(config(corpus), whole, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in whole.iterdir()} == before


@pytest.mark.parametrize("change, message", [
    (dict(shard_tokens=6_000), "holds shards made from"),
    (dict(max_tokens=100), "holds shards made from"),
])
def test_a_folder_made_otherwise_is_refused_before_any_work(whole, corpus, change, message):
    before = digests(whole)
    with pytest.raises(ValueError, match=message):
        S.write_stream_shards(config(corpus, **change), whole, progress=False)
    assert digests(whole) == before


def test_a_folder_of_another_tokenizer_s_shards_is_refused(tmp_path, corpus):
    from nanolib.data import write_shards
    from nanolib.tokenizer import CharTokenizer
    write_shards(["some text " * 100], CharTokenizer.from_text("some text "), tmp_path)
    with pytest.raises(ValueError, match=r"did not write \(no progress.json; tokenizer \{'kind': 'char'"):
        S.write_stream_shards(config(corpus), tmp_path, progress=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(shard_tokens=32), "cannot hold one window of block_size \\+ 1 = 33 tokens"),
    (dict(shard_tokens=0), "shard_tokens must be a positive int"),
    (dict(max_tokens=-1), "max_tokens must be an int >= 0"),
])
def test_bad_settings_are_refused(corpus, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(corpus, **overrides)


def test_a_missing_column_an_empty_corpus_and_a_corpus_of_one_shard_get_clear_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"has no column 'content'; its columns are \['id', 'text'\]"):
        S.write_stream_shards(config(corpus, text_column="content"), tmp_path / "a", progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        S.write_stream_shards(config(tmp_path / "empty.jsonl"), tmp_path / "b", progress=False)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a short corpus"}) + "\n")
    with pytest.raises(ValueError, match="a single shard, and the first shard is the validation split"):
        S.write_stream_shards(config(tmp_path / "one.jsonl"), tmp_path / "c", progress=False)
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"must be a .parquet, .jsonl or .txt file"):
        S.open_corpus(str(tmp_path / "c.csv"))


def run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "nanolib.shards", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


def test_the_command_writes_shards_and_a_hub_name_offline_fails_in_one_line(tmp_path, corpus, whole):
    out = run([f"--source={corpus}", "--name=", f"--out_dir={tmp_path / 'out'}", "--shard_tokens=5000",
               "--block_size=32"])
    assert out.returncode == 0, out.stderr
    assert digests(tmp_path / "out") == digests(whole) and "train tokens" in out.stdout
    offline = run([f"--out_dir={tmp_path / 'hub'}", "--max_tokens=1000"])
    assert offline.returncode == 1 and offline.stderr.startswith("nanolib.shards: error: could not load dataset")
    assert offline.stderr.count("\n") == 1 and "Traceback" not in offline.stderr
    for args, message in ((["--shards=3"], "unknown option --shards"), ([], "--out_dir=FOLDER"),
                          ([f"--out_dir={tmp_path}", "--shard_tokens=10"], "cannot hold one window")):
        bad = run(args)
        assert bad.returncode == 1 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert "--max_tokens=0" in run(["--help"]).stdout


def test_training_on_streamed_shards_resumes_bitwise_across_shard_boundaries(whole, tmp_path):
    """Windows of 32 tokens from 5,000-token shards: over 8 steps of 8 windows many cross a boundary."""
    from nanolib.train import Trainer, preset
    settings = dict(data=str(whole), vocab_size=50304, n_layer=1, n_head=2, n_embd=16, block_size=32,
                    batch_size=8, max_iters=8, eval_interval=4, log_interval=1, sampling="epochs")
    straight = Trainer(preset("smoke", **settings, out_dir=str(tmp_path / "a")), log=lambda *a: None)
    straight.fit()
    Trainer(preset("smoke", **{**settings, "max_iters": 4}, out_dir=str(tmp_path / "b")), log=lambda *a: None).fit()
    resumed = Trainer(preset("smoke", **settings, out_dir=str(tmp_path / "b"), resume=str(tmp_path / "b" / "ckpt.pt")),
                      log=lambda *a: None)
    resumed.fit()
    assert [r["loss"] for r in resumed.history["train"]] == [r["loss"] for r in straight.history["train"]]


@pytest.mark.parametrize("after_shards", [0, 1, 3])
def test_a_run_stopped_between_a_shard_and_its_progress_continues_into_the_same_bytes(tmp_path, corpus, whole,
                                                                                      monkeypatch, after_shards):
    """The shard is on disk under its final name, its progress.json is not: the rerun writes that shard again."""
    real = S._save_progress

    def save(out_dir, state):
        if len(state["shards"]) == after_shards + 1 and not state.get("done"):
            raise Interrupt
        real(out_dir, state)

    monkeypatch.setattr(S, "_save_progress", save)
    with pytest.raises(Interrupt):
        S.write_stream_shards(config(corpus), tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.bin"))) == after_shards + 1
    monkeypatch.setattr(S, "_save_progress", real)
    S.write_stream_shards(config(corpus), tmp_path, progress=False)
    assert digests(tmp_path) == digests(whole)


def test_a_killed_run_s_temporary_files_are_cleaned_up_by_the_next_one(tmp_path, corpus, whole):
    S.write_stream_shards(config(corpus, max_tokens=6_000), tmp_path / "x", progress=False)
    (tmp_path / "x" / ".train_0001.bin.0123456789abcdef.tmp").write_bytes(b"half a shard")   # as kill -9 leaves it
    (tmp_path / "x" / "meta.json").unlink()
    progress = json.loads((tmp_path / "x" / S.PROGRESS).read_text())
    (tmp_path / "x" / S.PROGRESS).write_text(json.dumps({**progress, "done": False}))
    S.write_stream_shards(config(corpus, max_tokens=6_000), tmp_path / "x", progress=False)
    assert not list((tmp_path / "x").glob(".*.tmp")) and (tmp_path / "x" / "meta.json").is_file()
