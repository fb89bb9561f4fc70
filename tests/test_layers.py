"""nanolib.layers: LayerNorm against nn.LayerNorm and a hand formula (outputs and gradients, with and
without bias), the MLP's width, activation and parameter count, the Block's pre-norm residual wiring and
its cache path, and the errors on bad input."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nanolib.layers import MLP, Block, LayerNorm


def make_config(n_embd=16, n_head=4, dropout=0.0, bias=True):
    return SimpleNamespace(n_embd=n_embd, n_head=n_head, dropout=dropout, bias=bias)


def randomize(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def output_and_grads(module, x, upstream):
    x = x.detach().requires_grad_()
    out = module(x)
    params = [x] + list(module.parameters())
    return out.detach(), torch.autograd.grad((out * upstream).sum(), params)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_nn_layernorm_outputs_and_gradients(bias):
    torch.manual_seed(0)
    ours = LayerNorm(20, bias=bias)
    ref = nn.LayerNorm(20, bias=bias)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.5)
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_(0.0, 0.5)
            ref.bias.copy_(ours.bias)
    x = 2.0 + 3.0 * torch.randn(3, 7, 20)
    up = torch.randn(3, 7, 20)
    out_a, grads_a = output_and_grads(ours, x, up)
    out_b, grads_b = output_and_grads(ref, x, up)
    assert len(grads_a) == len(grads_b) == (3 if bias else 2)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-5)


def test_layernorm_matches_the_formula():
    torch.manual_seed(0)
    ln = LayerNorm(10)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.5), ln.bias.normal_(0.0, 0.5)
    x = torch.randn(4, 10, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, eps inside the root
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight.double() + ln.bias.double()
    with torch.no_grad():
        assert torch.allclose(ln(x.float()).double(), expected, atol=1e-5)


def test_layernorm_defaults_and_parameters():
    ln = LayerNorm(8)
    assert ln.eps == 1e-5, "GPT-2 and nn.LayerNorm use eps = 1e-5"
    assert torch.equal(ln.weight, torch.ones(8)) and torch.equal(ln.bias, torch.zeros(8))
    assert [n for n, _ in LayerNorm(8, bias=False).named_parameters()] == ["weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_eps_on_near_constant_input_matches_nn_layernorm(bias):
    """On a variance of about 1e-6 (a tenth of eps) the output depends on eps and where it sits, so a
    wrong eps, or eps added outside the square root, shows here (on unit-scale inputs it does not)."""
    torch.manual_seed(0)
    ours, ref = LayerNorm(20, bias=bias), nn.LayerNorm(20, bias=bias)
    x = 1e-3 * torch.randn(3, 7, 20)
    with torch.no_grad():
        expected = ref(x)
        assert torch.allclose(ours(x), expected, atol=1e-5)
        centred = x - x.mean(-1, keepdim=True)
        var = (centred**2).mean(-1, keepdim=True)
        for wrong in (centred / var.sqrt(), centred / (var.sqrt() + 1e-5), centred / (var + 1e-6).sqrt()):
            assert (wrong - expected).abs().max() > 0.1, "this input must tell eps values apart"


@pytest.mark.parametrize("ndim", [0, -3, 2.5, "8"])
def test_layernorm_bad_size_is_a_clear_error(ndim):
    with pytest.raises(ValueError, match="positive int"):
        LayerNorm(ndim)


def test_mlp_shapes_width_and_parameter_count():
    torch.manual_seed(0)
    cfg = make_config(n_embd=16)
    mlp = MLP(cfg)
    assert (mlp.c_fc.in_features, mlp.c_fc.out_features) == (16, 64)
    assert (mlp.c_proj.in_features, mlp.c_proj.out_features) == (64, 16)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 16 * 16 + 5 * 16
    assert sum(p.numel() for p in MLP(make_config(n_embd=16, bias=False)).parameters()) == 8 * 16 * 16
    assert mlp(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_mlp_uses_tanh_gelu():
    mlp = randomize(MLP(make_config(n_embd=16))).eval()
    x = torch.randn(2, 5, 16)

    def gelu_tanh(t):
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))

    with torch.no_grad():
        h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
        expected = gelu_tanh(h) @ mlp.c_proj.weight.T + mlp.c_proj.bias
        assert torch.allclose(mlp(x), expected, atol=1e-5)
    # and it is the tanh form, not the exact one: they differ by up to ~4.7e-4 near |x| = 2.7
    grid = torch.linspace(-4, 4, 801)
    assert torch.allclose(mlp.gelu(grid), gelu_tanh(grid), atol=1e-6)
    assert (mlp.gelu(grid) - 0.5 * grid * (1 + torch.erf(grid / math.sqrt(2)))).abs().max() > 4e-4


def test_mlp_dropout_only_in_training():
    torch.manual_seed(0)
    mlp = MLP(make_config(n_embd=32, dropout=0.5))
    x = torch.randn(4, 16, 32)
    zeros = (mlp.train()(x) == 0).float().mean().item()
    assert 0.4 < zeros < 0.6, f"dropout should zero about half the outputs, zeroed {zeros:.2f}"
    with torch.no_grad():
        assert torch.equal(mlp.eval()(x), mlp(x)) and (mlp(x) == 0).float().mean().item() < 0.01


def test_block_is_pre_norm_residual():
    block = randomize(Block(make_config())).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        h = x + block.attn(block.ln_1(x))
        expected = h + block.mlp(block.ln_2(h))
        assert torch.allclose(block(x), expected, atol=1e-6)
        assert block(x).shape == x.shape


def test_block_with_zero_projections_is_identity_and_passes_gradient():
    block = randomize(Block(make_config())).eval()
    with torch.no_grad():
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_(), proj.bias.zero_()
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = block(x)
    assert torch.equal(out, x)
    up = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out * up).sum(), [x])
    assert torch.allclose(grad, up), "the residual stream must pass the gradient unchanged"


def test_block_parameter_names_follow_gpt2():
    names = [n for n, _ in Block(make_config()).named_parameters()]
    assert names == ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"]
    assert not any("bias" in n for n, _ in Block(make_config(bias=False)).named_parameters())


def test_block_dropout_off_in_eval():
    torch.manual_seed(0)
    block = Block(make_config(dropout=0.5))
    x = torch.randn(2, 6, 16)
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), block(x))
    block.train()
    assert not torch.equal(block(x), block(x))


def test_block_cache_path_equals_full_forward():
    class ConcatCache:
        def __init__(self):
            self.k = self.v = None

        @property
        def length(self):
            return 0 if self.k is None else self.k.size(2)

        def update(self, k, v):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

    block = randomize(Block(make_config())).eval()
    x = torch.randn(2, 9, 16)
    cache = ConcatCache()
    with torch.no_grad():
        full = block(x)
        stepped = torch.cat([block(x[:, :4], cache)] + [block(x[:, t:t + 1], cache) for t in range(4, 9)], dim=1)
    assert (stepped - full).abs().max().item() < 1e-5


def test_block_bad_head_count_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by n_head"):
        Block(make_config(n_embd=16, n_head=3))
