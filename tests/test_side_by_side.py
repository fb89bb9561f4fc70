"""benchmarks/side_by_side.py: nanolib's Trainer, fed nanoGPT's batches and given nanoGPT's three small
differences (exact GELU, plain AdamW, its warmup), trains exactly as the restated nanoGPT loop does. This is
what lets the benchmark say that a single seed's gap between the two is the draw of windows, not the code."""
import importlib.util
from pathlib import Path

import pytest

from nanolib.train import preset

SHORT = dict(max_iters=30, lr_decay_iters=30, warmup_iters=5, eval_interval=10, eval_iters=4, save=False)


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parents[1] / "benchmarks" / "side_by_side.py"
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_on_draws(bench, tmp_path, match):
    config = preset("shakespeare-char-cpu", out_dir=str(tmp_path), **SHORT)
    return bench.final_val_loss(bench.TrainerOnNanoGPTDraws(config, match=match))


def test_trainer_matched_to_nanogpt_trains_exactly_as_the_nanogpt_loop(bench, tmp_path, one_thread):
    reference, reference_model = bench.nanogpt_loop(1337, preset("shakespeare-char-cpu", **SHORT))
    matched, matched_model = trainer_on_draws(bench, tmp_path, match=True)   # the preset unties: this ties
    assert matched_model.lm_head.weight is matched_model.transformer.wte.weight
    # equal up to how the 4 eval losses are summed (float32 tensor vs Python float)
    assert matched == pytest.approx(reference, abs=1e-6)
    # the same weights, so the same loss over the whole val split
    whole, eval_std = bench.whole_val_loss(matched_model)
    assert (whole, eval_std) == bench.whole_val_loss(reference_model) and 0.001 < eval_std < 0.1
    # and the three differences do change the result: the check above is not vacuous
    assert abs(trainer_on_draws(bench, tmp_path, match=False)[0] - reference) > 1e-4


@pytest.mark.parametrize("flags, trainer_tied", [([], False), (["--tied"], True)])
def test_tied_reaches_the_trainer_column_and_the_draws_column_is_always_tied(bench, monkeypatch, flags,
                                                                            trainer_tied):
    built = []

    def build(config, *args, **kwargs):   # stands in for both trainers: records the head, trains nothing
        built.append(config.tie_embeddings)
        return config

    monkeypatch.setattr(bench, "Trainer", build)
    monkeypatch.setattr(bench, "TrainerOnNanoGPTDraws", build)
    monkeypatch.setattr(bench, "final_val_loss", lambda trainer: (1.9, None))
    monkeypatch.setattr(bench, "whole_val_loss", lambda model: (1.9, 0.01))
    bench.main(["--only", "draws,trainer", *flags])
    assert built == [True, trainer_tied]


def test_seed_lists_parse(bench):
    assert bench.parse_seeds("1337") == [1337]
    assert bench.parse_seeds("1337-1339,5") == [1337, 1338, 1339, 5]
