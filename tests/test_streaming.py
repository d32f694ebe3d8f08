"""Streaming and storage: sharded inputs and outputs, fsspec URLs, MXFP4 sources, lazy reads."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_moe
from transformers import AutoModelForCausalLM

from moe2dense_ray.convert.build import build, read_expert_weights
from moe2dense_ray.convert.calibrate import calibrate
from moe2dense_ray.convert.plan import make_plan
from moe2dense_ray.core.checkpoint import CheckpointReader
from moe2dense_ray.core.config import BuildConfig, CalibrateConfig, PlanSettings

IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))


@contextlib.contextmanager
def _recorded(monkeypatch, method: str):
    """Record the arguments of every CheckpointReader.<method> call made inside the block."""
    calls: list = []
    orig = getattr(CheckpointReader, method)

    def spy(self, *args):
        calls.append(args[0] if len(args) == 1 else args)
        return orig(self, *args)

    monkeypatch.setattr(CheckpointReader, method, spy)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _max_diff(a, b) -> float:
    with torch.no_grad():
        return (a(input_ids=IDS).logits - b(input_ids=IDS).logits).abs().max().item()


def test_sharded_in_and_out_and_only_selected_experts_read(tmp_path, tokenizer, corpus, monkeypatch):
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe("mixtral", None, uniform_router=True)
    teacher.save_pretrained(src, max_shard_size="40KB")
    tokenizer.save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    plan = make_plan(stats, PlanSettings(experts=3, scoring="cp"))

    with _recorded(monkeypatch, "get") as reads:
        build(BuildConfig(src=str(src), out=str(dst), shard_size=30_000 / (1 << 30)), plan, progress=False)

    expert_reads = [k for k in reads if ".experts." in k]
    wanted = {f"model.layers.{lp.layer}.block_sparse_moe.experts.{e}.{w}.weight"
              for lp in plan.layers for e in lp.selected for w in ("w1", "w2", "w3")}
    assert set(expert_reads) == wanted  # the 3 of 6 experts per layer, nothing else
    assert len(expert_reads) == len(set(expert_reads))  # each read once
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    student = AutoModelForCausalLM.from_pretrained(dst)
    assert type(student).__name__ == "MistralForCausalLM"
    assert student.config.intermediate_size == 3 * teacher.config.intermediate_size


def test_weight_grouping_reads_only_the_selected_experts(tmp_path, tokenizer, corpus, monkeypatch):
    """Weight-space grouping needs expert weights at plan time: K of them per layer, never all E."""
    src = tmp_path / "teacher"
    make_tiny_moe("mixtral", str(src), tokenizer=tokenizer)
    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    with _recorded(monkeypatch, "get") as reads:
        plan = make_plan(stats, PlanSettings(experts=4, groups=2, scoring="sf", grouping="weight"), expert_weights=read_expert_weights(str(src)))
    wanted = {f"model.layers.{lp.layer}.block_sparse_moe.experts.{e}.{w}.weight"
              for lp in plan.layers for e in lp.selected for w in ("w1", "w2", "w3")}
    assert {k for k in reads if ".experts." in k} == wanted
    assert all(len(lp.groups) == 2 and len(lp.selected) == 4 for lp in plan.layers)


def test_fsspec_urls_end_to_end(tmp_path, tokenizer, corpus):
    """Source, statistics and destination on a non-local fsspec filesystem (memory://)."""
    def local_copies():
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "moe2dense-src-*")))

    before = local_copies()
    local = tmp_path / "teacher"
    teacher = make_tiny_moe("qwen2_moe", str(local), uniform_router=True, tokenizer=tokenizer)
    fs = fsspec.filesystem("memory")
    for name in os.listdir(local):
        fs.pipe(f"/t2/teacher/{name}", (local / name).read_bytes())
    stats = calibrate(CalibrateConfig(src="memory://t2/teacher", data=corpus, samples=2, seq_len=16, workers=0, out="memory://t2/stats"), progress=False)
    assert fs.exists("/t2/stats/meta.json")
    assert local_copies() == before  # the temporary local copy of the teacher is gone
    plan = make_plan(stats, PlanSettings(experts=6, scoring="pp"))
    build(BuildConfig(src="memory://t2/teacher", out="memory://t2/student"), plan, progress=False)
    assert not [p for p in fs.ls("/t2", detail=False) if "partial" in p]
    out = tmp_path / "fetched"
    out.mkdir()
    for p in fs.ls("/t2/student", detail=False):
        (out / p.rsplit("/", 1)[-1]).write_bytes(fs.cat(p))
    student = AutoModelForCausalLM.from_pretrained(out)
    assert _max_diff(teacher, student) < 1e-4


