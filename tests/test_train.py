"""nanolib.train: optimizer groups, schedule, accumulation and clipping against an independent one-batch
step, checkpoints (weights_only, corrupt files, mismatched configs), bitwise-exact resume, non-finite
losses, and the command line's errors. Every run is the tiny "smoke" preset on tiny shards, on the CPU."""
import copy
import json
import math
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanolib import train as T
from nanolib.core import seed_everything, tinyshakespeare
from nanolib.data import BatchSampler, write_shards
from nanolib.model import GPT, GPTConfig
from nanolib.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    text = tinyshakespeare().read_text(encoding="utf-8")[:60_000]
    return write_shards([text], CharTokenizer.from_text(text), tmp_path_factory.mktemp("shards"))


def smoke(shards, out_dir, **overrides):
    return T.preset("smoke", data=str(shards), out_dir=str(out_dir), **overrides)


def quiet(*args, **kwargs):
    pass


# ---------------------------------------------------------------- optimizer and schedule

def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lr, min_lr, warmup, decay = 1e-3, 1e-4, 100, 2000
    f = lambda s: T.lr_at(s, lr, min_lr, warmup, decay)
    assert f(0) == pytest.approx(lr / warmup) and f(49) == pytest.approx(lr * 50 / warmup)
    assert f(warmup - 1) == pytest.approx(lr) and f(warmup) == pytest.approx(lr)
    assert f((warmup + decay) // 2) == pytest.approx((lr + min_lr) / 2)  # a cosine is halfway at its middle
    assert f(decay) == pytest.approx(min_lr) and f(10 * decay) == pytest.approx(min_lr)
    after = [f(s) for s in range(warmup, decay + 1)]
    assert all(a >= b for a, b in zip(after, after[1:])), "the decay must never go back up"
    # a quarter of the way through, cos(pi/4): checks the shape, not just the end points
    quarter = warmup + (decay - warmup) // 4
    assert f(quarter) == pytest.approx(min_lr + 0.5 * (1 + math.cos(math.pi / 4)) * (lr - min_lr))


def test_weight_decay_reaches_2d_parameters_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, bias=True))
    opt = T.configure_optimizer(model, weight_decay=0.5, learning_rate=0.1, device_type="cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()  # tied once
    assert opt.defaults["fused"] is True
    # With zero gradients Adam's step is 0, so only the decoupled decay moves a weight: p <- p (1 - lr wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.dim() == 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


# ---------------------------------------------------------------- one training step, checked independently

def test_accumulated_clipped_step_equals_one_big_batch_step(shards, tmp_path):
    """2 micro-batches of 4 with clipping == one batch of 8 through a plain (non-fused) AdamW, by hand."""
    cfg = smoke(shards, tmp_path, batch_size=4, grad_accum_steps=2, grad_clip=0.05, save=False)
    trainer = T.Trainer(cfg, log=quiet)
    reference = copy.deepcopy(trainer.raw_model)
    loss, norm = trainer.train_step()

    sampler = BatchSampler(shards, "train", 4, cfg.block_size, seed=cfg.seed)
    xs, ys = zip(*(sampler.next_batch() for _ in range(2)))
    _, ref_loss = reference(torch.cat(xs), torch.cat(ys))
    ref_loss.backward()
    params = list(reference.parameters())
    ref_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    for p in params:
        p.grad *= min(1.0, cfg.grad_clip / (ref_norm.item() + 1e-6))
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=T.lr_at(0, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters),
                            betas=(cfg.beta1, cfg.beta2), foreach=False)
    opt.step()

    assert ref_norm.item() > cfg.grad_clip, "the test must exercise clipping"
    assert abs(loss.item() - ref_loss.item()) < 1e-6 and abs(norm.item() - ref_norm.item()) < 1e-5
    for (name, p), q in zip(trainer.raw_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_evaluation_uses_the_same_batches_every_time(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, save=False), log=quiet)
    first = trainer.evaluate()
    trainer.train_data.next_batch()
    assert trainer.evaluate() == first
    assert set(first) == {"train", "val"} and all(3.5 < v < 5 for v in first.values())  # ~ln(vocab) at init


