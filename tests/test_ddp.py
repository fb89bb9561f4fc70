"""`torchrun -m nanolib.train` with two CPU processes (gloo): both ranks end with identical weights, and the
run matches one process with the same global batch (losses, evaluations and final weights)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from nanolib import train as T
from nanolib.core import tinyshakespeare
from nanolib.data import write_shards
from nanolib.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    text = tinyshakespeare().read_text(encoding="utf-8")[:60_000]
    return write_shards([text], CharTokenizer.from_text(text), tmp_path_factory.mktemp("shards"))


def run(cmd, **kwargs):
    # one thread per process: two processes on a small CPU must not fight over cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOLIB_DEVICE": "cpu", "TQDM_DISABLE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_two_processes_train_like_one(shards, tmp_path):
    common = ["-m", "nanolib.train", "--preset=smoke", f"--data={shards}", "--batch_size=8", "--max_iters=12",
              "--eval_interval=6", "--grad_accum_steps=2", "--log_interval=1"]
    # --standalone: torchrun picks a free port itself, so parallel test runs cannot collide
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
               f"--out_dir={tmp_path / 'ddp'}"])
    run([sys.executable, *common, f"--out_dir={tmp_path / 'one'}"])

    digests = dict(re.findall(r"rank (\d): final weights sha256 ([0-9a-f]{64})", ddp.stdout))
    assert sorted(digests) == ["0", "1"], ddp.stdout[-2000:]
    assert digests["0"] == digests["1"], "the two processes ended with different weights"
    assert ddp.stdout.count("done: 12 steps") == 1, "only rank 0 reports"

    one = T.load_checkpoint(tmp_path / "one" / "ckpt.pt")
    two = T.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1            # every rank's RNG state is kept
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"]), "ranks must draw different dropout masks"
    assert two["train_config"]["batch_size"] == one["train_config"]["batch_size"] == 8
    losses = lambda ck, key, kind: [r[key] for r in ck["history"][kind]]
    assert len(losses(two, "loss", "train")) == 12
    for kind, key in (("train", "loss"), ("eval", "val_loss"), ("eval", "train_loss")):
        assert losses(two, key, kind) == pytest.approx(losses(one, key, kind), rel=1e-5, abs=1e-6), key
    for name, p in one["model"].items():
        torch.testing.assert_close(two["model"][name], p, atol=1e-5, rtol=1e-5, msg=name)


def test_two_processes_finetune_on_conversations_like_one(shards, tmp_path):
    """Chat rows hold different numbers of targets, so each rank's loss is weighed by its share of the batch's
    targets: two processes take the very steps of one (losses and weights), which an unweighted mean would not."""
    T.Trainer(T.preset("smoke", data=str(shards), block_size=64, out_dir=str(tmp_path / "base")),
              log=lambda *a: None).fit()
    common = ["-m", "nanolib.sft", "--preset=chat-smoke", f"--init_from={tmp_path / 'base' / 'ckpt.pt'}",
              "--batch_size=8", "--max_iters=6", "--eval_interval=6", "--grad_accum_steps=2", "--log_interval=1",
              "--score_examples=0"]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
         f"--out_dir={tmp_path / 'ddp'}"])
    run([sys.executable, *common, f"--out_dir={tmp_path / 'one'}"])
    one = T.load_checkpoint(tmp_path / "one" / "ckpt.pt")
    two = T.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    losses = lambda ck: [r["loss"] for r in ck["history"]["train"]]
    assert len(losses(two)) == 6 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    for name, p in one["model"].items():
        torch.testing.assert_close(two["model"][name], p, atol=1e-5, rtol=1e-5, msg=name)
    assert two["chat"] == one["chat"] is not None
