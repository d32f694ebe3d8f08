"""Qwen3-30B-A3B at its real shape on one GPU, in one process without Ray (Ray's wheel does not fit
in one transfer to a lent machine): the functions the actors and training workers call, timed.

* teacher: a Qwen3-MoE with Qwen3-30B-A3B's shape (48 layers, 128 experts of width 768, top-8,
  hidden 2048, vocabulary 151,936) and random bf16 weights (~61 GB), made on the GPU (no
  checkpoint to copy). `distill.stream.TeacherService` encodes batches of 4 x 2048 tokens into
  top-128 codec columns (the LM head a chunk of rows at a time): tokens/s and peak memory.
* calibration: `calibrate.Calibrator` on the same model, router statistics and full statistics
  (every expert on every token): tokens/s and peak memory.
* student: the ~3.3B dense Qwen3 that `convert --experts 8` makes of it (FFN 8 x 768 = 6144), set
  up as `distill.train.train_func` sets up a worker (fp32 master weights, torch AdamW, DeepSpeed
  ZeRO with bf16, activation checkpointing), trained with `batch_loss` (the chunked loss) on the
  teacher's columns: tokens/s, MFU (6 x parameters + attention FLOPs a token, over the GPU's
  dense bf16 peak) and peak memory.

    python bench/gpu_scale.py                           # the lent H200: under 8 minutes
    python bench/gpu_scale.py --tiny --device cpu       # the same code on tiny shapes, here
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

V = 151_936
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, no sparsity


def shapes(tiny: bool) -> tuple[dict, dict]:
    """(teacher, student) config keyword arguments: Qwen3-30B-A3B, or a tiny model of the same kind."""
    common = dict(vocab_size=V, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False,
                  rms_norm_eps=1e-6)
    if tiny:
        common.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    experts, width, top = (128, 768, 8) if not tiny else (8, 32, 2)
    teacher = dict(common, num_experts=experts, num_experts_per_tok=top, moe_intermediate_size=width,
                   intermediate_size=6144 if not tiny else 128, norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=[])
    student = dict(common, intermediate_size=top * width)
    return teacher, student


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def make(kind: str, kwargs: dict, device, dtype):
    """A model of random weights made where it will run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def teacher_stage(teacher, device, args) -> tuple[dict, dict]:
    from moe2dense_ray.distill.stream import TeacherService

    svc = TeacherService("random", codec="topk", top_k=128, draws=12, temperature=1.0, seed=0, model=teacher)
    gen = np.random.default_rng(0)
    B, S = args.teacher_batch, args.seq_len
    batches = [{"block_index": np.arange(i * B, (i + 1) * B), "input_ids": gen.integers(0, V, (B, S)),
                "attention_mask": np.ones((B, S), dtype=np.int8)} for i in range(args.teacher_batches + 1)]
    svc(batches[0])  # warm-up
    _reset(device)
    _sync(device)
    t0 = time.perf_counter()
    outs = [svc(b) for b in batches[1:]]
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = args.teacher_batches * B * S
    columns = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    row = {"tokens": tokens, "tok_per_s": tokens / seconds, "peak_gib": _peak_gib(device),
           "bytes_per_token": sum(v.nbytes for k, v in columns.items() if k.startswith("t_")) / tokens}
    return row, columns


def calibration_stage(teacher, device, args) -> list[dict]:
    from moe2dense_ray.convert.calibrate import Calibrator, LoadedTeacher
    from moe2dense_ray.core.families import get_family, moe_shape

    family = get_family("qwen3_moe")
    loaded = LoadedTeacher(teacher, family, moe_shape(family, teacher.config), str(device))
    ids = torch.randint(0, V, (args.calib_blocks, args.seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    rows = []
    for full in (False, True):
        cal = Calibrator(loaded, full=full)
        cal.run(ids[:1], mask[:1], batch_size=1)  # warm-up
        _reset(device)
        _sync(device)
        t0 = time.perf_counter()
        n = cal.run(ids, mask, batch_size=args.teacher_batch)
        _sync(device)
        rows.append({"statistics": "full" if full else "router", "tokens": n,
                     "tok_per_s": n / (time.perf_counter() - t0), "peak_gib": _peak_gib(device)})
        cal.close()
    return rows


def student_stage(student_kwargs, columns, device, args) -> dict:
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.distill.worker import batch_loss, deepspeed_config

    cuda = device.type == "cuda"
    cfg = DistillConfig(teacher="t", student="s", data="d", tokens=1, out="o", batch_size=args.batch_size,
                        zero_stage=args.zero_stage, lr=1e-4, seq_len=args.seq_len)
    _reset(device)
    model = make("qwen3", student_kwargs, device, torch.float32).train()
    params = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, args.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, cuda=cuda), dist_init_required=False)
    B, S = args.batch_size, args.seq_len
    n = columns["input_ids"].shape[0]
    losses, t0 = [], None
    for step in range(args.steps + 1):
        if step == 1:  # the first step compiles and allocates: not timed
            _sync(device)
            t0 = time.perf_counter()
        rows = [(step * B + i) % n for i in range(B)]
        batch = {k: v[rows] for k, v in columns.items()}
        loss, kd, _ = batch_loss(engine, batch, cfg, device)
        engine.backward(loss)
        engine.step()
        losses.append(kd)
    _sync(device)
    seconds = time.perf_counter() - t0
    tok_per_s = args.steps * B * S / seconds
    L, H = student_kwargs["num_hidden_layers"], student_kwargs["num_attention_heads"] * student_kwargs["head_dim"]
    flops_per_token = 6 * params + 6 * L * S * H  # causal attention: 12 L S H / 2
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    return {"params_B": params / 1e9, "zero_stage": args.zero_stage, "micro_batch_tokens": B * S,
            "tok_per_s": tok_per_s, "mfu": tok_per_s * flops_per_token / (peak * 1e12),
            "peak_gib": _peak_gib(device), "first_kd": losses[0], "last_kd": losses[-1],
            "finite": bool(np.isfinite(losses).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the same code)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--teacher-batch", type=int, default=4)
    ap.add_argument("--teacher-batches", type=int, default=6)
    ap.add_argument("--calib-blocks", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    teacher_kwargs, student_kwargs = shapes(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    teacher = make("qwen3_moe", teacher_kwargs, device, dtype).eval()
    made = time.perf_counter() - t0
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "teacher_params_B": sum(p.numel() for p in teacher.parameters()) / 1e9, "teacher_made_s": made}
    out["teacher_service"], columns = teacher_stage(teacher, device, args)
    out["calibration"] = calibration_stage(teacher, device, args)
    del teacher
    out["student"] = student_stage(student_kwargs, columns, device, args)
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