def test_window_losses_average_to_the_loss_over_the_whole_split(shards):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=16)).train()
    sampler = BatchSampler(shards, "val", batch_size=4, block_size=32)
    losses = T.window_losses(model, sampler, batch_size=5)
    x, y = (torch.cat(parts) for parts in zip(*sampler.sequential_batches()))
    assert losses.shape == (len(x),) and len(x) == (sampler.n_tokens - 1) // 32
    assert model.training, "the model is put back in training mode"
    model.eval()
    with torch.no_grad():
        _, whole = model(x, y)                    # one batch of every window: the model's own mean loss
        _, third = model(x[2:3], y[2:3])
    torch.testing.assert_close(losses.mean(), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[2], third, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- checkpoints

def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    seed_everything(5)
    torch.save(T.rng_state(), tmp_path / "rng.pt")
    draw = lambda: (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])
    expected = draw()
    seed_everything(99)
    T.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


def test_checkpoint_holds_everything_and_loads_weights_only(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=3, eval_interval=3), log=quiet)
    trainer.fit()
    path = tmp_path / "ckpt.pt"
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled classes
    assert {"model", "optimizer", "model_config", "train_config", "step", "data", "rng", "tokenizer"} <= set(raw)
    ckpt = T.load_checkpoint(path)
    assert ckpt["step"] == 3 and ckpt["data"]["train"]["step"] == 3
    assert ckpt["model_config"] == {"block_size": 16, "vocab_size": trainer.meta["n_vocab"], "n_layer": 2,
                                    "n_head": 2, "n_embd": 32, "dropout": 0.0, "bias": False,
                                    "tie_embeddings": False}
    assert ckpt["tokenizer"] == trainer.meta["tokenizer"] and ckpt["tokenizer"]["kind"] == "char"
    assert ckpt["train_config"]["max_iters"] == 3
    model, _ = T.model_from_checkpoint(path)
    x = torch.randint(0, 20, (2, 16))
    assert not model.training
    assert torch.equal(model(x)[0], trainer.raw_model.eval()(x)[0])
    assert not list(tmp_path.glob(".ckpt.pt.*")), "no temporary file may be left behind"


def test_bad_checkpoints_give_clear_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        T.load_checkpoint(tmp_path / "missing.pt")
    T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2), log=quiet).fit()
    good = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable checkpoint"):
        T.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a nanolib checkpoint"):
        T.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):  # fails in setup, before training
        T.Trainer(smoke(shards, tmp_path / "b", resume=str(tmp_path / "cut.pt")), log=quiet)


