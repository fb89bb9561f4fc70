"""nanolib.profiling (lesson 09, section 8): sorting operators into the parts of a step, profiling real
Trainer steps on the CPU, and the plot; nanolib.plan's reference band from the published runs."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from nanolib import plan as P
from nanolib import profiling as prof
from nanolib import train as T
from nanolib.core import tinyshakespeare
from nanolib.data import write_shards
from nanolib.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    text = tinyshakespeare().read_text(encoding="utf-8")[:30_000]
    return write_shards([text], CharTokenizer.from_text(text), tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("name, shapes, part", [
    ("aten::mm", [[512, 32], [32, 1000]], "head + cross-entropy"),
    ("aten::mm", [[512, 32], [32, 96]], "other matmuls"),
    ("aten::addmm", [[96], [512, 32], [32, 96]], "other matmuls"),
    ("aten::_log_softmax_backward_data", [[512, 1000], [512, 1000], [], []], "head + cross-entropy"),
    ("aten::nll_loss_forward", [], "head + cross-entropy"),
    ("aten::fill_", [[512, 1000], []], "head + cross-entropy"),
    ("aten::fill_", [[512, 32], []], "other"),
    ("aten::_scaled_dot_product_efficient_attention_backward", [[2, 2, 8, 16]], "attention"),
    ("aten::_fused_adamw_", [[], []], "optimizer"),
    ("aten::_foreach_norm", [[]], "optimizer"),
    ("aten::linalg_vector_norm", [[32, 32], [], [], [], []], "optimizer"),
    ("Optimizer.step#AdamW.step", [], "optimizer"),
    ("aten::embedding_dense_backward", [[512, 32], [512], [], [], []], "embeddings"),
    ("aten::native_layer_norm_backward", [[512, 32]], "norms, GELU, adds"),
    ("aten::gelu", [[512, 128]], "norms, GELU, adds"),
    ("aten::_to_copy", [[512, 32]], "copies and casts"),
    ("autograd::engine::evaluate_function: AddmmBackward0", [], "other"),
    ("nanolib: next_batch", [], "other"),
])
def test_operators_are_sorted_into_the_parts_of_a_step(name, shapes, part):
    assert part in prof.CATEGORIES
    assert prof.op_category(name, shapes, 1000) == part


def test_profile_trainer_takes_real_steps_and_sorts_their_time(shards, tmp_path):
    trainer = T.Trainer(T.preset("smoke", data=str(shards), out_dir=str(tmp_path), save=False,
                                 vocab_size=4096, n_embd=32), log=lambda *a: None)
    sampler_class_method = type(trainer.train_data).next_batch
    result = prof.profile_trainer(trainer, steps=2, warmup=1)
    assert trainer.step == 3                                    # the steps were taken
    assert "next_batch" not in vars(trainer.train_data)         # the sampler has its own method back
    assert type(trainer.train_data).next_batch is sampler_class_method
    assert set(result["by_category"]) == set(prof.CATEGORIES) and result["device"] == "cpu"
    assert result["idle"] is None and result["sync"] is None and result["data"] > 0
    assert all(ms >= 0 for ms in result["by_category"].values())
    assert result["by_category"]["head + cross-entropy"] > 0 and result["by_category"]["optimizer"] > 0
    assert 0 < sum(result["by_category"].values()) <= result["wall"] * 1.05
    assert result["top"] and all(isinstance(name, str) and ms > 0 for name, ms in result["top"])
    shares = prof.plot_time_breakdown(result, trainer.raw_model.config)
    assert abs(sum(shares.values()) - 1) < 1e-9
    with pytest.raises(ValueError, match="steps >= 1"):
        prof.profile_trainer(trainer, steps=0)


def test_a_failing_step_still_gives_the_sampler_its_method_back(shards, tmp_path, monkeypatch):
    trainer = T.Trainer(T.preset("smoke", data=str(shards), out_dir=str(tmp_path), save=False), log=lambda *a: None)
    prof.profile_trainer(trainer, steps=1, warmup=0)
    monkeypatch.setattr(trainer, "train_step", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prof.profile_trainer(trainer, steps=1, warmup=0)
    assert "next_batch" not in vars(trainer.train_data)


def test_matmul_flops_by_hand():
    flops = prof.matmul_flops(P.GPT2_124M)
    assert flops == {"head + cross-entropy": 2 * 768 * 50304, "other matmuls": 24 * 768 * 768 * 12,
                     "attention": 4 * 1024 * 768 * 12}
    # the blocks' and head's weights are the non-embedding parameters but biases and norms: 6N's matmul part
    weights = (flops["head + cross-entropy"] + flops["other matmuls"]) // 2
    assert 0 < P.non_embedding_params(P.GPT2_124M) - weights < 200_000


def test_the_reference_band_reads_the_published_runs():
    step_tokens = P.REFERENCE_TOKENS_PER_STEP
    for j, step in enumerate(P.REFERENCE_STEPS):
        vals = [run["val"][j] for run in P.REFERENCE_RUNS.values()]
        assert P.reference_band(step * step_tokens) == (min(vals), max(vals))
        hellas = [run["hellaswag"][j] for run in P.REFERENCE_RUNS.values()]
        assert P.reference_band(step * step_tokens, "hellaswag") == pytest.approx((min(hellas), max(hellas)))
    low, high = P.reference_band(1250 * step_tokens)                # between 1000 and 1500, in log(tokens)
    assert 3.7933 < low < high < 4.1544
    assert P.reference_band(249 * step_tokens) is None and P.reference_band(19_074 * step_tokens) is None
    assert P.reference_band(19_073 * step_tokens) == P.reference_band(19_072 * step_tokens)
    assert all(len(run[m]) == len(P.REFERENCE_STEPS) for run in P.REFERENCE_RUNS.values() for m in ("val", "hellaswag"))
    with pytest.raises(ValueError, match="metric"):
        P.reference_band(1e9, "loss")


def test_the_command_profiles_a_trial_trainer_and_refuses_bad_options(shards, capsys):
    result = prof.main(["--preset=smoke", f"--data={shards}", "--steps=1", "--out_dir=/nonexistent/never/written"])
    out = capsys.readouterr().out
    assert "head + cross-entropy" in out and "1 steps after 1 warm-up" in out and "longest operators:" in out
    assert set(result["by_category"]) == set(prof.CATEGORIES)
    for argv, message in ((["--preset=smoke", "--stpes=2"], "unknown option --stpes"),
                          (["--preset=smoke", "--steps=two"], "invalid literal"),
                          (["--preset=smoke", "--steps=0"], "at least 1"),
                          (["--preset=nope"], "unknown preset")):
        with pytest.raises(SystemExit, match=message):
            prof.main(argv)
