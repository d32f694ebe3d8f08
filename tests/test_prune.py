"""`prune-dense`, the dense-to-dense baseline: exact against the model it prunes and against an
independent brute-force importance, on the bundled dense peer and on tiny dense models."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_errors import _one_error
from tiny import _COMMON, make_tiny_moe
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.convert.prune import PRUNE_FILE, PruneConfig, prune_dense
from moe2dense_ray.core.checkpoint import CheckpointReader
from moe2dense_ray.core.data import calibration_blocks

PEER = assets.dense_peer_path()
DATA = assets.calibration_path()
# tiny dense models of the classes prune-dense is for; Llama with mlp_bias also prunes FFN biases
DENSE = {"qwen3": dict(head_dim=8), "qwen2": {}, "mistral": {}, "llama": dict(mlp_bias=True)}
I_TINY = 24


def make_tiny_dense(model_type: str, path, tokenizer, *, seed: int = 0, edit=None):
    """A tiny random dense model with large weights (every neuron visibly matters), saved to `path`."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**_COMMON, "intermediate_size": I_TINY, **DENSE[model_type]})
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "bias" in name:
                p.normal_(0.0, 0.3)
        if edit:
            edit(model)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _prune(src, out, width, data, **kw) -> int:
    argv = ["-q", "prune-dense", str(src), "--width", str(width), "--data", data, "--out", str(out)]
    for k, v in {"samples": 4, "seq_len": 32, **kw}.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return main(argv)


def _record(out) -> dict:
    return json.loads((out / PRUNE_FILE).read_text())


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ffn_params(cfg, width: int, biases: bool) -> int:
    """The parameters of all FFNs at `width`: gate and up [W, H], down [H, W], gate/up biases [W]."""
    return cfg.num_hidden_layers * width * (3 * cfg.hidden_size + (2 if biases else 0))