def test_resume_refuses_a_checkpoint_that_does_not_match(shards, tmp_path):
    T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2), log=quiet).fit()
    ckpt = str(tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"does not match this run.*n_layer=2 \(this run: 3\)"):
        T.Trainer(smoke(shards, tmp_path, resume=ckpt, n_layer=3), log=quiet)
    other = write_shards(["abc" * 500], CharTokenizer.from_text("abc"), tmp_path / "abc")
    with pytest.raises(ValueError, match="tokenizer"):
        T.Trainer(smoke(other, tmp_path, resume=ckpt, vocab_size=65), log=quiet)
    with pytest.raises(ValueError, match="nothing left to train"):
        T.Trainer(smoke(shards, tmp_path, resume=ckpt, max_iters=2), log=quiet)
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_follows_eager_training(shards, tmp_path):
    """The optional torch.compile path (the GPT-2 preset's) on the CPU: same losses, a plain checkpoint."""
    settings = dict(max_iters=6, eval_interval=6, log_interval=1)
    eager = T.Trainer(smoke(shards, tmp_path / "eager", **settings), log=quiet)
    eager.fit()
    compiled = T.Trainer(smoke(shards, tmp_path / "compiled", compile=True, **settings), log=quiet)
    compiled.fit()
    losses = lambda t: [r["loss"] for r in t.history["train"]] + [r["val_loss"] for r in t.history["eval"]]
    assert compiled.model is not compiled.raw_model               # it really ran the compiled module
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    ckpt = T.load_checkpoint(tmp_path / "compiled" / "ckpt.pt")  # the plain GPT's names, not "_orig_mod."
    assert ckpt["model"].keys() == T.load_checkpoint(tmp_path / "eager" / "ckpt.pt")["model"].keys()


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_resume_continues_the_loss_curve_bitwise(shards, tmp_path, sampling):
    """2N steps straight == N steps, save, scrambled RNGs and fresh objects, resume, N steps. Dropout is
    on, so the torch RNG state must come back too, and the data position, and AdamW's moments."""
    settings = dict(dropout=0.1, max_iters=16, eval_interval=8, log_interval=1, sampling=sampling)
    straight = T.Trainer(smoke(shards, tmp_path / "a", **settings), log=quiet)
    straight.fit()
    T.Trainer(smoke(shards, tmp_path / "b", **{**settings, "max_iters": 8}), log=quiet).fit()
    seed_everything(4321)
    torch.rand(100), np.random.rand(7), random.random()   # another process would be in another state
    resumed = T.Trainer(smoke(shards, tmp_path / "b", **settings, resume=str(tmp_path / "b" / "ckpt.pt")),
                        log=quiet)
    assert resumed.step == 8
    resumed.fit()
    losses = lambda t: [(r["step"], r["loss"]) for r in t.history["train"]]
    assert len(losses(straight)) == 16 and losses(resumed) == losses(straight)
    for (name, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- non-finite losses

class PoisonAt:
    """Makes one weight NaN at step `step`: just before it runs (`when="begin"`, as a numerical blow-up
    would), or right after it (`when="end"`: that step's own loss was finite, the weights are not)."""

    def __init__(self, step, when="begin"):
        self.step = step
        setattr(self, f"on_step_{when}", self.poison)

    def poison(self, trainer):
        if trainer.step == self.step:
            with torch.no_grad():
                trainer.raw_model.transformer.wpe.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=20, eval_interval=10, log_interval=5), log=quiet)
    # poisoned before step index 12, so the 13th step, which the log lines call "step 13", is the first bad one
    with pytest.raises(FloatingPointError, match=r"non-finite at step 13\b.*last good checkpoint"):
        trainer.fit(callbacks=[PoisonAt(12)])
    assert trainer.step == 15  # noticed at the next log interval, without a device sync every step
    ckpt = T.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_weights_broken_by_the_step_before_an_evaluation_are_never_saved(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=20, eval_interval=5, log_interval=1), log=quiet)
    with pytest.raises(FloatingPointError, match=r"evaluation after step 10 gave non-finite.*last good checkpoint"):
        trainer.fit(callbacks=[PoisonAt(10, when="end")])
    ckpt = T.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    with pytest.raises(FloatingPointError, match=r"weights are not finite after step 10"):
        trainer.save()                                     # saving by hand is refused too
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5


def test_fp16_with_a_grad_scaler_trains_saves_and_resumes_bitwise(shards, tmp_path):
    """The fp16 path a T4 takes, on the CPU: autocast to float16, a GradScaler whose state is checkpointed."""
    settings = dict(dtype="float16", max_iters=8, eval_interval=4, log_interval=1)
    straight = T.Trainer(smoke(shards, tmp_path / "a", **settings), log=quiet)
    assert straight.scaler.is_enabled()
    straight.fit()
    T.Trainer(smoke(shards, tmp_path / "b", **{**settings, "max_iters": 4}), log=quiet).fit()
    ckpt = T.load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert ckpt["scaler"]["scale"] > 1  # the scaler's state travels with the checkpoint
    resumed = T.Trainer(smoke(shards, tmp_path / "b", **settings, resume=str(tmp_path / "b" / "ckpt.pt")),
                        log=quiet)
    assert resumed.scaler.get_scale() == ckpt["scaler"]["scale"]
    resumed.fit()
    losses = lambda t: [(r["step"], r["loss"]) for r in t.history["train"]]
    assert all(math.isfinite(loss) for _, loss in losses(straight))
    assert losses(resumed) == losses(straight)


def test_a_huge_learning_rate_is_reported_by_the_command(shards, tmp_path):
    with pytest.raises(SystemExit, match=r"non-finite at step \d+"):
        T.main(["--preset=smoke", f"--data={shards}", f"--out_dir={tmp_path}", "--learning_rate=1e30",
                "--min_lr=0", "--grad_clip=0"])