def _quantize_mxfp4(w: torch.Tensor):
    """Reference MXFP4 quantizer (groups of 32 along the last axis, e8m0 scales, e2m1 values)."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    *pre, cols = w.shape
    g = w.reshape(*pre, cols // 32, 32)
    amax = g.abs().amax(-1).clamp_min(1e-12)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = g / torch.exp2(exp)[..., None]
    idx = (q[..., None] - lut).abs().argmin(-1)  # nearest representable value
    deq = (lut[idx] * torch.exp2(exp)[..., None]).reshape(w.shape)
    idx = idx.to(torch.uint8)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8), deq


def test_gpt_oss_mxfp4_source(tmp_path, tokenizer, corpus):
    """Official GPT-OSS checkpoints ship MXFP4 expert blocks and scales: they are dequantized."""
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe("gpt_oss", None, uniform_router=True, intermediate_size=32)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            ex = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(ex, name)
                blocks, scales, deq = _quantize_mxfp4(param.data.transpose(1, 2))
                param.copy_(deq.transpose(1, 2))  # the reference teacher uses the dequantized weights
                packed[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
                packed[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
    teacher.save_pretrained(src)
    tokenizer.save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**state, **packed}, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (src / "config.json").write_text(json.dumps(cfg))

    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    plan = make_plan(stats, PlanSettings(experts=6, scoring="cp"))
    build(BuildConfig(src=str(src), out=str(dst), dtype="float32"), plan, progress=False)
    student = AutoModelForCausalLM.from_pretrained(dst)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    assert _max_diff(teacher, student) < 1e-4
    # default output dtype for an MXFP4 source is bf16
    build(BuildConfig(src=str(src), out=str(tmp_path / "bf16")), plan, progress=False)
    r = CheckpointReader(str(tmp_path / "bf16"))
    assert r.get("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_in_memory_layout_reads_only_selected_rows(family, tmp_path, tokenizer, corpus, monkeypatch):
    """A checkpoint saved straight from transformers' modules (fused [E, 2I, H] experts, every MoE
    block named `mlp`, Mixtral's `block_sparse_moe` included) converts too, exactly, reading one
    expert's bytes at a time."""
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe(family, str(src), uniform_router=True, tokenizer=tokenizer)
    fused = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    (src / "model.safetensors").unlink()
    for index in src.glob("model*.safetensors*"):
        index.unlink()
    save_file(fused, str(src / "model.safetensors"), metadata={"format": "pt"})
    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    plan = make_plan(stats, PlanSettings(experts=stats.num_experts, scoring="sf"))
    with _recorded(monkeypatch, "get_row") as rows:
        build(BuildConfig(src=str(src), out=str(dst)), plan, progress=False)
    assert len(rows) == len(set(rows)) == 2 * stats.num_experts * len(plan.layers)
    assert _max_diff(teacher, AutoModelForCausalLM.from_pretrained(dst)) < 1e-4


def test_pickle_checkpoint_converts_with_allow_pickle(tmp_path, tokenizer, corpus):
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe("mixtral", str(src), uniform_router=True, tokenizer=tokenizer)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    from moe2dense_ray.cli import main

    assert main(["-q", "convert", str(src), "--data", corpus, "--samples", "2", "--seq-len", "16", "--workers", "0",
                 "--experts", "6", "--refit", "none", "--allow-pickle", "--out", str(dst)]) == 0
    assert (dst / "model.safetensors").exists()  # the student is always safetensors
    assert _max_diff(teacher, AutoModelForCausalLM.from_pretrained(dst)) < 1e-4


def _quantize_fp8_blocks(w: torch.Tensor, block: int):
    """Reference block-wise FP8 (e4m3) quantizer: one fp32 scale per [block x block] tile."""
    rows, cols = w.shape
    R, C = -(-rows // block), -(-cols // block)
    pad = torch.zeros(R * block, C * block)
    pad[:rows, :cols] = w
    tiles = pad.reshape(R, block, C, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # e4m3 max is 448
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).reshape(R * block, C * block)[:rows, :cols]
    return q.reshape(R * block, C * block)[:rows, :cols].contiguous(), scale.float(), deq


def test_deepseek_v3_block_fp8_source(tmp_path, tokenizer, corpus):
    """DeepSeek-V3 / Qwen3-FP8 checkpoints: float8 weights with per-tile `weight_scale_inv`."""
    src, dst, plain = tmp_path / "teacher", tmp_path / "student", tmp_path / "plain"
    teacher = make_tiny_moe("deepseek_v3", None, uniform_router=True)
    block = 16
    quantized = {}
    with torch.no_grad():
        for name, mod in teacher.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.") and ".gate" != name[-5:]:
                q, s, deq = _quantize_fp8_blocks(mod.weight.data, block)
                mod.weight.copy_(deq)
                quantized[f"{name}.weight"] = (q, s)
        for i, layer in enumerate(teacher.model.layers):
            ex = getattr(layer.mlp, "experts", None)
            if ex is None:
                continue
            I = ex.gate_up_proj.shape[1] // 2
            for e in range(ex.gate_up_proj.shape[0]):
                for part, w in (("gate_proj", ex.gate_up_proj[e, :I]), ("up_proj", ex.gate_up_proj[e, I:]),
                                ("down_proj", ex.down_proj[e])):
                    q, s, deq = _quantize_fp8_blocks(w.clone(), block)
                    w.copy_(deq)
                    quantized[f"model.layers.{i}.mlp.experts.{e}.{part}.weight"] = (q, s)
    teacher.save_pretrained(plain)  # the dequantized reference, for calibration
    tokenizer.save_pretrained(plain)
    teacher.save_pretrained(src)
    tokenizer.save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    assert set(quantized) <= set(state)
    for k, (q, s) in quantized.items():
        state[k], state[f"{k}_scale_inv"] = q, s
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (src / "config.json").write_text(json.dumps(cfg))

    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=2, seq_len=16, workers=0), progress=False)  # loads dequantized
    reference = calibrate(CalibrateConfig(src=str(plain), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    for key, value in reference.sums.items():
        torch.testing.assert_close(stats.sums[key], value, rtol=1e-5, atol=1e-5)
    plan = make_plan(stats, PlanSettings(experts=6, scoring="cp"))
    build(BuildConfig(src=str(src), out=str(dst), dtype="float32"), plan, progress=False)
    r = CheckpointReader(str(dst))
    assert not [k for k in r.keys() if "scale_inv" in k]
    assert _max_diff(teacher, AutoModelForCausalLM.from_pretrained(dst)) < 1e-4
    build(BuildConfig(src=str(src), out=str(tmp_path / "bf16")), plan, progress=False)
    cfg_out = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg_out and cfg_out["dtype"] == "bfloat16"
    assert CheckpointReader(str(tmp_path / "bf16")).get("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
