"""The distillation's worker-side GPU paths, measured in one run without Ray.

What a teacher actor and a training worker do, called directly in one process (world size 1):

* teacher: `distill.stream.TeacherService` (loads the teacher, encodes a numpy batch of token
  blocks into the top-k codec columns) in bf16 (what it loads on a GPU) and in fp32 (the same
  service with its model cast to float32): tokens/s per teacher batch size, the teacher's
  forward pass alone for comparison, and peak GPU memory;
* student: `distill.train.deepspeed_config` + `batch_loss` under DeepSpeed ZeRO stage 0/1/2/3,
  set up the way `train.train_func` sets up a worker (fp32 master weights from `evaluate.load_model`,
  torch AdamW, cosine schedule), training on the bf16 teacher's columns (computed once, so the
  numbers are the student's alone): tokens/s, peak GPU memory, the loss over the steps (finite?
  decreasing?);
* precision: the step-0 forward KL of the bf16 engine against `batch_loss` of the fp32 student on
  the same batch (same bf16-teacher targets, then fp32-teacher targets), within a stated tolerance.

    python bench/gpu_distill.py                       # on the GPU: bf16, the defaults below
    python bench/gpu_distill.py --device cpu --quick  # a smoke test of the same code on CPU

The student defaults to .gpu/student (make it with `moe2dense convert` of the bundled teacher,
e.g. `--experts 4 --scoring reap`). Prints one table per measurement; --json writes them too.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KL_RTOL = 2e-2  # bf16 engine vs fp32 student on the step-0 batch: |a - b| <= KL_ATOL + KL_RTOL * |b|
KL_ATOL = 1e-3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _rows(blocks, lo: int, hi: int) -> dict[str, np.ndarray]:
    return {"block_index": blocks.index[lo:hi], "input_ids": blocks.input_ids[lo:hi],
            "attention_mask": blocks.attention_mask[lo:hi]}


def _table(title: str, rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"  # noqa: E731
    out = [f"\n### {title}\n", line(cols), "| " + " | ".join("-" * w for w in width) + " |"]
    out += [line(row) for row in cells]
    return "\n".join(out)


# -- teacher service --------------------------------------------------------------------------


def teacher_service(teacher: str, cfg, dtype: torch.dtype, device: torch.device):
    """The project's TeacherService, its model in `dtype` (it loads bf16 on a GPU, fp32 on CPU)."""
    from moe2dense_ray.distill.stream import TeacherService

    svc = TeacherService(teacher, codec=cfg.codec, top_k=cfg.top_k, draws=cfg.draws,
                         temperature=cfg.temperature, seed=cfg.seed)
    loaded = next(svc.model.parameters()).dtype
    if str(svc.device) != str(device) and not (device.type == "cuda" and str(svc.device).startswith("cuda")):
        raise RuntimeError(f"TeacherService chose {svc.device}, the benchmark runs on {device}")
    svc.model.to(dtype)
    return svc, loaded


def bench_teacher(svc, blocks, n: int, batch: int, device: torch.device, *, keep: bool):
    """(row, columns of the first n blocks or None): the service over blocks [0, n) in batches of `batch`."""
    svc(_rows(blocks, 0, batch))  # warm-up (kernels, allocator)
    _reset_peak(device)
    out: list[dict[str, np.ndarray]] = []
    _sync(device)
    t = time.perf_counter()
    for lo in range(0, n, batch):
        cols = svc(_rows(blocks, lo, min(n, lo + batch)))
        if keep:
            out.append({k: v for k, v in cols.items() if k.startswith("t_")})
    _sync(device)
    seconds = time.perf_counter() - t
    tokens = int(blocks.attention_mask[:n].sum())
    # the teacher's forward pass alone, same batches: how much of the service is the encoding
    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            ids = torch.as_tensor(blocks.input_ids[lo:hi], dtype=torch.long, device=svc.device)
            mask = torch.as_tensor(blocks.attention_mask[lo:hi], dtype=torch.long, device=svc.device)
            svc.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        _sync(device)
        fwd = time.perf_counter() - t
    row = {"blocks": n, "teacher_batch": batch, "tok_per_s": tokens / seconds, "fwd_only_tok_per_s": tokens / fwd,
           "encode_share": max(0.0, 1 - fwd / seconds), "peak_mib": _peak_mib(device)}
    columns = {k: np.concatenate([c[k] for c in out]) for k in out[0]} if keep else None
    return row, columns


# -- student under DeepSpeed ------------------------------------------------------------------