def test_ms_per_step_counts_training_steps_only(shards, tmp_path, monkeypatch):
    """A fake clock that only training steps advance: every log line must then say 1000 ms a step, also
    after an evaluation that falls between two log lines (eval_interval 5, log_interval 2)."""
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=10, eval_interval=5, log_interval=2), log=quiet)
    real_step = trainer.train_step

    def one_second_step():
        clock[0] += 1.0
        return real_step()

    trainer.train_step = one_second_step
    trainer.fit()
    assert [(r["step"], r["ms"]) for r in trainer.history["train"]] == [(s, 1000.0) for s in (2, 4, 6, 8, 10)]


@pytest.mark.parametrize("device", ["mps", "cuda:0"])
def test_ddp_refuses_a_device_it_cannot_use_instead_of_falling_back_to_the_cpu(shards, tmp_path, monkeypatch, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the device is usable")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):   # as torchrun sets them
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"cannot run DDP here"):
        T.Trainer(smoke(shards, tmp_path, device=device), log=quiet)


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("argv, message", [
    (["--preset=nope"], r"unknown preset 'nope': choose one of \['gpt2-124m', 'shakespeare-char-cpu', 'smoke'\]"),
    (["--n_layers=3"], r"unknown option --n_layers \(did you mean --n_layer"),
    (["--max_iters=many"], r"--max_iters=many: expected int"),
    (["--compile=maybe"], r"--compile=maybe: expected bool"),
    (["max_iters=3"], r"write --key=value"),
    (["--learning_rate=-1"], r"learning_rate must be > 0"),
    (["--preset=gpt2-124m"], r"no training data: pass --data=FOLDER"),
    (["--data=/no/such/folder"], r"holds no meta.json"),
    (["--sampling=shuffled"], r"sampling must be one of \['random', 'epochs'\]"),
])
def test_bad_command_lines_fail_before_training(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit, match=message):
        T.main(argv + [f"--out_dir={tmp_path}"] if not argv[0].startswith("--out_dir") else argv)
    assert "step" not in capsys.readouterr().out and not (tmp_path / "ckpt.pt").exists()


def test_resume_flag_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint at .*ckpt\.pt"):
        T.main(["--resume", f"--out_dir={tmp_path}"])


def test_the_command_trains_saves_and_resumes(shards, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanolib.train", *args], capture_output=True,
                                       text=True, timeout=120)
    first = run("--preset=smoke", f"--data={shards}", f"--out_dir={tmp_path}", "--max_iters=10")
    assert first.returncode == 0, first.stderr
    assert "done: 10 steps, final val loss" in first.stdout and "wall time" in first.stdout
    second = run("--resume", f"--out_dir={tmp_path}", "--max_iters=20")  # the checkpoint's config, extended
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "done: 20 steps" in second.stdout
    straight = T.Trainer(smoke(shards, tmp_path / "straight", max_iters=20, save=False), log=quiet)
    straight.fit()
    model, ckpt = T.model_from_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 20
    for (name, p), q in zip(straight.raw_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- review: resume settings, interrupts, early errors

def test_a_resume_trains_with_its_own_optimizer_settings_and_says_what_changed(shards, tmp_path):
    T.Trainer(smoke(shards, tmp_path, max_iters=4, eval_interval=4), log=quiet).fit()
    lines = []
    resumed = T.Trainer(smoke(shards, tmp_path, max_iters=8, eval_interval=4, weight_decay=0.0, beta2=0.95,
                              resume=str(tmp_path / "ckpt.pt")), log=lines.append)
    groups = resumed.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0] and all(g["betas"] == (0.9, 0.95) for g in groups)
    assert len(resumed.optimizer.state) > 0, "Adam's moments still come from the checkpoint"
    changed = next(line for line in lines if line.startswith("settings that differ"))
    assert "max_iters 4 -> 8" in changed and "weight_decay 0.1 -> 0.0" in changed and "beta2 0.99 -> 0.95" in changed