@pytest.mark.parametrize("model_type", sorted(DENSE))
def test_full_width_reproduces_the_model_and_narrower_counts_match(model_type, tmp_path, tokenizer, corpus):
    src = tmp_path / "dense"
    make_tiny_dense(model_type, src, tokenizer)
    assert _prune(src, tmp_path / "full", I_TINY, corpus) == 0
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(original, ids), _logits(full, ids))  # bit for bit
    assert all(layer["kept"] == list(range(I_TINY)) for layer in _record(tmp_path / "full")["layers"])

    W = 7
    assert _prune(src, tmp_path / "narrow", W, corpus) == 0
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    biased = model_type == "llama"
    want = original.num_parameters() - _ffn_params(original.config, I_TINY, biased) + \
        _ffn_params(original.config, W, biased)
    rec = _record(tmp_path / "narrow")
    assert narrow.config.intermediate_size == W and narrow.num_parameters() == want == rec["params_after"]
    assert rec["params_before"] == original.num_parameters()
    # pruning is zeroing the dropped neurons of the original: the same function
    with torch.no_grad():
        for layer, mlp in zip(rec["layers"], original.model.layers):
            dropped = sorted(set(range(I_TINY)) - set(layer["kept"]))
            mlp.mlp.up_proj.weight[dropped] = 0
            if biased:
                mlp.mlp.up_proj.bias[dropped] = 0
    torch.testing.assert_close(_logits(narrow, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)


def test_the_dense_peer_keeps_what_a_brute_force_reference_keeps(tmp_path):
    """On the bundled dense peer, pruned to the width of a K=4 student of the bundled teacher."""
    W, samples, seq_len, batch = 512, 4, 64, 2
    out = tmp_path / "peer-512"
    assert _prune(PEER, out, W, DATA, samples=samples, seq_len=seq_len, batch_size=batch) == 0

    # the reference: plain PyTorch hooks on each FFN recompute act_fn(gate(x)) * up(x) themselves
    model = AutoModelForCausalLM.from_pretrained(PEER, dtype=torch.float32).eval()
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    importance = torch.zeros(L, I, dtype=torch.float64)

    def hook(i):
        def f(mlp, args, output):
            x = args[0]
            importance[i] += (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().double().sum(dim=(0, 1))
        return f

    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(hook(i))
    blocks = calibration_blocks(DATA, AutoTokenizer.from_pretrained(PEER), samples=samples, seq_len=seq_len)
    assert bool(blocks.attention_mask.all())
    with torch.no_grad():
        for s in range(0, samples, batch):
            model(input_ids=blocks.input_ids[s:s + batch])
    ranked = torch.argsort(importance, dim=1, descending=True)
    rec = _record(out)
    assert rec["tokens"] == samples * seq_len and rec["width"] == W and rec["intermediate_size"] == I
    reader = CheckpointReader(PEER)
    pruned = CheckpointReader(str(out))
    for i, layer in enumerate(rec["layers"]):
        top = importance[i][ranked[i]]
        assert top[W - 1] > top[W] * (1 + 1e-6)  # no near-tie at the cut: the comparison is meaningful
        assert layer["kept"] == sorted(ranked[i, :W].tolist())
        torch.testing.assert_close(torch.tensor(layer["importance"], dtype=torch.float64), importance[i],
                                   rtol=1e-9, atol=0)
        kept = torch.tensor(layer["kept"])
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(pruned.get(p + name + ".weight"), reader.get(p + name + ".weight")[kept])
        assert torch.equal(pruned.get(p + "down_proj.weight"), reader.get(p + "down_proj.weight")[:, kept])
    for key in reader.keys():  # everything but the FFNs is copied as is
        if ".mlp." not in key:
            assert torch.equal(pruned.get(key), reader.get(key)) and pruned.dtype(key) == torch.bfloat16

    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.intermediate_size == W
    assert student.num_parameters() == model.num_parameters() - _ffn_params(model.config, I - W, False)


def test_a_neuron_that_never_fires_is_pruned_first(tmp_path, tokenizer, corpus):
    dead = {0: 5, 1: 17}  # layer -> the neuron whose up row is zero: its activation is exactly 0

    def zero_rows(model):
        for layer, j in dead.items():
            model.model.layers[layer].mlp.up_proj.weight[j] = 0

    src = tmp_path / "dense"
    make_tiny_dense("qwen3", src, tokenizer, edit=zero_rows)
    r = prune_dense(PruneConfig(src=str(src), data=corpus, out=str(tmp_path / "w23"), width=I_TINY - 1, samples=4, seq_len=32), progress=False)
    for layer, j in dead.items():
        assert r.importance[layer][j] == 0.0 and min(r.importance[layer][:j] + r.importance[layer][j + 1:]) > 0
        assert r.kept[layer] == [n for n in range(I_TINY) if n != j]
    assert _record(tmp_path / "w23")["layers"][0]["kept"] == r.kept[0]


def _assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if out.name + ".partial" in p]


def test_bad_inputs_are_one_error_line(tmp_path, tokenizer, corpus, capsys):
    src = tmp_path / "dense"
    make_tiny_dense("qwen3", src, tokenizer)
    out = tmp_path / "out"
    cases = [
        (assets.teacher_path(), 4, "is a Mixture-of-Experts model (qwen3_moe"),
        (src, 0, "argument --width/-W: 0: input should be greater than or equal to 1"),
        (src, I_TINY + 1, f"--width {I_TINY + 1} must be between 1 and the model's intermediate_size {I_TINY}"),
    ]
    moe = tmp_path / "mixtral"
    make_tiny_moe("mixtral", str(moe), tokenizer=tokenizer)
    cases.append((moe, 4, "is a Mixture-of-Experts model (mixtral"))
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=96, n_embd=32, n_layer=1,
                                                          n_head=2, bos_token_id=1,
                                                          eos_token_id=1)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    cases.append((gpt2, 4, "is not a dense model with gated (SwiGLU) FFNs"))
    for model, width, fragment in cases:
        _one_error(capsys, _prune(model, out, width, corpus), fragment)
        _assert_nothing_written(out)

    before = sorted(os.listdir(src))
    _one_error(capsys, _prune(src, src, 8, corpus), "is the input")
    _one_error(capsys, _prune(src, src / "inside", 8, corpus), "lies inside the input")
    assert sorted(os.listdir(src)) == before
    copy = shutil.copytree(src, tmp_path / "copy")  # an output that exists is replaced only with --overwrite
    _one_error(capsys, _prune(src, copy, 8, corpus), "already exists (use --overwrite")
    assert main(["-q", "prune-dense", str(src), "-W", "8", "--data", corpus, "--samples", "2", "--seq-len", "16",
                 "--overwrite", "-o", str(copy)]) == 0
    assert AutoConfig.from_pretrained(copy).intermediate_size == 8


def test_padding_is_not_counted(tmp_path, tokenizer):
    """Text that runs out leaves a padded last block; only its real tokens count."""
    src = tmp_path / "dense"
    model = make_tiny_dense("qwen2", src, tokenizer)
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox jumps over a lazy dog while seven wizards quietly judge")
    with pytest.warns(UserWarning, match="holds only"):
        r = prune_dense(PruneConfig(src=str(src), data=str(text), out=str(tmp_path / "out"), width=5, samples=4, seq_len=64), progress=False)
    blocks = calibration_blocks(str(text), AutoTokenizer.from_pretrained(src), samples=4, seq_len=64)
    n = int(blocks.attention_mask.sum())
    assert blocks.num_samples == 1 and 0 < n < 64 and r.tokens == n
    want = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, a, o: want.append(
            (m.act_fn(m.gate_proj(a[0])) * m.up_proj(a[0])).abs().double().sum(dim=(0, 1))))
    with torch.no_grad():
        model(input_ids=blocks.input_ids[:, :n])  # the real tokens alone: causal, so the same activations
    for got, ref in zip(r.importance, want):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ref, rtol=1e-5, atol=1e-6)