def make_engine(cfg, steps: int, bf16: bool):
    """A training worker's engine, set up as `distill.train.train_func` does (minus Ray)."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from moe2dense_ray.distill.worker import deepspeed_config
    from moe2dense_ray.eval.metrics import load_model

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.student).train()  # fp32 master weights; bf16 compute via DeepSpeed
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * steps), steps)
    ds_cfg = deepspeed_config(cfg, cuda=bf16)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg, dist_init_required=False)
    return engine, ds_cfg


def _val_kd(engine, batch: dict, cfg, device: torch.device) -> float:
    """Forward KL of the engine on a fixed held-out batch (eval mode, no grad, as train_func validates)."""
    from moe2dense_ray.distill.worker import batch_loss

    engine.eval()
    with torch.no_grad():
        _, kd, _ = batch_loss(engine, batch, cfg, device)
    engine.train()
    return kd


def train_stage(cfg, blocks, columns, steps: int, warmup: int, device: torch.device, bf16: bool,
                val: dict) -> dict:
    from moe2dense_ray.distill.worker import batch_loss

    _reset_peak(device)
    t0 = time.perf_counter()
    engine, ds_cfg = make_engine(cfg, steps, bf16)
    init_s = time.perf_counter() - t0
    val_kd0 = _val_kd(engine, val, cfg, device)
    B = cfg.batch_size
    losses, kds = [], []
    timed_tokens, t_start = 0, None
    for step in range(steps):
        if step == warmup:
            _sync(device)
            t_start = time.perf_counter()
        lo = step * B
        batch = _rows(blocks, lo, lo + B) | {k: v[lo:lo + B] for k, v in columns.items()}
        loss, kd, _ = batch_loss(engine, batch, cfg, device)
        value = float(loss)  # train_func checks every loss for finiteness the same way (a sync)
        losses.append(value)
        kds.append(kd)
        if not math.isfinite(value):
            break
        engine.backward(loss)
        engine.step()
        if step >= warmup:
            timed_tokens += int(batch["attention_mask"].sum())
    _sync(device)
    seconds = time.perf_counter() - t_start if t_start is not None else float("nan")
    peak = _peak_mib(device)
    val_kd1 = _val_kd(engine, val, cfg, device) if all(math.isfinite(x) for x in losses) else float("nan")
    k = max(1, min(5, len(losses) // 4))
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    row = {"zero_stage": cfg.zero_stage, "bf16": ds_cfg["bf16"]["enabled"], "optimizer": type(engine.optimizer).__name__,
           "init_s": init_s, "steps": len(losses), "tok_per_s": timed_tokens / seconds, "ms_per_step": 1e3 * seconds / max(1, len(losses) - warmup),
           "peak_mib": peak, "train_loss_first": first, "train_loss_last": last,
           "val_kd_step0": val_kd0, "val_kd_end": val_kd1,
           "finite": all(math.isfinite(x) for x in losses) and math.isfinite(val_kd1),
           "decreased": val_kd1 < val_kd0, "losses": losses}
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    _reset_peak(device)
    return row


def fp32_reference(cfg, batch: dict, targets: dict[str, dict[str, np.ndarray]], device: torch.device) -> dict:
    """`batch_loss` of the fp32 student (no DeepSpeed) on `batch` with each set of teacher columns."""
    from moe2dense_ray.distill.worker import batch_loss
    from moe2dense_ray.eval.metrics import load_model

    model = load_model(cfg.student).to(device)  # eval mode, fp32
    out = {}
    with torch.no_grad():
        for name, cols in targets.items():
            _, kd, _ = batch_loss(model, {k: v for k, v in batch.items() if not k.startswith("t_")} | cols, cfg, device)
            out[name] = kd
    del model
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="student training precision (auto: the project's rule, bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--teacher", default=None, help="default: the bundled teacher")
    ap.add_argument("--student", default=".gpu/student")
    ap.add_argument("--data", default=None, help="default: the bundled train sample")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="blocks per micro-batch (the student)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per ZeRO stage")
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--teacher-batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch_size, args.steps, args.warmup_steps = 64, 4, 8, 2
        args.teacher_batches = [4, 16]

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")

    import logging
    import warnings

    import deepspeed
    import transformers

    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed's deprecations, once per step

    from moe2dense_ray import assets
    from moe2dense_ray.core.models import load_tokenizer
    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.distill.stream import pack_blocks

    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    teacher = args.teacher or assets.teacher_path()
    data = args.data or assets.train_path()
    n_train = args.steps * args.batch_size
    need = n_train + args.batch_size  # the last batch: held out, the fixed validation batch
    cfg = DistillConfig(teacher=teacher, student=args.student, data=data, out=".gpu/unused-run",
                        tokens=need * args.seq_len, seq_len=args.seq_len, batch_size=args.batch_size,
                        top_k=args.top_k, lr=args.lr, codec="topk", loss="forward_kl")

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "dist_backend": backend, "student_bf16": bf16, "seq_len": args.seq_len,
           "batch_size": args.batch_size, "steps": args.steps, "top_k": args.top_k, "lr": args.lr}
    print("env:", json.dumps(env), flush=True)

    t = time.perf_counter()
    blocks = pack_blocks(data, load_tokenizer(teacher), blocks=need, seq_len=args.seq_len, seed=cfg.seed,
                         text_field=cfg.text_field)
    if len(blocks) < need:
        raise SystemExit(f"only {len(blocks)} blocks of {args.seq_len} tokens in {data}, {need} needed")
    print(f"packed {len(blocks)} blocks ({blocks.tokens} tokens) in {time.perf_counter() - t:.1f}s", flush=True)

    # (1) teacher service, bf16 and fp32
    teacher_rows, cols = [], {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        svc, loaded = teacher_service(teacher, cfg, dtype, device)
        for i, tb in enumerate(args.teacher_batches):
            keep = i == 0  # the first batch size's columns: the training targets (bf16) / reference (fp32)
            row, c = bench_teacher(svc, blocks, need, tb, device, keep=keep)
            if keep:
                cols[name] = c
            teacher_rows.append({"dtype": name, "loaded_as": str(loaded).replace("torch.", ""), **row})
            print("teacher:", json.dumps(teacher_rows[-1]), flush=True)
        del svc
        _reset_peak(device)

    # the two teachers' targets on the held-out batch: how often they keep the same top-k ids
    from moe2dense_ray.distill.worker import decode_target

    held = slice(n_train, need)
    a = decode_target("topk", {k: v[held] for k, v in cols["bf16"].items()})
    b = decode_target("topk", {k: v[held] for k, v in cols["fp32"].items()})
    same_ids = float((a.ids == b.ids).all(-1).float().mean())
    val = {"bf16_teacher": _rows(blocks, n_train, need) | {k: v[held] for k, v in cols["bf16"].items()},
           "fp32_teacher": _rows(blocks, n_train, need) | {k: v[held] for k, v in cols["fp32"].items()}}

    # (2) DeepSpeed ZeRO stages, (3) step-0 forward KL against fp32
    train_rows = []
    for stage in args.stages:
        scfg = DistillConfig(**{**cfg.model_dump(), "zero_stage": stage})
        try:
            row = train_stage(scfg, blocks, cols["bf16"], args.steps, args.warmup_steps, device, bf16,
                              val["bf16_teacher"])
        except Exception as e:  # a stage that fails is a result too; the others still run
            import traceback

            traceback.print_exc()
            row = {"zero_stage": stage, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            _reset_peak(device)
        train_rows.append(row)
        print("train:", json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        if "losses" in row:
            print("  losses:", " ".join(f"{x:.4f}" for x in row["losses"]), flush=True)

    ref = fp32_reference(cfg, val["bf16_teacher"], {k: {c: v for c, v in cols_.items() if c.startswith("t_")}
                                                    for k, cols_ in val.items()}, device)
    ok_rows = [r for r in train_rows if "val_kd_step0" in r]
    for r in ok_rows:
        r["kd_fp32_ref"] = ref["bf16_teacher"]
        r["kd_diff"] = r["val_kd_step0"] - ref["bf16_teacher"]
        r["kd_within_tol"] = abs(r["kd_diff"]) <= KL_ATOL + KL_RTOL * abs(ref["bf16_teacher"])
    check = {"kd_fp32_student_bf16_teacher": ref["bf16_teacher"], "kd_fp32_student_fp32_teacher": ref["fp32_teacher"],
             "teacher_bf16_vs_fp32_same_topk_set_frac": same_ids,
             "engine_step0_minus_full_fp32": [r["val_kd_step0"] - ref["fp32_teacher"] for r in ok_rows],
             "tolerance": f"|engine step-0 KD - fp32 KD| <= {KL_ATOL} + {KL_RTOL}*|fp32 KD|",
             "all_within": all(r["kd_within_tol"] for r in ok_rows) if ok_rows else False}

    print(_table("Teacher service (TeacherService, top-k %d, seq_len %d)" % (args.top_k, args.seq_len), teacher_rows,
                 ["dtype", "loaded_as", "teacher_batch", "blocks", "tok_per_s", "fwd_only_tok_per_s", "encode_share",
                  "peak_mib"]))
    print(_table(f"Student under DeepSpeed ({'bf16' if bf16 else 'fp32'}, batch {args.batch_size} x {args.seq_len}, "
                 f"{args.steps} steps, first {args.warmup_steps} untimed)", train_rows,
                 ["zero_stage", "optimizer", "init_s", "tok_per_s", "ms_per_step", "peak_mib", "val_kd_step0",
                  "kd_fp32_ref", "kd_diff", "kd_within_tol", "val_kd_end", "train_loss_first", "train_loss_last",
                  "finite", "decreased", "error"]))
    print("\nprecision check:", json.dumps(check), flush=True)
    ok = bool(train_rows) and all(r.get("finite") and r.get("decreased") for r in train_rows) and check.get("all_within")
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'} (every stage finite, decreasing, step-0 KL within tolerance)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "teacher": teacher_rows, "train": train_rows, "check": check, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