def test_paths_and_numpy_numbers_in_the_config_give_a_checkpoint_that_loads(shards, tmp_path):
    config = T.preset("smoke", data=shards, out_dir=tmp_path / "run", max_iters=2, eval_interval=2,
                      learning_rate=np.float64(2e-3), batch_size=np.int64(4))
    assert (config.data, config.out_dir) == (str(shards), str(tmp_path / "run"))
    assert type(config.learning_rate) is float and type(config.batch_size) is int
    T.Trainer(config, log=quiet).fit()
    assert T.load_checkpoint(tmp_path / "run" / "ckpt.pt")["train_config"]["learning_rate"] == 2e-3


@pytest.mark.parametrize("key", ["learning_rate", "min_lr", "weight_decay", "grad_clip", "beta2", "dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{key} must be a finite number"):
        T.TrainConfig(**{key: value})


def test_an_interrupted_step_is_redone_from_its_first_micro_batch(shards, tmp_path):
    settings = dict(max_iters=3, eval_interval=3, grad_accum_steps=3, save=False)
    straight = T.Trainer(smoke(shards, tmp_path, **settings), log=quiet)
    straight.fit()
    interrupted = T.Trainer(smoke(shards, tmp_path, **settings), log=quiet)
    real_next_batch, calls = interrupted.train_data.next_batch, []

    def ctrl_c_at_the_second_micro_batch():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_next_batch()

    interrupted.train_data.next_batch = ctrl_c_at_the_second_micro_batch
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert interrupted.step == 0 and interrupted.train_data.step == 0, "the data position is where it was"
    interrupted.fit()   # a half-made gradient is still in .grad: the step must not add onto it
    losses = lambda t: [r["loss"] for r in t.history["train"]]
    assert losses(interrupted) == losses(straight)


def test_an_interrupted_evaluation_still_rewinds_its_batches(shards):
    from nanolib.data import BatchSampler

    sampler = BatchSampler(shards, "val", batch_size=2, block_size=8, seed=3)
    model, calls = GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=1, n_head=1, n_embd=8)), []

    def interrupt_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        T.evaluate(model, sampler, iters=5)
    assert sampler.state_dict()["step"] == 0


def test_an_out_dir_that_cannot_be_written_fails_before_training(shards, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write checkpoints to out_dir=.*--save=false"):
        T.Trainer(smoke(shards, tmp_path / "a_file" / "run"), log=quiet)
    T.Trainer(smoke(shards, tmp_path / "a_file" / "run", save=False), log=quiet)   # nothing to write: fine


def test_an_empty_resume_and_a_missing_device_are_refused(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"--resume= is empty"):
        T.main(["--resume=", f"--out_dir={tmp_path}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available here"):
        T.main(["--preset=smoke", "--device=cuda", f"--out_dir={tmp_path}"])

# Behaviours no test checked until mutation testing (breaking the code on purpose, one change at a time)
# showed it: each test below fails on the change it was written for.


def test_evaluate_turns_dropout_off_and_eval_mode_restores_the_mode_it_found(shards):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).train()
    sampler = BatchSampler(shards, "val", batch_size=4, block_size=16)
    assert T.evaluate(model, sampler, 3) == T.evaluate(model, sampler, 3)   # dropout on: they would differ
    assert model.training
    model.eval()
    with T.eval_mode(model):
        pass
    assert not model.training, "a model in eval mode stays in eval mode"


def test_the_last_step_is_logged_evaluated_and_saved_off_the_grid(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=7, eval_interval=5, log_interval=3), log=quiet)
    history = trainer.fit()
    assert [r["step"] for r in history["eval"]] == [0, 5, 7]
    assert [r["step"] for r in history["train"]] == [3, 6, 7]
    c = trainer.config
    for r in history["train"]:   # the lr the logged step trained with (step n is optimizer step n-1)
        assert r["lr"] == pytest.approx(T.lr_at(r["step"] - 1, c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters))
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7


def test_a_non_default_grad_scale_survives_a_resume(shards, tmp_path):
    first = T.Trainer(smoke(shards, tmp_path, dtype="float16", max_iters=2, eval_interval=2), log=quiet)
    first.fit()
    first.scaler.update(1024.0)          # as after a few overflows
    first.save()
    resumed = T.Trainer(smoke(shards, tmp_path, dtype="float16", max_iters=4, eval_interval=2,
                              resume=str(tmp_path / "ckpt.pt")), log=quiet)
    assert resumed.scaler.get_scale() == 1024.0


