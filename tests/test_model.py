"""nanolib.model: parameter counts, tying, loss at init, init schemes, input checks, and loading Hugging Face
GPT-2 checkpoints, compared against transformers' own GPT2LMHeadModel."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanolib.core import DownloadError
from nanolib.model import GPT, INIT_SCHEMES, GPTConfig, _config_from_hf, init_weights


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**(dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32) | kw))


# ---------------------------------------------------------------- counts and tying

def test_gpt2_124m_parameter_counts():
    with torch.device("meta"):
        assert GPT(GPTConfig(vocab_size=50257)).num_params() == 124_439_808
        assert GPT(GPTConfig()).num_params() == 124_475_904
        # nanoGPT's "non-embedding" count leaves out the position embedding only
        assert GPT(GPTConfig()).num_params(non_embedding=True) == 124_475_904 - 1024 * 768


def test_num_params_counts_the_tied_matrix_once():
    model = GPT(tiny())
    every_name = dict(model.named_parameters(remove_duplicate=False))  # a shared Parameter under each name
    assert every_name["lm_head.weight"] is every_name["transformer.wte.weight"]
    assert model.num_params() == sum(p.numel() for p in every_name.values()) - 97 * 32  # V*C counted once
    # the closed form V*C + T*C + L*(12C^2 + 13C) + 2C
    C, V, T, L = 32, 97, 16, 2
    assert model.num_params() == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def test_head_is_tied_to_token_embedding():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 97, (2, 8))
    _, loss = model(idx, torch.randint(0, 97, (2, 8)))
    loss.backward()
    # the shared matrix gets the gradient of both uses: rows of unused tokens still get the head's part
    unused = sorted(set(range(97)) - set(idx.flatten().tolist()))
    assert model.transformer.wte.weight.grad[unused].abs().sum() > 0


def test_an_untied_head_has_its_own_matrix():
    torch.manual_seed(0)
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    head, wte = untied.lm_head.weight, untied.transformer.wte.weight
    assert head is not wte and not torch.equal(head, wte)
    assert untied.num_params() == tied.num_params() + 97 * tied.config.n_embd
    assert abs(head.std().item() - 0.02) < 0.002 and abs(wte.std().item() - 0.02) < 0.002   # both N(0, 0.02)
    idx = torch.randint(0, 97, (2, 8))
    untied(idx, torch.randint(0, 97, (2, 8)))[1].backward()
    unused = sorted(set(range(97)) - set(idx.flatten().tolist()))
    assert wte.grad[unused].abs().sum() == 0 and head.grad[unused].abs().sum() > 0   # each gets its own part
    state = untied.state_dict()   # a tied model saves one storage under both names; this one two
    assert state["transformer.wte.weight"].data_ptr() != state["lm_head.weight"].data_ptr()


@pytest.mark.parametrize("key", ["bias", "tie_embeddings"])
def test_switches_must_be_booleans(key):
    with pytest.raises(ValueError, match=f"GPTConfig.{key} must be True or False"):
        GPTConfig(**{key: "no"})


def test_loss_at_init_is_close_to_ln_vocab():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_targets_minus_one_are_ignored():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    masked = targets.clone()
    masked[:, :4] = -1
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


class _ListCache:
    """A minimal KV cache of the contract GPT.forward and CausalSelfAttention document (`.length`, `.layer(i)`,
    a layer's `.update(k, v)` returning all keys and values so far), independent of lesson 07's."""

    class _Layer:
        def __init__(self, owner):
            self.owner, self.k, self.v = owner, None, None

        @property
        def length(self):
            return self.owner.length

        def update(self, k, v):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

    def __init__(self, n_layer):
        self.length, self.layers = 0, [self._Layer(self) for _ in range(n_layer)]

    def layer(self, i):
        return self.layers[i]


def test_kv_cache_positions_continue():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        full, _ = model(idx)
        cache, steps = _ListCache(2), []
        for chunk in (idx[:, :6], idx[:, 6:7], idx[:, 7:]):
            logits, _ = model(chunk, kv_cache=cache)
            cache.length += chunk.size(1)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_bad_config():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=12)
    for bad in (dict(n_layer=0), dict(vocab_size=-1), dict(block_size=1.5), dict(n_head=True), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            GPTConfig(**bad)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.zeros(1, 17, dtype=torch.long)), "longer than block_size"),
    (lambda m: m(torch.tensor([[1, 97]])), r"token ids must be in \[0, 97\)"),
    (lambda m: m(torch.tensor([[-2, 3]])), r"token ids must be in \[0, 97\)"),
    (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), "targets must have the shape"),
    (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 97)), "targets must be in"),
    (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)), "targets must be integer"),
    (lambda m: m(torch.zeros(2, 4)), "integer token ids"),
    (lambda m: m(torch.zeros(4, dtype=torch.long)), r"\(batch, time\)"),
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "empty"),
])
def test_bad_input_fails_before_any_work(call, message):
    model = GPT(tiny())
    touched = []
    handle = model.transformer.wte.register_forward_hook(lambda *a: touched.append(True))
    with pytest.raises(ValueError, match=message):
        call(model)
    handle.remove()
    assert not touched, "the error must come before the embedding lookup"


def test_int32_ids_work_like_int64():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 8))
    a, la = model(idx, idx)
    b, lb = model(idx.int(), idx.int())
    assert torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------- init schemes

def _stds(model):
    b = model.transformer.h[0]
    return {"wte": model.transformer.wte.weight.std().item(), "wpe": model.transformer.wpe.weight.std().item(),
            "c_attn": b.attn.c_attn.weight.std().item(), "c_fc": b.mlp.c_fc.weight.std().item(),
            "attn.c_proj": b.attn.c_proj.weight.std().item(), "mlp.c_proj": b.mlp.c_proj.weight.std().item()}


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_scheme_stds(scheme):
    torch.manual_seed(0)
    C, L = 128, 6
    model = init_weights(GPT(GPTConfig(block_size=256, vocab_size=1024, n_layer=L, n_head=4, n_embd=C)), scheme)
    want = {"normal": dict.fromkeys(["wte", "wpe", "c_attn", "c_fc", "attn.c_proj", "mlp.c_proj"], 0.02)}
    want["nanogpt"] = want["normal"] | {"attn.c_proj": 0.02 / math.sqrt(2 * L), "mlp.c_proj": 0.02 / math.sqrt(2 * L)}
    want["times_0.02"] = want["normal"] | {"attn.c_proj": 0.0004, "mlp.c_proj": 0.0004}
    # PyTorch's defaults: Linear U(+-1/sqrt(fan_in)) has std 1/sqrt(3 fan_in); Embedding N(0, 1);
    # the tied matrix keeps lm_head's Linear init (fan_in = C)
    want["pytorch"] = {"wte": 1 / math.sqrt(3 * C), "wpe": 1.0, "c_attn": 1 / math.sqrt(3 * C),
                       "c_fc": 1 / math.sqrt(3 * C), "attn.c_proj": 1 / math.sqrt(3 * C),
                       "mlp.c_proj": 1 / math.sqrt(3 * 4 * C)}
    got = _stds(model)
    for key, value in want[scheme].items():
        assert got[key] == pytest.approx(value, rel=0.05), key
    for name, p in model.named_parameters():
        if "ln_" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias") and scheme != "pytorch":
            assert torch.all(p == 0), name
    if scheme == "pytorch":
        assert model.transformer.h[0].mlp.c_fc.weight.abs().max() <= 1 / math.sqrt(C)
        assert model.transformer.h[0].mlp.c_fc.bias.abs().max() > 0


def test_default_init_is_nanogpt_and_std_is_scaled():
    torch.manual_seed(0)
    a = GPT(tiny(n_layer=8, n_embd=64))
    got = _stds(a)
    assert got["c_fc"] == pytest.approx(0.02, rel=0.05)
    assert got["mlp.c_proj"] == pytest.approx(0.02 / 4, rel=0.05)
    init_weights(a, "nanogpt", std=0.1)
    assert _stds(a)["mlp.c_proj"] == pytest.approx(0.1 / 4, rel=0.05)
    with pytest.raises(ValueError, match="unknown init scheme"):
        init_weights(a, "xavier")
    with pytest.raises(ValueError, match="std must be positive"):
        init_weights(a, "normal", std=0)


def _residual_growth(scheme, n_layer):
    """Std of the residual stream after the last Block over its std after the embeddings."""
    torch.manual_seed(0)
    model = init_weights(GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=n_layer, n_head=2, n_embd=64)), scheme)
    seen = {}
    model.transformer.drop.register_forward_hook(lambda m, a, out: seen.__setitem__("emb", out.std().item()))
    model.transformer.h[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("last", out.std().item()))
    with torch.no_grad():
        model(torch.randint(0, 128, (4, 32)))
    return seen["last"] / seen["emb"]


def test_nanogpt_init_keeps_residual_growth_independent_of_depth():
    shallow, deep = _residual_growth("nanogpt", 6), _residual_growth("nanogpt", 24)
    assert deep == pytest.approx(shallow, rel=0.15)
    n_shallow, n_deep = _residual_growth("normal", 6), _residual_growth("normal", 24)
    assert n_deep / n_shallow == pytest.approx(2.0, rel=0.2)  # sqrt(24 / 6)
    assert _residual_growth("times_0.02", 24) < 1.05


# ---------------------------------------------------------------- from_pretrained

def _random_hf_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")  # a test-only dependency
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=101, n_positions=24, n_embd=48, n_layer=3, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and LayerNorm weights too, so a mix-up anywhere shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save_old_style_bin(hf, folder):
    """A checkpoint as older GPT-2 uploads have it: pytorch_model.bin, keys without "transformer.", the
    causal-mask buffers `attn.bias` / `attn.masked_bias`, and the (tied) head stored too."""
    hf.config.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin"])
def test_from_pretrained_matches_transformers(tmp_path, layout):
    hf = _random_hf_gpt2()
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        _save_old_style_bin(hf, tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.vocab_size == 101 and ours.config.block_size == 24 and ours.config.n_layer == 3
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    idx = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        hf_logits = hf(idx).logits
    assert torch.allclose(ours_logits, hf_logits, atol=1e-5), (ours_logits - hf_logits).abs().max()
    # and the loaded model trains: gradients reach every parameter
    _, loss = ours.train()(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_from_pretrained_refuses_other_arithmetic(tmp_path):
    hf = _random_hf_gpt2()
    hf.config.activation_function = "relu"
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"activation_function": "gelu_new", "n_inner": 100}))
    with pytest.raises(ValueError, match=r"n_inner=100; this GPT computes an MLP of width 4 \* n_embd = 192"):
        GPT.from_pretrained(tmp_path)


def test_generate_samples_from_a_loaded_checkpoint(tmp_path):
    """Lesson 05 says lesson 07's generate works on what from_pretrained returns: greedy decoding matches
    transformers' model, step by step."""
    from nanolib.generate import generate
    hf = _random_hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    prompt = torch.randint(0, 101, (2, 5))
    out = generate(ours, prompt, max_new_tokens=6, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, hf(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def _hf_command(message: str) -> list:
    """The `hf ...` command an error message names, as argv."""
    found = re.search(r"`(hf [^`]+)`", message)
    assert found, f"no `hf ...` command in: {message}"
    return found.group(1).split()


def _assert_hf_command_exists(argv: list) -> None:
    """The command is installed next to this Python (huggingface_hub >= 0.34 has `hf`; 1.0 removed `huggingface-cli`)
    and knows the subcommand and every option the message uses."""
    exe = shutil.which(argv[0], path=str(Path(sys.executable).parent)) or shutil.which(argv[0])
    assert exe, f"the message names `{argv[0]}`, which is not installed: pip install 'huggingface_hub>=0.34'"
    help_text = subprocess.run([exe, argv[1], "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    for option in (a for a in argv if a.startswith("--")):
        assert option in help_text.stdout, f"`{argv[0]} {argv[1]}` has no {option}"


def test_from_pretrained_offline_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        GPT.from_pretrained("gpt2", cache_dir=tmp_path / "empty-cache")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "GPT.from_pretrained('DIR')" in message and "'gpt2'" in message
    argv = _hf_command(message)
    assert argv == ["hf", "download", "gpt2", "config.json", "model.safetensors", "--local-dir", "DIR"]
    _assert_hf_command_exists(argv)


# damaged downloads and mismatched files: each error names the file and the command that replaces it

def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("damage, files, message", [
    (lambda d: _cut_in_half(d / "model.safetensors"), ["model.safetensors"], "could not be read"),
    (lambda d: _cut_in_half(d / "config.json"), ["config.json"], "is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[]"), ["config.json"], "holds a JSON list"),
    (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"garbage")),
     ["pytorch_model.bin"], "could not be read as a checkpoint of tensors"),
    (lambda d: _edit_config(d, n_embd=64), ["config.json", "model.safetensors"],
     r"does not match the weights: transformer.wte.weight is \(101, 48\) in model.safetensors, \(101, 64\)"),
    (lambda d: _edit_config(d, vocab_size=50304), ["config.json", "model.safetensors"],
     r"vocab_size=50304.*does not match the weights"),
    (lambda d: _edit_config(d, n_layer=2), ["config.json", "model.safetensors"], "unexpected"),
], ids=["truncated-safetensors", "truncated-config", "config-list", "garbage-bin", "n_embd", "vocab", "n_layer"])
def test_damaged_or_mismatched_files_name_the_file_and_the_fix(tmp_path, damage, files, message):
    _random_hf_gpt2().save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        GPT.from_pretrained(tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and "likely succeed" not in text  # not torch.load's advice to unpickle anyway
    argv = _hf_command(text)
    assert argv == ["hf", "download", "gpt2", *files, "--force-download", "--local-dir", str(tmp_path)]


def test_an_intact_bin_with_a_pickled_object_is_not_called_damaged(tmp_path):
    import argparse

    from safetensors.torch import load_file
    _random_hf_gpt2().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors | {"args": argparse.Namespace(lr=1e-3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds an object of type argparse\.Namespace besides tensors.*state_dict") as err:
        GPT.from_pretrained(tmp_path)
    assert "damaged" not in str(err.value)


def test_redownload_hint_for_the_hub_cache():
    """A damaged file in the hub's cache is fetched again into the cache, not into a folder."""
    from nanolib.model import _redownload
    hint = _redownload(Path("/x/snapshots/abc"), ["model.safetensors"], "gpt2-medium", cache_dir="/c")
    argv = _hf_command(hint)
    assert argv == ["hf", "download", "gpt2-medium", "model.safetensors", "--force-download", "--cache-dir", "/c"]
    _assert_hf_command_exists(argv)


def test_from_pretrained_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)  # a folder without a checkpoint
    with pytest.raises(FileNotFoundError, match="not a hub name"):
        GPT.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"n_positions": 8, "vocab_size": 10, "n_layer": 1, "n_head": 1, "n_embd": 4}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)


# ---------------------------------------------------------------- the benchmark command (not timed)

@pytest.mark.parametrize("shape", [dict(n_layer=2, n_embd=64, block_size=32), dict(n_layer=2, n_embd=64, block_size=256),
                                   dict(n_layer=3, n_embd=96, block_size=128, vocab_size=1000)])
def test_flops_per_token_matches_pytorchs_flop_counter(shape):
    """6N + 12 L C T against FlopCounterMode's count of every matmul in one forward and backward pass. The math
    SDPA backend spells attention out as matmuls the counter sees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from nanolib.bench import flops_per_token
    torch.manual_seed(0)
    config = GPTConfig(**(dict(vocab_size=512, n_head=4) | shape))
    model = GPT(config)
    x = torch.randint(0, config.vocab_size, (2, config.block_size))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    counted = counter.get_total_flops() / x.numel()
    estimate = flops_per_token(config, model.num_params(non_embedding=True), config.block_size)
    assert counted == pytest.approx(estimate, rel=0.015)


def test_bench_command_runs_and_computes_mfu(capsys):
    from nanolib import bench
    result = bench.main(["--size", "cpu-small", "--device", "cpu", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "peak memory" in out and result["tokens_per_s"] > 0
    assert result["batch"] == 12 and result["seq"] == 64 and result["adamw"] and result["mfu"] is None
    assert "MFU" not in out  # no peak known for a CPU
    # with a given peak the MFU is computed on the CPU too: tokens/s x FLOPs per token / peak
    result = bench.main(["--size", "cpu-small", "--device", "cpu", "--steps", "1", "--warmup", "0",
                         "--peak-tflops", "0.5"])
    out = capsys.readouterr().out
    with torch.device("meta"):
        model = GPT(GPTConfig(**bench.SIZES["cpu-small"].config))
    flops = bench.flops_per_token(model.config, model.num_params(non_embedding=True), 64)
    assert result["peak_tflops"] == 0.5 and result["peak_kind"] == "as given"
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * flops / 0.5e12, rel=1e-12)
    assert f"MFU: {100 * result['mfu']:.1f}% of 0.5 TFLOPS (as given)" in out


def test_peak_table_by_device_name():
    from nanolib import bench
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench.peak_tflops("Some New GPU") is None
    # whole words: an RTX A1000 is no A100, an L40S no L4; the NVL cards run at lower clocks
    assert bench.peak_tflops("NVIDIA RTX A1000") is None and bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA L40S") == 362.0 and bench.peak_tflops("NVIDIA L40") == 181.0
    assert bench.peak_tflops("NVIDIA H100 NVL") == bench.peak_tflops("NVIDIA H200 NVL") == 835.5
    assert bench.peak_tflops("NVIDIA H200") == 989.4 and bench.peak_tflops("Tesla T4") == 65.0
    # V100 by the names CUDA gives: SXM2 125, PCIe 112, V100S 130 TFLOPS of fp16 (Volta has no bf16)
    assert bench.peak_tflops("Tesla V100-SXM2-16GB") == 125.0 and bench.peak_tflops("Tesla V100-PCIE-32GB") == 112.0
    assert bench.peak_tflops("Tesla V100S-PCIE-32GB") == 130.0
    assert [bench.peak_dtype(n) for n in ("Tesla T4", "Tesla V100-PCIE-16GB", "NVIDIA A100-SXM4-40GB", "Foo")] == \
        ["fp16", "fp16", "bf16", None]

# Behaviours no test checked until mutation testing (breaking the code on purpose, one change at a time)
# showed it: each test below fails on the change it was written for.


def test_init_weights_resets_layernorm_biases_of_a_trained_model():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("bias"):
                p.fill_(1.0)
    init_weights(model, "normal")
    assert all((p == 0).all() for n, p in model.named_parameters() if "ln" in n and n.endswith("bias"))


def test_a_config_of_another_architecture_is_refused():
    hf = {"model_type": "llama", "n_positions": 8, "vocab_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
    with pytest.raises(ValueError, match="not GPT-2"):
        _config_from_hf(hf, 0.0)
