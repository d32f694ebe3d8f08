"""`moe2dense`: the command line, a thin layer over the Python API in this package."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .core.errors import UserError

_DESCRIPTION = """\
moe2dense converts a trained Mixture-of-Experts language model (27 families: Qwen3-MoE,
Qwen3-Next, DeepSeek-V3, GLM-4.5, GPT-OSS, MiniMax, ...; `moe2dense families`) into a standard
dense model that loads with AutoModelForCausalLM.from_pretrained. Experts are scored on calibration text, the best K per
layer are selected, grouped into k blocks, concatenated into one dense FFN and scaled
(arXiv 2605.28207).

Pipeline (each stage is a subcommand; `convert` chains the first three):
  calibrate  SRC -> STATS   run the teacher on text, sum routing/expert statistics (Ray actors)
  plan       STATS -> PLAN  score, select, group and scale experts (seconds; many plans per STATS)
  build      SRC + PLAN -> DST  stream the checkpoint tensor by tensor into the dense model; with
             --refit, first fit each dense FFN to its MoE layer's output on calibration text, in
             closed form (7x lower perplexity before distillation on the bundled teacher)
  prune-dense MODEL -> DST  the dense-to-dense baseline: width-prune a dense model's FFNs by activation
             importance (Minitron), e.g. the bundled dense peer to a student's parameter count
  distill    SRC + DST -> RUN   refine the dense student on the teacher's top-k distribution
             (teacher actors stream to Ray Train workers running DeepSpeed); RUN/student is the result
  teacher-logits SRC -> LOGITS  keep the teacher's stream as Parquet, for `distill --logits`
  sweep      T + SPACE -> DIR  many plan x distillation settings as Ray Tune trials sharing one
             calibration and one teacher stream; ASHA stops the weak ones; a leaderboard and curves
  eval       MODEL         held-out perplexity and lm-evaluation-harness tasks (two shipped, offline;
             `--tasks paper`: the paper's five) of any checkpoint, as a table and JSON

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
  moe2dense build $T runs/plan.json --refit down --data moe2dense_ray/assets/calibration.jsonl --samples 16 \\
      --seq-len 256 --out runs/dense-reap-refit
  moe2dense distill --teacher $T --student runs/dense-reap --data moe2dense_ray/assets/calibration.jsonl \\
      --tokens 20000 --seq-len 128 --report-every 5 --out runs/distill-reap
  moe2dense teacher-logits $T --data moe2dense_ray/assets/calibration.jsonl --tokens 20000 --seq-len 128 \\
      --out runs/logits
  moe2dense distill --logits runs/logits --student runs/dense-cp --report-every 5 --out runs/distill-cp
  moe2dense eval runs/distill-cp/student --limit 40 --out runs/eval-distill-cp.json
  moe2dense convert s3://bucket/Qwen3-30B-A3B --data hf:HuggingFaceFW/fineweb-edu:sample-10BT \\
      --samples 512 --seq-len 2048 --experts 8 --scoring do-acp --workers 8 --out s3://bucket/qwen3-dense

exit status: 0 on success, 2 on bad input (one line `error: ...` on stderr, nothing half-written).
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit code 2, like every other error.

    No abbreviated flags: `--expert 4` silently ran as `--experts 4`, and a flag added later
    would turn such a command line into an error. A flag no command knows is reported by the
    command's own parser, with its `--help` and the nearest flags it has."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        import difflib

        known, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommand(getattr(known, "command", None))
            flags = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
            near = sorted({m for e in extras if e.startswith("--")
                           for m in difflib.get_close_matches(e.split("=")[0], flags, n=2, cutoff=0.75)})
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return known

    def _subcommand(self, name: str | None) -> "argparse.ArgumentParser":
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return self


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


def _add_quiet(p: argparse.ArgumentParser) -> None:
    # also accepted after the subcommand; SUPPRESS keeps `moe2dense -q calibrate ...` working
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's, DeepSpeed's and other libraries' log lines and warnings")


def _methods_help() -> str:
    from .convert.methods import GROUPINGS, SCALINGS, SCORINGS

    out = []
    for title, reg in (("scorings (--scoring)", SCORINGS), ("groupings (--grouping)", GROUPINGS),
                       ("scalings (--scaling)", SCALINGS)):
        out.append(f"{title}:")
        for name in reg.names():
            doc = (reg.get(name).__doc__ or "").strip().splitlines()
            out.append(f"  {name:<10} {doc[0] if doc else ''}")
    return "\n".join(out)


def _refitted(out: str) -> str:
    """`; refitted: ...` with the reconstruction error before and after, when the student was refitted."""
    from .convert.plan import load_plan
    from .convert.refit import mean_error

    record = load_plan(out).refit
    if not record:
        return ""
    return (f"; refitted ({record['fit']}, {record['mode']}) on {record['tokens']} tokens: relative error of the "
            f"MoE layers' output {mean_error(record, 'error_before'):.3f} -> {mean_error(record, 'error_after'):.3f} "
            f"(geometric mean over layers)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe2dense", description=_DESCRIPTION, epilog=_EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('moe2dense_ray').__version__}")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="also show Ray's, DeepSpeed's and other "
                   "libraries' log lines and warnings (by default only this tool's lines, bars, tables and errors; "
                   "Ray's logs are in its session directory either way)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from .core.config import BuildConfig, CalibrateConfig, ConvertConfig, PlanConfig

    c = sub.add_parser("convert", help="calibrate, plan and build in one go",
                       description="Convert an MoE checkpoint SRC into a dense checkpoint DST.\n\n"
                       "DST holds a standard Hugging Face model plus moe2dense_plan.json recording what was kept. "
                       "Settings can come from --config YAML; flags override it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ConvertConfig.add_arguments(c)
    k = sub.add_parser("calibrate", help="run the teacher on text and save additive statistics",
                       description="Run SRC on calibration text and save per-layer statistics (sums) to STATS.\n"
                       "Statistics from any number of workers add up to the same result.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    CalibrateConfig.add_arguments(k)
    pl = sub.add_parser("plan", help="score, select, group and scale experts from STATS",
                        description="Compute a conversion plan from calibration statistics (no model needed, "
                        "except --src for weight grouping).")
    PlanConfig.add_arguments(pl)
    b = sub.add_parser("build", help="apply a plan to a checkpoint, streaming it into a dense model",
                       description="Stream SRC tensor by tensor into the dense checkpoint described by PLAN.\n\n"
                       "With --refit, each dense FFN is first fitted to its MoE layer's output on calibration "
                       "text (--data, --samples, --seq-len, --workers: as for `calibrate`), in closed form; see "
                       "docs/refit.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    BuildConfig.add_arguments(b)
    from .convert.prune import PruneConfig

    pr = sub.add_parser("prune-dense", help="width-prune a dense model's FFNs by activation importance "
                        "(the dense-to-dense baseline)",
                        description="Keep the W most important FFN neurons of every layer of the dense model "
                        "MODEL (SwiGLU mlp.gate_proj/up_proj/down_proj: Qwen3, Qwen2, Mistral, Llama, ...). A "
                        "neuron's importance is the sum over the calibration tokens of DATA of |act_fn(gate(x)) * "
                        "up(x)| (Minitron). DST is a standard checkpoint with intermediate_size W plus "
                        "moe2dense_prune.json (per layer the kept neuron ids and every neuron's importance).",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    PruneConfig.add_arguments(pr)

    d = sub.add_parser("demo", help="convert the bundled teacher end to end on local Ray and report perplexities",
                       description="Runs the whole pipeline on the small teacher shipped with the package: "
                       "calibration on 2 Ray actors, several scorings, build, and a perplexity table.")
    d.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    d.add_argument("--workers", type=_count(0), default=2, help="Ray actors for calibration (default 2)")
    d.add_argument("--samples", type=_count(1), default=32, help="calibration blocks (default 32)")
    d.add_argument("--seq-len", type=_count(2), default=256, help="tokens per block (default 256)")
    d.add_argument("--distill-tokens", type=_count(0), default=None, metavar="N",
                   help="tokens to distill the best refitted student on (default 400000; 0: no distillation)")

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
    from .eval.stage import EvalConfig

    ev = sub.add_parser("eval", help="held-out perplexity and lm-evaluation-harness tasks of any checkpoint",
                        description="Evaluate MODEL (a teacher, a student, any causal LM): perplexity on held-out "
                        "text (default: the bundled held-out sample) and lm-evaluation-harness tasks through its "
                        "Hugging Face wrapper. Two tasks ship with the package and need no network: next_line "
                        "(which of four lines follows a passage) and last_word (LAMBADA-style last word); "
                        "`--tasks paper` runs the paper's five (WinoGrande 5-shot, HellaSwag 10-shot, ARC-Easy and "
                        "ARC-Challenge 25-shot, MMLU 5-shot), whose datasets come from the Hugging Face hub. Prints "
                        "a Markdown table; --out also writes the results as JSON. Settings can come from --config "
                        "YAML; flags override it.")
    EvalConfig.add_arguments(ev)
    _add_quiet(ev)
    from .sweep import SweepConfig

    sw = sub.add_parser("sweep", help="compare many plan x distillation configurations under ASHA early stopping",
                        description="Calibrate T once and stream its top-k distribution once, then run one Ray Tune "
                        "trial per combination of the settings in SPACE (a YAML grid over scoring, grouping, scaling, "
                        "experts, groups, seed, lr, loss, ...): each plans, builds and distills its student while "
                        "ASHA stops the trials whose validation perplexity falls behind.\n\nDIR gets the shared "
                        "stats/ and logits/, Tune's experiment (tune/: results, TensorBoard), each trial's "
                        "student and run (trials/ID/), leaderboard.csv/.md, curves.png and summary.json. "
                        "--resume continues a stopped sweep.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    SweepConfig.add_arguments(sw)
    sub.add_parser("methods", help="list scoring, grouping and scaling methods")
    sub.add_parser("families", help="list supported model families")
    for name in ("convert", "calibrate", "plan", "build", "prune-dense", "demo", "distill", "teacher-logits", "sweep"):
        _add_quiet(sub.choices[name])
    return p


def _convert(args: argparse.Namespace, progress: bool) -> None:
    from .convert.stage import convert
    from .core.config import ConvertConfig

    r = convert(ConvertConfig.from_args(args), progress=progress)
    rep = r.report
    print(f"wrote {rep.out}: {rep.dense_model_type} with FFN width {rep.intermediate_size}, "
          f"{rep.student_params / 1e6:.2f}M parameters (teacher {rep.teacher_params / 1e6:.2f}M), "
          f"calibrated on {r.stats.tokens} tokens{_refitted(rep.out)}")


def _calibrate(args: argparse.Namespace, progress: bool) -> None:
    from .convert.calibrate import calibrate
    from .core.config import CalibrateConfig

    cfg = CalibrateConfig.from_args(args)
    if not cfg.out:
        raise UserError("calibrate needs --out STATS: the directory to write the statistics to")
    s = calibrate(cfg, progress=progress)
    print(f"wrote {cfg.out}: {len(s.moe_layers)} MoE layers, {s.tokens} tokens, "
          f"{'full' if s.full else 'router'} statistics, {s.meta['seconds']:.1f}s")


def _plan(args: argparse.Namespace, progress: bool) -> None:
    from .convert.build import read_expert_weights
    from .convert.plan import check_plan_output, make_plan, save_plan
    from .convert.stats import Stats
    from .core.config import PlanConfig
    from .core.source import Source

    cfg = PlanConfig.from_args(args)
    stats = Stats.load(cfg.stats)
    inputs = (cfg.stats, stats.source, cfg.src)
    check_plan_output(cfg.out, overwrite=cfg.overwrite, sources=inputs)
    weights = None
    if cfg.grouping == "weight":
        src = cfg.src or stats.source
        if not src:
            raise UserError("--grouping weight needs --src (the teacher checkpoint)")
        source = Source.open(src)  # stays open: the weights are read as the plan groups each layer
        theirs = (source.family.model_type, source.shape.num_experts, source.shape.hidden_size,
                  list(source.shape.moe_layers))
        ours = (stats.model_type, stats.num_experts, stats.meta.get("hidden_size"), list(stats.moe_layers))
        if theirs != ours:
            raise UserError(f"--src {src} ({theirs[0]}, {theirs[1]} experts, hidden {theirs[2]}) is not the "
                            f"model these statistics were calibrated on ({ours[0]}, {ours[1]} experts, "
                            f"hidden {ours[2]})")
        weights = read_expert_weights(source)
    plan = make_plan(stats, cfg, expert_weights=weights)
    written = save_plan(plan, cfg.out, overwrite=cfg.overwrite, sources=inputs)
    print(f"wrote {written}: K={plan.experts}, k={plan.groups}, {plan.scoring}/{plan.grouping}/{plan.scaling}, "
          f"{len(plan.layers)} layers")


def _build(args: argparse.Namespace, progress: bool) -> None:
    from .convert.build import build
    from .core.config import BuildConfig

    rep = build(BuildConfig.from_args(args), progress=progress)
    print(f"wrote {rep.out}: {rep.dense_model_type}, FFN width {rep.intermediate_size}, "
          f"{rep.student_params / 1e6:.2f}M parameters in {rep.seconds:.1f}s{_refitted(rep.out)}")


def _prune_dense(args: argparse.Namespace, progress: bool) -> None:
    from .convert.prune import PruneConfig, prune_dense

    rep = prune_dense(PruneConfig.from_args(args), progress=progress)
    print(f"wrote {rep.out}: {rep.model_type}, FFN width {rep.width} of {rep.intermediate_size}, "
          f"{rep.params_after / 1e6:.2f}M parameters (was {rep.params_before / 1e6:.2f}M), importance from "
          f"{rep.tokens} tokens, {rep.seconds:.1f}s")


def _demo(args: argparse.Namespace, progress: bool) -> None:
    from .demo import DEMO_DISTILL_TOKENS, run_demo

    run_demo(args.out, workers=args.workers, progress=progress, samples=args.samples, seq_len=args.seq_len,
             distill_tokens=DEMO_DISTILL_TOKENS if args.distill_tokens is None else args.distill_tokens)


def _distill(args: argparse.Namespace, progress: bool) -> None:
    from .distill.driver import distill

    r = distill(_distill_config(args), progress=progress)
    last = r.final
    print(f"wrote {r.student}: {r.steps} steps, {r.tokens} tokens in {r.seconds:.0f}s; held-out perplexity "
          f"{last.get('val_ppl', float('nan')):.2f}, KL to the teacher {last.get('val_kl', float('nan')):.3f}")


def _teacher_logits(args: argparse.Namespace, progress: bool) -> None:
    from .distill.config import TeacherLogitsConfig
    from .distill.driver import teacher_logits

    meta = teacher_logits(TeacherLogitsConfig.from_args(args), progress=progress)
    print(f"wrote {args.out}: {meta['blocks']} blocks ({meta['val_blocks']} held out), {meta['codec']} "
          f"codec, {meta['seconds']:.1f}s")


def _sweep(args: argparse.Namespace, progress: bool) -> None:
    from .sweep import SweepConfig, sweep

    cfg = SweepConfig.from_args(args)
    summary = sweep(cfg, progress=progress)
    print(summary["leaderboard"])
    print(f"wrote {cfg.out}: {summary['trials']} trials ({summary['stopped_early']} stopped early, "
          f"{summary['errors']} failed), {summary['tokens_spent']:,} distillation tokens = "
          f"{summary['token_ratio']:.2f} of the full grid's, {summary['seconds']:.0f}s")


def _eval(args: argparse.Namespace, progress: bool) -> None:
    from .eval.stage import EvalConfig, evaluate_model, results_table

    cfg = EvalConfig.from_args(args)
    result = evaluate_model(cfg, progress=progress)
    print(results_table(result))
    if cfg.out:
        print(f"wrote {cfg.out} in {result['seconds']:.0f}s")


def _families(args: argparse.Namespace, progress: bool) -> None:
    from .core.families import supported_families_table

    print(supported_families_table())


# subcommand -> what runs it: each parses its stage's config from the flags and calls the stage
COMMANDS = {"convert": _convert, "calibrate": _calibrate, "plan": _plan, "build": _build,
            "prune-dense": _prune_dense, "demo": _demo, "distill": _distill, "teacher-logits": _teacher_logits,
            "sweep": _sweep, "eval": _eval, "methods": lambda args, progress: print(_methods_help()),
            "families": _families}


def _run(args: argparse.Namespace) -> int:
    COMMANDS[args.command](args, not args.quiet)
    return 0


def _distill_config(args: argparse.Namespace):
    """`--resume RUN` starts from the settings RUN was started with; other flags override them."""
    from .distill.config import DistillConfig
    from .distill.driver import run_config

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
    return DistillConfig.from_yaml(run_config(run), **given, out=run, resume=True)


# what `distill --resume RUN` may change: how the run executes, not what it trains on
RESUMABLE_OVERRIDES = ("max_failures", "report_every", "checkpoint_every", "keep_checkpoints", "threads",
                       "cpus_per_worker", "cpus_per_teacher", "gpus_per_teacher", "teacher_batch")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """This tool's warnings read like errors: one `warning: ...` line, not a source location and
    code. Other libraries' warnings (deprecations inside Ray, ...) are not the user's to act on:
    `--verbose` shows them."""
    if not os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return
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
    if getattr(args, "verbose", False):
        os.environ["MOE2DENSE_VERBOSE"] = "1"  # cluster.quiet_console
    else:
        warnings.showwarning = _one_line_warning
    previous = _on_sigterm(_interrupt)  # `kill`, a job scheduler: clean up as for Ctrl-C
    ray_before = _ray_connected()
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
    except Exception as e:  # noqa: BLE001 - only a network failure is turned into a line; the rest re-raise
        reason = _network_failure(e)
        if reason is None:
            raise
        sys.stderr.write(f"error: cannot reach the network ({reason}): a hub or object-store URL needs a "
                         f"connection; on an offline machine use local copies\n")
        return 2
    finally:
        if not ray_before:  # leave a caller's own Ray session alone
            _shutdown_ray()
        if previous is not None:
            _on_sigterm(previous)


_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ConnectionError", "ClientConnectorError",
                   "ServerDisconnectedError", "NameResolutionError", "ReadTimeout", "TimeoutException")


def _network_failure(e: BaseException) -> str | None:
    """`Type: message` of the network error at the root of `e` (httpx, requests, aiohttp: the
    clients the hub and fsspec use raise their own types, none of them an OSError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in _NETWORK_ERRORS:
            return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        e = e.__cause__ or e.__context__
    return None


def _on_sigterm(handler):
    """Install a SIGTERM handler where Python allows it (the main thread); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # main() called from another thread: leave signals to that program
        return None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    """Stop the embedded Ray (or leave the cluster) on every way out, so no Ray process outlives us."""
    if _ray_connected():
        _on_sigterm(signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - shutting down must not replace the run's own error
            pass


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser"]