def test_a_crash_while_saving_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2), log=quiet)
    trainer.fit()
    before = (tmp_path / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):   # atomic_write hands torch.save an open file
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.save()
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not list(tmp_path.glob(".ckpt.pt.*"))   # the temporary file is gone too


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_lr=2e-3, learning_rate=1e-3), "min_lr must be between 0 and learning_rate"),
    (dict(warmup_iters=2000, lr_decay_iters=2000), "warmup_iters must be less than lr_decay_iters"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(compile_mode="reduce-overhead", compile=True), "compile_mode must be one of"),
    (dict(compile_mode="max-autotune-no-cudagraphs"), "with compile=True"),
])
def test_inconsistent_schedules_and_betas_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.TrainConfig(**kwargs)


@pytest.mark.parametrize("override, message", [(dict(block_size=32), r"block_size=16 \(this run: 32\)"),
                                               (dict(bias=True), r"bias=False \(this run: True\)"),
                                               (dict(vocab_size=96), r"vocab_size=\d+ \(this run: 96\)"),
                                               (dict(tie_embeddings=True), r"tie_embeddings=False \(this run: True\)")])
def test_resume_names_every_model_setting_that_differs(shards, tmp_path, override, message):
    T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2), log=quiet).fit()
    with pytest.raises(ValueError, match=message):
        T.Trainer(smoke(shards, tmp_path, resume=str(tmp_path / "ckpt.pt"), **override), log=quiet)


def test_sampling_reaches_every_sampler_and_the_gpt2_preset_reads_each_window_once(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, save=False, sampling="epochs"), log=quiet)
    assert [s.sampling for s in (trainer.train_data, *trainer.eval_data.values())] == ["epochs"] * 3
    assert T.parse_args(["--sampling=epochs"]).sampling == "epochs"
    assert T.PRESETS["gpt2-124m"]["sampling"] == "epochs" and T.preset("shakespeare-char-cpu").sampling == "random"


def test_the_cpu_preset_unties_the_head_and_the_gpt2_preset_ties_it(shards, tmp_path):
    assert T.preset("shakespeare-char-cpu").tie_embeddings is False and T.preset("gpt2-124m").tie_embeddings is True
    for tie in (False, True):
        model = T.Trainer(smoke(shards, tmp_path, save=False, tie_embeddings=tie), log=quiet).raw_model
        assert (model.lm_head.weight is model.transformer.wte.weight) is tie
    assert T.parse_args(["--tie_embeddings=true"]).tie_embeddings is True


def _as_before_the_tie_option(path):
    """Rewrite a checkpoint as the code before `tie_embeddings` saved it: tied, and no such key."""
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model_config"]["tie_embeddings"], ckpt["train_config"]["tie_embeddings"]
    torch.save(ckpt, path)


def test_a_checkpoint_from_before_the_tie_option_resumes_tied(shards, tmp_path):
    T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2, tie_embeddings=True), log=quiet).fit()
    _as_before_the_tie_option(tmp_path / "ckpt.pt")
    config = T.parse_args([f"--resume={tmp_path / 'ckpt.pt'}", "--max_iters=4"])   # the checkpoint's own config
    assert config.tie_embeddings is True
    model = T.Trainer(config, log=quiet).raw_model
    assert model.lm_head.weight is model.transformer.wte.weight
    loaded, _ = T.model_from_checkpoint(tmp_path / "ckpt.pt")   # as nanolib.sample loads it
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(ValueError, match=r"tie_embeddings=True \(this run: False\)"):
        T.Trainer(smoke(shards, tmp_path, resume=str(tmp_path / "ckpt.pt"), max_iters=4), log=quiet)


def test_train_evaluation_does_not_reuse_the_training_batches(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, save=False), log=quiet)
    assert not torch.equal(trainer.eval_data["train"].batch(0)[0], trainer.train_data.batch(0)[0])


@pytest.mark.parametrize("text, value", [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False)])
def test_bool_options_read_every_spelling(text, value):
    assert T.parse_args([f"--save={text}"]).save is value


def test_a_checkpoint_missing_a_key_is_refused(tmp_path):
    torch.save({"format": T.CKPT_FORMAT, "model": {}}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match=r"lacks \[.*'rng'\]"):
        T.load_checkpoint(tmp_path / "part.pt")


