"""nanolib.attention.CausalSelfAttention against independent implementations: a loop over heads and
positions written here, and PyTorch's nn.MultiheadAttention; causality, dropout, the KV-cache path and
the errors on bad input."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nanolib.attention import CausalSelfAttention


def make_config(n_embd=12, n_head=3, dropout=0.0, bias=True):
    return SimpleNamespace(n_embd=n_embd, n_head=n_head, dropout=dropout, bias=bias)


def make_layer(seed=0, std=0.5, **kw):
    torch.manual_seed(seed)
    layer = CausalSelfAttention(make_config(**kw)).eval()
    with torch.no_grad():  # non-zero biases, so that a bias in the wrong place shows
        for p in layer.parameters():
            p.normal_(0.0, std)
    return layer


def loop_attention(layer, x):
    """Causal multi-head attention one head, one position at a time, from the layer's raw weights."""
    W, b = layer.c_attn.weight, layer.c_attn.bias
    C, n_head = layer.n_embd, layer.n_head
    hs = C // n_head
    B, T, _ = x.shape
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for h in range(n_head):
        rows = {name: slice(i * C + h * hs, i * C + (h + 1) * hs) for i, name in enumerate("qkv")}
        proj = {name: x.double() @ W[r].double().T + (0 if b is None else b[r].double()) for name, r in rows.items()}
        for bi in range(B):
            for t in range(T):
                scores = torch.tensor([float(proj["q"][bi, t] @ proj["k"][bi, s]) / math.sqrt(hs)
                                       for s in range(t + 1)], dtype=torch.float64)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[bi, t, h * hs:(h + 1) * hs] = sum(weights[s] * proj["v"][bi, s] for s in range(t + 1))
    y = out @ layer.c_proj.weight.double().T
    if layer.c_proj.bias is not None:
        y = y + layer.c_proj.bias.double()
    return y.float()


class ConcatCache:
    """Minimal KV cache of the contract: .length and .update(k, v) that concatenates along time."""

    def __init__(self, n_head, head_size):
        self.k = self.v = None
        self.shape = (n_head, head_size)

    @property
    def length(self):
        return 0 if self.k is None else self.k.size(2)

    def update(self, k, v):
        assert k.shape[1:2] + k.shape[3:] == self.shape and k.shape == v.shape, "keys must be (B, n_head, T, hs)"
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@pytest.mark.parametrize("bias", [True, False])
def test_matches_independent_loop_implementation(bias):
    layer = make_layer(bias=bias)
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        diff = (layer(x) - loop_attention(layer, x)).abs().max().item()
    assert diff < 1e-5, diff


def test_matches_torch_multihead_attention_with_same_weights():
    layer = make_layer(n_embd=32, n_head=4, std=0.2)  # outputs of order 1, so 1e-5 is float32 rounding
    mha = nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    with torch.no_grad():  # same layout: in_proj stacks q, k, v rows; heads are consecutive slices
        mha.in_proj_weight.copy_(layer.c_attn.weight)
        mha.in_proj_bias.copy_(layer.c_attn.bias)
        mha.out_proj.weight.copy_(layer.c_proj.weight)
        mha.out_proj.bias.copy_(layer.c_proj.bias)
    mha.eval()
    x = torch.randn(3, 10, 32)
    future = torch.ones(10, 10, dtype=torch.bool).triu(diagonal=1)  # True = NOT allowed, for nn.MHA
    with torch.no_grad():
        expected, _ = mha(x, x, x, attn_mask=future, need_weights=False)
        assert (layer(x) - expected).abs().max().item() < 1e-5


def test_gpt2_parameter_names_and_shapes():
    layer = CausalSelfAttention(make_config(n_embd=768, n_head=12))
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"c_attn.weight": (2304, 768), "c_attn.bias": (2304,),
                      "c_proj.weight": (768, 768), "c_proj.bias": (768,)}
    no_bias = CausalSelfAttention(make_config(bias=False))
    assert [n for n, _ in no_bias.named_parameters()] == ["c_attn.weight", "c_proj.weight"]


