"""nanolib.stats: the recorded numbers against tensors computed independently with autograd, and no hook
left behind."""
import gc
import weakref

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn

from nanolib.stats import (StatsRecorder, TensorStats, format_table, gelu_saturated, plot_curves,
                           plot_histograms, tanh_saturated)

matplotlib.use("Agg")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))


def reference(model, x):
    """Activations and their gradients computed by hand with retain_grad, no hooks."""
    h1 = model[0](x)
    t = model[1](h1)
    h2 = model[2](t)
    g = model[3](h2)
    for v in (h1, t, h2):
        v.retain_grad()
    model[4](g).sum().backward()
    return h1, t, h2


def hooks_on(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_outputs_and_gradients_match_autograd():
    model, x = mlp(), torch.randn(64, 8)
    with StatsRecorder(model, {"tanh": model[1]}, saturated=tanh_saturated) as rec:
        model(x).sum().backward()
    model.zero_grad()
    h1, t, h2 = reference(model, x)
    s, g = rec.acts["tanh"], rec.grads["tanh"]
    assert s.mean == pytest.approx(t.mean().item(), abs=1e-6) and s.std == pytest.approx(t.std().item(), rel=1e-5)
    assert s.saturation == pytest.approx((t.abs() > 0.97).float().mean().item())
    assert g.std == pytest.approx(t.grad.std().item(), rel=1e-5)
    assert g.mean == pytest.approx(t.grad.mean().item(), abs=1e-7)


def test_inputs_are_recorded_with_their_gradient():
    model, x = mlp(), torch.randn(64, 8)
    with StatsRecorder(model, {"gelu": model[3]}, on="input", saturated=gelu_saturated) as rec:
        model(x).sum().backward()
    model.zero_grad()
    _, _, h2 = reference(model, x)
    assert rec.acts["gelu"].std == pytest.approx(h2.std().item(), rel=1e-5)
    assert rec.acts["gelu"].saturation == pytest.approx((h2 < -3).float().mean().item())
    assert rec.grads["gelu"].std == pytest.approx(h2.grad.std().item(), rel=1e-5)


def test_selection_by_names_predicate_and_leaves():
    model = mlp()
    assert list(StatsRecorder(model, ["0", "2"]).modules) == ["0", "2"]
    assert list(StatsRecorder(model, lambda n, m: isinstance(m, nn.Linear)).modules) == ["0", "2", "4"]
    assert list(StatsRecorder(model).modules) == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match="no module named"):
        StatsRecorder(model, ["7"])
    with pytest.raises(ValueError, match="no module selected"):
        StatsRecorder(model, lambda n, m: False)
    with pytest.raises(ValueError, match="on must be"):
        StatsRecorder(model, on="weights")


def test_grads_follow_module_order_and_belong_to_the_last_forward():
    model, x = mlp(), torch.randn(32, 8)
    with StatsRecorder(model) as rec:
        model(x).sum().backward()
        assert list(rec.grads) == list(rec.acts) == ["0", "1", "2", "3", "4"]  # backward filled them 4..0
        model(x)  # a new forward without backward: no stale gradients
        assert rec.grads == {}
    with torch.no_grad(), StatsRecorder(model) as rec:
        model(x)
    assert len(rec.acts) == 5 and rec.grads == {}


def test_hooks_are_removed_and_nothing_leaks():
    model, x = mlp(), torch.randn(16, 8)
    before = hooks_on(model)
    rec = StatsRecorder(model)
    with rec:
        assert hooks_on(model) == before + 5 and len(rec.handles) == 5
        out = model(x)
    assert hooks_on(model) == before and rec.handles == [] and rec._tensor_handles == {}
    out.sum().backward()  # the graph built while recording no longer reports to the recorder
    assert rec.grads == {}
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert ref() is None, "the model (or its graph) still holds the recorder"


def test_hooks_are_removed_when_the_block_raises():
    model = mlp()
    with pytest.raises(RuntimeError):
        with StatsRecorder(model):
            model(torch.randn(4, 3))  # wrong width
    assert hooks_on(model) == 0
    rec = StatsRecorder(model).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        rec.attach()
    rec.remove()
    assert hooks_on(model) == 0


def test_non_tensor_output_is_a_clear_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match="not a tensor"), StatsRecorder(model, ["0"]):
        model(torch.randn(2))
    assert hooks_on(model) == 0


def test_summary_table_and_sampling():
    model, x = mlp(), torch.randn(64, 8)
    with StatsRecorder(model, ["1"], saturated=tanh_saturated, max_samples=100) as rec:
        model(x).sum().backward()
    rows = rec.rows()
    assert [r["name"] for r in rows] == ["1"] and set(rows[0]) == {"name", "mean", "std", "saturation %", "grad std"}
    text = rec.summary()
    assert text.splitlines()[0].split() == ["name", "mean", "std", "saturation", "%", "grad", "std"]
    assert f"{rows[0]['std']:.4g}" in text
    assert rec.acts["1"].sample.numel() <= 100 and rec.acts["1"].sample.dtype == torch.float32
    assert format_table([]) == "(nothing recorded)"
    assert "-" in format_table([{"a": None}])
    assert format_table([{"a": 0.000123456, "b": 0.000123456}], formats={"a": "+.4f"}).splitlines()[1].split() == ["+0.0001", "0.0001235"]
    assert f"{rows[0]['mean']:+.4f}" in text


@pytest.mark.parametrize("n, max_samples", [(39_999, 20_000), (20_001, 20_000), (1_000, 7), (50, 100)])
def test_sample_is_evenly_strided_over_the_whole_tensor(n, max_samples):
    """Not a prefix: the sample reaches the end of the tensor, with one stride throughout."""
    sample = TensorStats.of(torch.arange(n, dtype=torch.float32), max_samples=max_samples).sample
    if n > max_samples:
        assert max_samples // 2 < sample.numel() <= max_samples  # a stride of ceil(n / max_samples)
    else:
        assert sample.numel() == n
    strides = sample.diff().unique()
    assert len(strides) == 1 and sample[0] == 0
    assert sample[-1] >= n - strides.item(), f"the sample stops at {sample[-1]:.0f} of {n}"


def test_tensor_stats_of_known_values():
    s = TensorStats.of(torch.tensor([-4.0, -2.0, 0.0, 2.0]), gelu_saturated)
    assert s.mean == -1.0 and s.std == pytest.approx(np.std([-4, -2, 0, 2], ddof=1)) and s.saturation == 0.25
    assert TensorStats.of(torch.tensor([0.99, -0.5]), tanh_saturated).saturation == 0.5


def test_plots_return_what_they_draw():
    import matplotlib.pyplot as plt
    torch.manual_seed(0)
    stats = {"a": TensorStats.of(torch.randn(10_000)), "b": TensorStats.of(3 * torch.randn(10_000))}
    drawn = plot_histograms(stats, bins=50)
    for name, (centers, density) in drawn.items():
        assert len(centers) == len(density) == 50
        assert np.sum(density) * (centers[1] - centers[0]) == pytest.approx(1.0, rel=1e-4)  # a density
    assert np.ptp(drawn["b"][0]) > 2 * np.ptp(drawn["a"][0])
    curves = plot_curves({"x": [1, 2, 3]}, logy=True)
    assert curves == {"x": [1.0, 2.0, 3.0]}
    ax = plt.gca()
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[1.0, 2.0, 3.0]]
    plt.close("all")