def test_a_resume_from_a_hand_saved_step_evaluates_first(shards, tmp_path):
    t = T.Trainer(smoke(shards, tmp_path, max_iters=4, eval_interval=4), log=quiet)
    t.train_step()
    t.train_step()
    t.save()
    r = T.Trainer(smoke(shards, tmp_path, max_iters=4, eval_interval=4, resume=str(tmp_path / "ckpt.pt")), log=quiet)
    r.fit()
    assert [e["step"] for e in r.history["eval"]] == [2, 4]


def test_a_vocab_size_smaller_than_the_data_fails_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="smaller than the data's"):
        T.Trainer(smoke(shards, tmp_path, vocab_size=10, save=False), log=quiet)


def test_no_checkpoint_before_the_first_step(shards, tmp_path):
    class Stop:
        def on_step_begin(self, trainer):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        T.Trainer(smoke(shards, tmp_path), log=quiet).fit(callbacks=[Stop()])
    assert not (tmp_path / "ckpt.pt").exists()


# ---------------------------------------------------------------- never lose a run


def test_a_second_fresh_run_into_the_same_out_dir_is_refused_and_the_first_checkpoint_kept(shards, tmp_path):
    T.Trainer(smoke(shards, tmp_path, max_iters=4, eval_interval=2), log=quiet).fit()
    first = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"ckpt.pt already holds a run: continue it with --resume .*"
                                         r"replace it with --overwrite .*overwrite=True.*another --out_dir"):
        T.Trainer(smoke(shards, tmp_path, max_iters=4, eval_interval=2, seed=7), log=quiet)
    assert (tmp_path / "ckpt.pt").read_bytes() == first
    # asked to: a resume continues it, an overwrite replaces it
    resumed = T.Trainer(smoke(shards, tmp_path, max_iters=6, eval_interval=2, resume=str(tmp_path / "ckpt.pt")),
                        log=quiet)
    resumed.fit()
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 6
    T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2, seed=7, overwrite=True), log=quiet).fit()
    replaced = T.load_checkpoint(tmp_path / "ckpt.pt")
    assert replaced["step"] == 2 and replaced["train_config"]["seed"] == 7