def test_causal_changing_token_t_changes_nothing_before_t():
    layer = make_layer()
    x = torch.randn(2, 9, 12)
    with torch.no_grad():
        base = layer(x)
        for t in range(9):
            x2 = x.clone()
            x2[:, t] += torch.randn(2, 12)
            out = layer(x2)
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), f"changing token {t} changed the past"
            assert not torch.allclose(out[:, t], base[:, t], atol=1e-4), f"token {t} must change its own output"


def test_causal_jacobian_is_block_lower_triangular():
    layer = make_layer(n_embd=8, n_head=2)
    x = torch.randn(1, 5, 8)
    jac = torch.autograd.functional.jacobian(lambda inp: layer(inp), x)  # (1, 5, 8, 1, 5, 8)
    influence = jac.abs().sum(dim=(0, 2, 3, 5))  # [output position, input position]
    assert torch.all(influence.triu(diagonal=1) == 0)
    assert torch.all(influence.diagonal() > 0)


def test_dropout_is_off_in_eval_and_on_in_train():
    torch.manual_seed(0)
    layer = CausalSelfAttention(make_config(dropout=0.5))
    x = torch.randn(2, 6, 12)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    # the same weights without dropout give the eval output
    plain = CausalSelfAttention(make_config(dropout=0.0))
    plain.load_state_dict(layer.state_dict())
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(plain.train()(x), layer(x), atol=1e-6)


def test_attention_weight_dropout_alone_acts_in_training_only():
    """With resid_dropout switched off, only the dropout on the attention weights (SDPA's dropout_p) is
    left: training-mode calls must still differ, evaluation-mode calls must not."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(make_config(dropout=0.5))
    layer.resid_dropout = nn.Identity()
    x = torch.randn(2, 6, 12)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "the attention weights must be dropped in training mode"
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_output_dropout_zeroes_outputs_in_training():
    torch.manual_seed(0)
    layer = CausalSelfAttention(make_config(n_embd=32, n_head=4, dropout=0.5)).train()
    zeros = (layer(torch.randn(4, 16, 32)) == 0).float().mean().item()
    assert 0.4 < zeros < 0.6, f"resid_dropout should zero about half the outputs, zeroed {zeros:.2f}"


@pytest.mark.parametrize("prefill", [1, 5])
def test_cache_prefill_then_single_tokens_equals_full_forward(prefill):
    layer = make_layer()
    x = torch.randn(2, 11, 12)
    cache = ConcatCache(n_head=3, head_size=4)
    with torch.no_grad():
        full = layer(x)
        outs = [layer(x[:, :prefill], cache)]
        for t in range(prefill, 11):
            assert cache.length == t
            outs.append(layer(x[:, t:t + 1], cache))
    assert cache.length == 11
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-5


def test_cache_chunks_after_a_past_equal_full_forward():
    layer = make_layer()
    x = torch.randn(2, 12, 12)
    cache = ConcatCache(n_head=3, head_size=4)
    with torch.no_grad():
        full = layer(x)
        outs = [layer(x[:, :4], cache), layer(x[:, 4:7], cache), layer(x[:, 7:8], cache), layer(x[:, 8:], cache)]
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("n_embd, n_head", [(12, 5), (12, 0), (0, 3), (12, -3)])
def test_bad_head_count_is_a_clear_error(n_embd, n_head):
    with pytest.raises(ValueError, match="n_head"):
        CausalSelfAttention(make_config(n_embd=n_embd, n_head=n_head))


def test_not_divisible_error_names_the_fix():
    with pytest.raises(ValueError, match=r"divisible.*Pick n_head in \[1, 2, 3, 4, 6, 12\]"):
        CausalSelfAttention(make_config(n_embd=12, n_head=5))


@pytest.mark.parametrize("shape", [(2, 5, 8), (5, 12), (1, 2, 5, 12)])
def test_wrong_input_shape_is_a_clear_error(shape):
    layer = make_layer()
    with pytest.raises(ValueError, match=r"\(batch, time, n_embd=12\)"):
        layer(torch.randn(*shape))
