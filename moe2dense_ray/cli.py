"""`moe2dense`: the command line, a thin layer over the Python API in this package."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from .errors import UserError

_DESCRIPTION = """\
moe2dense converts a trained Mixture-of-Experts language model (Qwen3-MoE, Qwen2-MoE, Mixtral,
OLMoE, DeepSeek-V2/V3, GPT-OSS) into a standard dense model that loads with
AutoModelForCausalLM.from_pretrained. Experts are scored on calibration text, the best K per
layer are selected, grouped into k blocks, concatenated into one dense FFN and scaled
(arXiv 2605.28207).

Pipeline (each stage is a subcommand; `convert` chains the first three):
  calibrate  SRC -> STATS   run the teacher on text, sum routing/expert statistics (Ray actors)
  plan       STATS -> PLAN  score, select, group and scale experts (seconds; many plans per STATS)
  build      SRC + PLAN -> DST  stream the checkpoint tensor by tensor into the dense model
  distill    SRC + DST -> RUN   refine the dense student on the teacher's top-k distribution
             (teacher actors stream to Ray Train workers running DeepSpeed); RUN/student is the result
  teacher-logits SRC -> LOGITS  keep the teacher's stream as Parquet, for `distill --logits`

Paths may be local directories or fsspec URLs (s3://, gs://, hf://, memory://, ...).
"""

_EXAMPLES = """\
examples (from the repository root; the bundled teacher is a 16-expert Qwen3-MoE):
  moe2dense demo
  T=moe2dense_ray/assets/teacher-qwen3moe
  moe2dense convert $T --data moe2dense_ray/assets/calibration.jsonl --samples 64 --seq-len 256 \\
      --experts 4 --scoring cp --out runs/dense-cp
  moe2dense calibrate $T --data moe2dense_ray/assets/calibration.jsonl --samples 64 --seq-len 256 \\
      --workers 2 --full-stats --out runs/stats
  moe2dense plan runs/stats --experts 4 --scoring reap --out runs/plan.json
  moe2dense build $T runs/plan.json --out runs/dense-reap
  moe2dense distill --teacher $T --student runs/dense-reap --data moe2dense_ray/assets/calibration.jsonl \
      --tokens 20000 --seq-len 128 --report-every 5 --out runs/distill-reap
  moe2dense teacher-logits $T --data moe2dense_ray/assets/calibration.jsonl --tokens 20000 --seq-len 128 \
      --out runs/logits
  moe2dense distill --logits runs/logits --student runs/dense-cp --report-every 5 --out runs/distill-cp
  moe2dense convert s3://bucket/Qwen3-30B-A3B --data hf:HuggingFaceFW/fineweb-edu:sample-10BT \\
      --samples 512 --seq-len 2048 --experts 8 --scoring do-acp --workers 8 --out s3://bucket/qwen3-dense

exit status: 0 on success, 2 on bad input (one line `error: ...` on stderr, nothing half-written).
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit code 2, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _count(minimum: int):
    """argparse type: an integer >= minimum, so nonsense fails at parse time, not mid-run."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value
    parse.__name__ = "integer"
    return parse


def _positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _add_quiet(p: argparse.ArgumentParser) -> None:
    # also accepted after the subcommand; SUPPRESS keeps `moe2dense -q calibrate ...` working
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _methods_help() -> str:
    from .methods import GROUPINGS, SCALINGS, SCORINGS

    out = []
    for title, reg in (("scorings (--scoring)", SCORINGS), ("groupings (--grouping)", GROUPINGS),
                       ("scalings (--scaling)", SCALINGS)):
        out.append(f"{title}:")
        for name in reg.names():
            doc = (reg.get(name).__doc__ or "").strip().splitlines()
            out.append(f"  {name:<10} {doc[0] if doc else ''}")
    return "\n".join(out)


def _add_source_and_data_args(p: argparse.ArgumentParser) -> None:
    """The teacher and the calibration set: what `convert` and `calibrate` both start from."""
    p.add_argument("src", metavar="SRC", help="MoE checkpoint directory (local or URL)")
    g = p.add_argument_group("calibration")
    g.add_argument("--data", required=True, metavar="DATA",
                   help="calibration text: .txt, .jsonl (field `text`), .parquet, a directory of those, "
                        "or hf:NAME[:CONFIG] for a Hugging Face dataset")
    g.add_argument("--samples", type=_count(1), default=64, metavar="N", help="number of token blocks (default 64; paper: 512)")
    g.add_argument("--seq-len", type=_count(2), default=512, metavar="L", help="tokens per block (default 512; paper: 2048)")
    g.add_argument("--workers", type=_count(0), default=1, metavar="N",
                   help="Ray actors, one teacher replica each (0 = in this process, no Ray; default 1)")
    g.add_argument("--batch-size", type=_count(1), default=4, metavar="B", help="blocks per forward pass (default 4)")
    g.add_argument("--text-field", default="text", help="field/column holding the text (default text)")
    g.add_argument("--gpus-per-worker", type=_positive, default=None, metavar="G",
                   help="GPUs per Ray actor (default: 1 when the cluster has GPUs); a teacher larger than "
                        "one GPU is sharded over the actor's GPUs")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods (see `moe2dense methods`)")
    g.add_argument("--experts", "-K", type=int, required=True, metavar="K", help="experts kept per MoE layer")
    g.add_argument("--groups", "-k", type=int, default=None, metavar="k",
                   help="groups per layer, k <= K (default K: pure pruning, the paper's best)")
    g.add_argument("--scoring", default="cp", help="expert scoring (default cp)")
    g.add_argument("--grouping", default="none", help="expert grouping (default none)")
    g.add_argument("--scaling", default="uniform", help="magnitude scaling (default uniform)")
    g.add_argument("--seed", type=int, default=0, help="seed for random scoring/grouping and data order")
    from .config import MethodOptions

    MethodOptions.add_arguments(p.add_argument_group("method settings (recorded in the plan)"), config_flag=False)


def _add_build_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", required=True, metavar="DST", help="output directory (local or URL)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the student (default: keep the teacher's dtypes; bf16 for MXFP4)")
    g.add_argument("--shard-size", type=_positive, default=1.0, metavar="GB", help="max shard size in GB (default 1)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace DST if it holds a checkpoint (never a directory of other files, never SRC)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle (.bin) checkpoints; they can run code when loaded")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe2dense", description=_DESCRIPTION, epilog=_EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('moe2dense_ray').__version__}")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("convert", help="calibrate, plan and build in one go",
                       description="Convert an MoE checkpoint SRC into a dense checkpoint DST.\n\n"
                       "DST holds a standard Hugging Face model plus moe2dense_plan.json recording what was kept.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_and_data_args(c)
    _add_method_args(c)
    _add_build_args(c)
    c.add_argument("--stats", metavar="STATS", help="also keep the calibration statistics here, for later `plan` runs")
    c.add_argument("--full-stats", action="store_true", default=None,
                   help="collect expert-output statistics even if the chosen methods do not need them")

    k = sub.add_parser("calibrate", help="run the teacher on text and save additive statistics",
                       description="Run SRC on calibration text and save per-layer statistics (sums) to STATS.\n"
                       "Statistics from any number of workers add up to the same result.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_and_data_args(k)
    k.add_argument("--full-stats", action="store_true",
                   help="also run every expert on every token (needed by acp, do-acp, reap, ean, output grouping)")
    k.add_argument("--out", "-o", required=True, metavar="STATS", help="statistics directory (local or URL)")
    k.add_argument("--overwrite", action="store_true", help="replace STATS if it holds statistics")
    k.add_argument("--seed", type=int, default=0, help="seed for the choice and order of calibration blocks")
    k.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")

    pl = sub.add_parser("plan", help="score, select, group and scale experts from STATS",
                        description="Compute a conversion plan from calibration statistics (no model needed, "
                        "except --src for weight grouping).")
    pl.add_argument("stats", metavar="STATS", help="statistics written by `moe2dense calibrate` (local or URL)")
    _add_method_args(pl)
    pl.add_argument("--src", help="the teacher checkpoint (needed by --grouping weight; default: the one calibrated)")
    pl.add_argument("--out", "-o", required=True, metavar="PLAN",
                    help="plan file (JSON), or a directory to write moe2dense_plan.json into")
    pl.add_argument("--overwrite", action="store_true", help="replace PLAN if it exists")

    b = sub.add_parser("build", help="apply a plan to a checkpoint, streaming it into a dense model",
                       description="Stream SRC tensor by tensor into the dense checkpoint described by PLAN.")
    b.add_argument("src", metavar="SRC", help="the MoE checkpoint the plan was made for (local or URL)")
    b.add_argument("plan", metavar="PLAN", help="plan file, or a directory holding moe2dense_plan.json")
    _add_build_args(b)

    d = sub.add_parser("demo", help="convert the bundled teacher end to end on local Ray and report perplexities",
                       description="Runs the whole pipeline on the small teacher shipped with the package: "
                       "calibration on 2 Ray actors, several scorings, build, and a perplexity table.")
    d.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    d.add_argument("--workers", type=_count(0), default=2, help="Ray actors for calibration (default 2)")

    from .distill.config import DistillConfig, TeacherLogitsConfig

    ds = sub.add_parser("distill", help="distill the MoE teacher into a dense student on Ray Train + DeepSpeed",
                        description="Train the dense student S on the teacher's distribution over DATA (or on a "
                        "stream LOGITS written by `teacher-logits`).\n\nTeacher replicas run as Ray actors and "
                        "stream compact top-k log-probabilities to the training workers; RUN collects "
                        "checkpoints, metrics.jsonl, TensorBoard logs and, at the end, RUN/student (a standard "
                        "dense checkpoint). Settings can come from --config YAML; flags override it.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    DistillConfig.add_arguments(ds, exclude=("resume",))
    ds.add_argument("--resume", metavar="RUN", default=argparse.SUPPRESS,
                    help="continue the run in RUN from its last checkpoint, with the settings it was started with")
    tl = sub.add_parser("teacher-logits", help="write the teacher's top-k stream over DATA to Parquet",
                        description="Run the teacher once over DATA and write the stream that `distill` would "
                        "compute online to LOGITS, for any number of `distill --logits LOGITS` runs.")
    TeacherLogitsConfig.add_arguments(tl)
    sub.add_parser("methods", help="list scoring, grouping and scaling methods")
    sub.add_parser("families", help="list supported model families")
    for name in ("convert", "calibrate", "plan", "build", "demo", "distill", "teacher-logits"):
        _add_quiet(sub.choices[name])
    return p


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    if args.command == "convert":
        from .convert import convert

        r = convert(args.src, args.data, args.out, experts=args.experts, groups=args.groups,
                    scoring=args.scoring, grouping=args.grouping, scaling=args.scaling,
                    samples=args.samples, seq_len=args.seq_len, workers=args.workers,
                    full_stats=args.full_stats, stats_out=args.stats, seed=args.seed, dtype=args.dtype,
                    max_shard_bytes=int(args.shard_size * (1 << 30)), overwrite=args.overwrite,
                    allow_pickle=args.allow_pickle, batch_size=args.batch_size, progress=progress,
                    gpus_per_worker=args.gpus_per_worker, text_field=args.text_field,
                    options=_method_options(args))
        rep = r.report
        print(f"wrote {rep.out}: {rep.dense_model_type} with FFN width {rep.intermediate_size}, "
              f"{rep.student_params / 1e6:.2f}M parameters (teacher {rep.teacher_params / 1e6:.2f}M), "
              f"calibrated on {r.stats.tokens} tokens")
    elif args.command == "calibrate":
        from .calibrate import calibrate

        s = calibrate(args.src, args.data, samples=args.samples, seq_len=args.seq_len, workers=args.workers,
                      full=args.full_stats, out=args.out, overwrite=args.overwrite, batch_size=args.batch_size, seed=args.seed,
                      progress=progress, text_field=args.text_field, gpus_per_worker=args.gpus_per_worker,
                      allow_pickle=args.allow_pickle)
        print(f"wrote {args.out}: {len(s.moe_layers)} MoE layers, {s.tokens} tokens, "
              f"{'full' if s.full else 'router'} statistics, {s.meta['seconds']:.1f}s")
    elif args.command == "plan":
        from .build import read_expert_weights
        from .plan import make_plan, save_plan
        from .stats import Stats

        stats = Stats.load(args.stats)
        weights = None
        if args.grouping == "weight":
            src = args.src or stats.source
            if not src:
                raise UserError("--grouping weight needs --src (the teacher checkpoint)")
            from .build import inspect_source

            reader, _, family, _, shape = inspect_source(src)
            reader.close()
            theirs = (family.model_type, shape.num_experts, shape.hidden_size, list(shape.moe_layers))
            ours = (stats.model_type, stats.num_experts, stats.meta.get("hidden_size"), list(stats.moe_layers))
            if theirs != ours:
                raise UserError(f"--src {src} ({theirs[0]}, {theirs[1]} experts, hidden {theirs[2]}) is not the "
                                f"model these statistics were calibrated on ({ours[0]}, {ours[1]} experts, "
                                f"hidden {ours[2]})")
            weights = read_expert_weights(src)
        plan = make_plan(stats, experts=args.experts, groups=args.groups, scoring=args.scoring,
                         grouping=args.grouping, scaling=args.scaling, seed=args.seed, expert_weights=weights,
                         options=_method_options(args))
        written = save_plan(plan, args.out, overwrite=args.overwrite)
        print(f"wrote {written}: K={plan.experts}, k={plan.groups}, {plan.scoring}/{plan.grouping}/{plan.scaling}, "
              f"{len(plan.layers)} layers")
    elif args.command == "build":
        from .build import build
        from .plan import load_plan

        rep = build(args.src, load_plan(args.plan), args.out, dtype=args.dtype,
                    max_shard_bytes=int(args.shard_size * (1 << 30)), overwrite=args.overwrite,
                    allow_pickle=args.allow_pickle, progress=progress)
        print(f"wrote {rep.out}: {rep.dense_model_type}, FFN width {rep.intermediate_size}, "
              f"{rep.student_params / 1e6:.2f}M parameters in {rep.seconds:.1f}s")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, workers=args.workers, progress=progress)
    elif args.command == "distill":
        from .distill.config import DistillConfig
        from .distill.run import distill

        r = distill(_distill_config(args), progress=progress)
        last = r.final
        print(f"wrote {r.student}: {r.steps} steps, {r.tokens} tokens in {r.seconds:.0f}s; held-out perplexity "
              f"{last.get('val_ppl', float('nan')):.2f}, KL to the teacher {last.get('val_kl', float('nan')):.3f}")
    elif args.command == "teacher-logits":
        from .distill.config import TeacherLogitsConfig
        from .distill.run import teacher_logits

        meta = teacher_logits(TeacherLogitsConfig.from_args(args), progress=progress)
        print(f"wrote {args.out}: {meta['blocks']} blocks ({meta['val_blocks']} held out), {meta['codec']} "
              f"codec, {meta['seconds']:.1f}s")
    elif args.command == "methods":
        print(_methods_help())
    elif args.command == "families":
        from .families import supported_families_table

        print(supported_families_table())
    return 0


def _method_options(args: argparse.Namespace):
    from .config import MethodOptions

    return MethodOptions.from_args(args)


def _distill_config(args: argparse.Namespace):
    """`--resume RUN` starts from the settings RUN was started with; other flags override them."""
    from .distill.config import DistillConfig
    from .distill.run import CONFIG_FILE

    run = getattr(args, "resume", None)
    if run is None:
        return DistillConfig.from_args(args)
    given = {k: v for k, v in vars(args).items() if k in DistillConfig.model_fields and k != "resume"}
    fixed = sorted(set(given) - set(RESUMABLE_OVERRIDES))
    if fixed or getattr(args, "config", None):
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in fixed) or "--config"
        raise UserError(f"--resume continues RUN with the settings it started with; {flags} would change which "
                        f"blocks each step trains on (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)} "
                        f"may change)")
    return DistillConfig.from_yaml(f"{run.rstrip('/')}/{CONFIG_FILE}", **given, out=run, resume=True)


# what `distill --resume RUN` may change: how the run executes, not what it trains on
RESUMABLE_OVERRIDES = ("max_failures", "report_every", "checkpoint_every", "keep_checkpoints", "threads",
                       "cpus_per_worker", "cpus_per_teacher", "gpus_per_teacher", "teacher_batch")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings read like errors: one `warning: ...` line, not a source location and code."""
    sys.stderr.write(f"warning: {' '.join(str(message).split())}\n")


def _quiet_model_libraries() -> None:
    """Settings for the libraries that load models, made before they are first imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn that it found no GPU
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bars show tokens, layers and ETA


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed) and --help return, as every error does
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in ("methods", "families"):  # listings need no models: skip ~2 s of imports
        _quiet_model_libraries()
    warnings.showwarning = _one_line_warning
    try:
        return _run(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except OSError as e:  # the environment, not a bug: a read-only or full disk, a lost connection
        sys.stderr.write(f"error: {' '.join(str(e).split()) or type(e).__name__}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (no output was left half-written)\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser"]