def test_a_resume_from_elsewhere_may_not_replace_another_run_in_out_dir(shards, tmp_path):
    for name in ("a", "b"):
        T.Trainer(smoke(shards, tmp_path / name, max_iters=2, eval_interval=2), log=quiet).fit()
    b = (tmp_path / "b" / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        T.Trainer(smoke(shards, tmp_path / "b", max_iters=4, resume=str(tmp_path / "a" / "ckpt.pt")), log=quiet)
    assert (tmp_path / "b" / "ckpt.pt").read_bytes() == b
    T.Trainer(smoke(shards, tmp_path / "b", max_iters=4, eval_interval=2, resume=str(tmp_path / "a" / "ckpt.pt"),
                    overwrite=True), log=quiet).fit()
    assert T.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 4


def test_the_command_refuses_a_second_run_in_one_line_and_takes_a_bare_overwrite(shards, tmp_path, capsys):
    argv = ["--preset=smoke", f"--data={shards}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"]
    T.main(argv)
    first = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as refused:
        T.main(argv)
    message = str(refused.value.code)
    assert message.startswith("nanolib.train: error:") and "\n" not in message and "--overwrite" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == first
    T.main([*argv, "--overwrite", "--seed=3"])
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["train_config"]["seed"] == 3
    # the permission is not carried into a later resume of that run
    assert T.parse_args(["--resume", f"--out_dir={tmp_path}", "--max_iters=4"]).overwrite is False
    assert "--overwrite" in T.usage()


class InterruptAt:
    """Ctrl-C (KeyboardInterrupt) after a given step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_keeps_its_last_checkpoint_whole_and_resumes_from_it(shards, tmp_path):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=10, eval_interval=4), log=quiet)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(callbacks=[InterruptAt(6)])
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4 and not list(tmp_path.glob(".ckpt.pt.*"))
    resumed = T.Trainer(smoke(shards, tmp_path, max_iters=10, eval_interval=4, resume=str(tmp_path / "ckpt.pt")),
                        log=quiet)
    resumed.fit()
    straight = T.Trainer(smoke(shards, tmp_path / "straight", max_iters=10, eval_interval=4), log=quiet)
    straight.fit()
    assert [r["loss"] for r in resumed.history["train"]] == [r["loss"] for r in straight.history["train"]]


def test_an_interrupt_while_saving_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=2, eval_interval=2), log=quiet)
    trainer.fit()
    before = (tmp_path / "ckpt.pt").read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(T.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not list(tmp_path.glob(".ckpt.pt.*"))


# ---------------------------------------------------------------- throughput and the metrics file (lesson 09)


def test_log_lines_give_tokens_per_second_and_an_eta_and_the_metrics_file_every_record(shards, tmp_path):
    lines = []
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=6, eval_interval=3, log_interval=2), log=lines.append)
    history = trainer.fit()
    train_lines = [line for line in lines if "ms/step" in line]
    assert len(train_lines) == 3 and all(" tok/s | ETA " in line for line in train_lines)
    assert "MFU" not in train_lines[0]                          # no known peak on a CPU
    assert train_lines[-1].endswith("ETA 0s")
    rec = history["train"][0]
    assert rec["tok_s"] == pytest.approx(trainer.tokens_per_step / (rec["ms"] / 1000)) and rec["mfu"] is None
    assert rec["eta_s"] == pytest.approx((6 - 2) * rec["ms"] / 1000)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.pop("kind") for r in records] == ["eval", "train", "eval", "train", "train", "eval"]
    assert [r for r in records if "loss" in r] == history["train"]
    assert [r for r in records if "val_loss" in r] == history["eval"]


def test_mfu_is_the_model_flops_over_the_peak(shards, tmp_path):
    from nanolib.bench import flops_per_token
    trainer = T.Trainer(smoke(shards, tmp_path, max_iters=2), log=quiet)
    per_token = flops_per_token(trainer.model_config, trainer.raw_model.num_params(non_embedding=True),
                                trainer.config.block_size)
    assert trainer.flops_per_step == per_token * trainer.tokens_per_step
    trainer.peak_flops = 1e12                                 # as a GPU with a known peak would have it
    trainer.fit()
    rec = trainer.history["train"][-1]
    assert rec["mfu"] == pytest.approx(trainer.flops_per_step / (rec["ms"] / 1000) / 1e12)


def test_a_resumed_run_s_metrics_file_holds_the_records_up_to_its_checkpoint_then_goes_on(shards, tmp_path):
    T.Trainer(smoke(shards, tmp_path / "a", max_iters=4, eval_interval=2, log_interval=1), log=quiet).fit()
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:     # records after the checkpoint, from a crash
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 9.0}) + "\n")
    resumed = T.Trainer(smoke(shards, tmp_path / "a", max_iters=6, eval_interval=2, log_interval=1,
                              resume=str(tmp_path / "a" / "ckpt.pt")), log=quiet)
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [json.loads(line).get("loss") for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]


def test_the_duration_of_an_eta_reads_at_a_glance():
    assert [T._duration(s) for s in (4, 75, 3725, 90000)] == ["4s", "1m15s", "1h02m", "25h00m"]


def test_hellaswag_every_offline_fails_before_training_in_one_line(shards, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("NANOLIB_DATA", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as stop:
        T.main(["--preset=smoke", f"--data={shards}", f"--out_dir={tmp_path / 'out'}", "--hellaswag_every=1"])
    message = str(stop.value.code)
    assert message.startswith("nanolib.train: error:") and "hellaswag_val.jsonl" in message
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_compile_mode_reaches_torch_compile(shards, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(T.torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    T.Trainer(smoke(shards, tmp_path / "a", compile=True, save=False), log=quiet)
    T.Trainer(smoke(shards, tmp_path / "b", compile=True, compile_mode="max-autotune-no-cudagraphs", save=False), log=quiet)
    assert seen == [None, "max-autotune-no-cudagraphs"]
    cfg = T.parse_args(["--preset=smoke", "--compile=True", "--compile_mode=max-autotune-no-cudagraphs"])
    assert cfg.compile_mode == "max-autotune-no-cudagraphs"
