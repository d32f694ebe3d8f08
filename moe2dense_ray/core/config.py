"""One typed config per stage, declared once and turned into YAML files, CLI flags and API arguments.

Sweeps and `ray job submit` need a stage's settings as data, and a run must record exactly what
it ran with. So each stage has one pydantic model: `moe2dense STAGE --config run.yaml` loads it,
flags override single fields, the Python API takes the same object, and runs dump it next to
their outputs. A field's description is its `--help` line; `positional=True` in its
`json_schema_extra` makes it a positional argument instead of a flag.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource (CPUs and GPUs have their own settings)")
        if not (amount > 0 and amount < float("inf")):
            raise ValueError(f"{name}={amount}: an amount must be a positive number")
    return value


# Custom Ray resources an actor asks for, e.g. {"teacher": 1}: it is placed only on nodes that
# declare them (a cluster YAML's node type `resources`), which is how teacher replicas and
# training workers land on their own node types. On the command line: NAME=AMOUNT[,NAME=AMOUNT].
Resources = typing.Annotated[dict[str, float], AfterValidator(_custom_resources)]


def parse_resources(text: str) -> dict[str, float]:
    """`teacher=1,big_disk=0.5` -> {"teacher": 1.0, "big_disk": 0.5}; `none` or empty -> {}."""
    out: dict[str, float] = {}
    if text.strip().lower() in ("", "none"):
        return out
    for part in text.split(","):
        name, eq, amount = part.partition("=")
        try:
            out[name.strip()] = float(amount) if eq else 1.0
        except ValueError:
            raise ValueError(f"{part!r} is not NAME=AMOUNT") from None
    return out


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- YAML ---------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str, **overrides: Any):
        """Load `path` (local or fsspec URL) and apply `overrides` on top; bad files are UserErrors."""
        from .storage import read_small, url_to_fs

        fs, p = url_to_fs(path)
        if not fs.exists(p):
            raise UserError(f"no such config file: {path}")
        try:
            data = yaml.safe_load(read_small(fs, p, what=path)) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
        return cls.create(**{**data, **overrides}, _where=path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def create(cls, _where: str | None = None, **values: Any):
        """Validate `values`; pydantic's multi-line report becomes one `error:` line that names
        settings as the YAML file `_where` spells them, or as flags when they came from the CLI."""
        try:
            return cls(**values)
        except ValidationError as e:
            parts = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                name = loc if _where else f"--{loc.replace('_', '-')}"
                parts.append(f"{name}: {err['msg']}" if loc else err["msg"].removeprefix("Value error, "))
            raise UserError(f"bad settings{f' in {_where}' if _where else ''}: " + "; ".join(parts)) from None

    # -- argparse -------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser, *, exclude: tuple[str, ...] = (), config_flag: bool = True) -> None:
        """One flag per field (on a parser or an argument group). Defaults are SUPPRESSed so that
        only the flags given override a --config."""
        if config_flag:
            parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                                help="load settings from a YAML file (flags given here override it)")
        for name, field in cls.model_fields.items():
            if name in exclude:
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            kind, choices = _arg_kind(field.annotation)
            help_text = field.description or ""
            if not field.is_required() and field.default not in (None, False, {}):
                help_text += f" (default {field.default})"
            kw: dict[str, Any] = dict(help=help_text, default=argparse.SUPPRESS)
            if kind is bool:  # a switch; one that is on (or decided later, None) by default gets a --no- form
                kw["action"] = argparse.BooleanOptionalAction if field.default is not False else "store_true"
            else:
                kw["type"] = _checked(kind, field)
                if choices:
                    kw["choices"] = choices
                if "metavar" in extra or not choices:
                    kw["metavar"] = extra.get("metavar", name.upper())
            if extra.get("positional"):  # optional for argparse: a --config file may hold it
                parser.add_argument(name, nargs="?", **kw)
            else:
                flags = [f"--{name.replace('_', '-')}"] + list(extra.get("aliases", ()))
                parser.add_argument(*flags, dest=name, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The config that `--config` (if any) and the given flags describe."""
        given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        path = getattr(args, "config", None)
        if path:
            return cls.from_yaml(path, **given)
        return cls.create(**given)


def _checked(kind: type, field) -> Any:
    """argparse type that also applies the field's constraints, so `--workers -1` fails as a usage
    error naming the flag, before anything runs."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)

    def parse(text: str):
        try:
            return adapter.validate_python(kind(text))
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(e, ValidationError) \
                else (str(e) if kind is parse_resources else f"{text!r} is not a {kind.__name__}")
            raise argparse.ArgumentTypeError(f"{text}: {msg[0].lower() + msg[1:]}") from None

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _arg_kind(annotation: Any) -> tuple[Any, list[Any] | None]:
    """argparse type and choices for a field annotation (Optional[...] and Literal[...] included)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # PositiveInt and friends
        return _arg_kind(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arg_kind(inner[0])
    if origin is Literal:
        values = list(typing.get_args(annotation))
        return type(values[0]), values
    if annotation in (int, float, str, bool):
        return annotation, None
    if origin is dict:
        return parse_resources, None
    return str, None


def positional(description: str, **kw: Any) -> Any:
    """A required field given as a positional argument on the command line."""
    return Field(..., description=description, json_schema_extra={"positional": True, **kw})


class MethodOptions(StageConfig):
    """Settings of individual methods; every plan records all of them, so a plan says exactly how
    it was made. Each method reads only its own (`Registry.register(..., options=...)`), and the
    methods' defaults are these (here, not in the methods, so the CLI can list them without torch)."""

    ridge_scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="do-acp: ridge lambda = scale * mean(diag K) / k")
    kmeans_restarts: int = Field(8, ge=1, description="weight grouping: seeded k-means restarts (lowest inertia wins)")
    output_distance: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="output grouping: distance between the experts' mean outputs")
    score_reduction: Literal["sum", "mean"] = Field(
        "sum", description="score scaling: a group's score is the sum or the mean of its members'")


class CalibrationBlocks(StageConfig):
    """Calibration text as token blocks, declared once for every pass over it: `calibrate`,
    `convert`, the refit, `prune-dense`."""

    text_field: str = Field("text", description="field/column holding the text")
    samples: int = Field(64, ge=1, description="number of token blocks (paper: 512)", json_schema_extra={"metavar": "N"})
    seq_len: int = Field(512, ge=2, description="tokens per block (paper: 2048)", json_schema_extra={"metavar": "L"})
    seed: int = Field(0, description="seed for the choice and order of calibration blocks")


class TeacherRunSettings(CalibrationBlocks):
    """How the teacher is run over calibration blocks: by `calibrate`, and by the refit pass."""

    workers: int = Field(1, ge=0, description="Ray actors, one teacher replica each (0 = in this process, no Ray)",
                         json_schema_extra={"metavar": "N"})
    batch_size: int = Field(4, ge=1, description="blocks per forward pass", json_schema_extra={"metavar": "B"})
    gpus_per_worker: Optional[float] = Field(None, gt=0, description="GPUs per Ray actor (default: 1 when the cluster "
                                             "has GPUs); a teacher larger than one GPU is sharded over the actor's GPUs",
                                             json_schema_extra={"metavar": "G"})
    teacher_resources: Resources = Field({}, description="custom Ray resources per actor, NAME=AMOUNT[,...] (e.g. "
                                         "teacher=1: actors go only to nodes that declare `teacher`)",
                                         json_schema_extra={"metavar": "RES"})


DATA_HELP = ("calibration text: .txt, .jsonl (field `text`), .parquet, a directory of those, or hf:NAME[:CONFIG] "
             "for a Hugging Face dataset")


class _TeacherAndText(StageConfig):
    src: str = positional("MoE checkpoint directory (local or URL)", metavar="SRC")
    data: str = Field(..., description=DATA_HELP, json_schema_extra={"metavar": "DATA"})


class CalibrationSettings(TeacherRunSettings, _TeacherAndText):  # bases in reverse: SRC and DATA first
    """The teacher and the calibration text: what `calibrate` and `convert` both start from."""

    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints; they can run code when loaded")


class RefitSettings(StageConfig):
    """Reconstruction-aware conversion (docs/refit.md): after selection, grouping and scaling,
    fit each MoE layer's dense FFN in closed form to reproduce the MoE block's output."""

    refit: Literal["none", "down", "neuron", "group"] = Field(
        "none", description="fit the student's FFN to the MoE layer's output on calibration tokens: `down` solves "
        "for the whole down projection (ridge regression), `neuron` / `group` only for one factor per neuron / per "
        "group (cheaper, fewer degrees of freedom); recorded in the student's plan")
    refit_mode: Literal["sequential", "parallel"] = Field(
        "sequential", description="sequential: fit layer l on the inputs the converted layers before it give it "
        "(one pass per MoE layer, each stopping at its layer); parallel: every layer on the teacher's own "
        "inputs, in one pass")
    refit_ridge: float = Field(1e-3, ge=0, allow_inf_nan=False, description="ridge lambda as a fraction of the mean "
                               "diagonal of the activations' Gram matrix; it pulls the fit toward the plan's own "
                               "weights (0: plain least squares)", json_schema_extra={"metavar": "R"})


class RefitConfig(RefitSettings, TeacherRunSettings):
    """What a refit runs with: its method, and the teacher run over the calibration text."""

    data: str = Field(..., description="calibration text for the refit")


class CalibrateConfig(CalibrationSettings):
    """`moe2dense calibrate`."""

    full_stats: bool = Field(False, description="also run every expert on every token (needed by acp, do-acp, reap, "
                             "ean, output grouping)")
    out: Optional[str] = Field(None, description="statistics directory (local or URL)",
                               json_schema_extra={"metavar": "STATS", "aliases": ["-o"]})
    overwrite: bool = Field(False, description="replace STATS if it holds statistics")


class PlanSettings(MethodOptions):
    """How many experts to keep and how to score, group and scale them (plus the methods' settings)."""

    # K and k are checked against the model's expert count, which says more than a bound here
    experts: int = Field(..., description="experts kept per MoE layer", json_schema_extra={"metavar": "K", "aliases": ["-K"]})
    groups: Optional[int] = Field(None, description="groups per layer, k <= K (default K: pure pruning, the "
                                  "paper's best)", json_schema_extra={"metavar": "k", "aliases": ["-k"]})
    scoring: str = Field("cp", description="expert scoring (see `moe2dense methods`)")
    grouping: str = Field("none", description="expert grouping")
    scaling: str = Field("uniform", description="magnitude scaling")
    seed: int = Field(0, description="seed for random scoring/grouping and data order")

    def method_options(self) -> MethodOptions:
        return MethodOptions(**{k: getattr(self, k) for k in MethodOptions.model_fields})


class PlanConfig(PlanSettings):
    """`moe2dense plan`."""

    stats: str = positional("statistics written by `moe2dense calibrate` (local or URL)", metavar="STATS")
    src: Optional[str] = Field(None, description="the teacher checkpoint (needed by --grouping weight; default: the "
                               "one calibrated)", json_schema_extra={"metavar": "SRC"})
    out: str = Field(..., description="plan file (JSON), or a directory to write moe2dense_plan.json into",
                     json_schema_extra={"metavar": "PLAN", "aliases": ["-o"]})
    overwrite: bool = Field(False, description="replace PLAN if it exists")


class BuildOutput(StageConfig):
    """Where and how `build` writes the dense checkpoint."""

    out: str = Field(..., description="output directory (local or URL)", json_schema_extra={"metavar": "DST", "aliases": ["-o"]})
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="cast the student (default: keep the teacher's dtypes; bf16 for MXFP4)")
    shard_size: float = Field(1.0, gt=0, le=1 << 20, description="max shard size in GB", json_schema_extra={"metavar": "GB"})
    overwrite: bool = Field(False, description="replace DST if it holds a checkpoint (never a directory of other "
                            "files, never SRC)")
    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints; they can run code when loaded")

    @property
    def max_shard_bytes(self) -> int:
        return max(1, round(self.shard_size * (1 << 30)))


class _BuildInputs(StageConfig):
    src: str = positional("the MoE checkpoint the plan was made for (local or URL)", metavar="SRC")
    plan: Optional[str] = Field(None, description="plan file, or a directory holding moe2dense_plan.json",
                                json_schema_extra={"positional": True, "metavar": "PLAN"})


class _RefitText(StageConfig):
    data: Optional[str] = Field(None, description="calibration text for --refit (as for `calibrate`)",
                                json_schema_extra={"metavar": "DATA"})


class BuildConfig(TeacherRunSettings, _RefitText, RefitSettings, BuildOutput, _BuildInputs):  # flags: reverse order
    """`moe2dense build`."""

    def refit_config(self) -> Optional[RefitConfig]:
        return _refit_config(self, self.data)


def _refit_config(cfg: StageConfig, data: Optional[str]) -> Optional[RefitConfig]:
    """The refit a stage's settings ask for (None for --refit none); --refit without text is an error."""
    if cfg.refit == "none":
        return None
    if not data:
        raise UserError("--refit needs calibration text: give --data")
    return RefitConfig(data=data, **{k: getattr(cfg, k) for k in RefitConfig.model_fields if k != "data"})


class ConvertConfig(BuildOutput, RefitSettings, PlanSettings, CalibrationSettings):  # bases in reverse: flags in pipeline order
    """`moe2dense convert`: calibrate -> plan -> refit -> build."""

    refit: Literal["none", "down", "neuron", "group"] = Field(
        "down", description="fit the student's FFN to the MoE layer's output on the calibration tokens: `down` "
        "(the default) solves for the whole down projection (ridge regression; 7x lower perplexity before "
        "distillation on the bundled teacher), `neuron` / `group` only for one factor per neuron / per group; "
        "`none` is the paper's plain method (selected experts concatenated and scaled, nothing fitted)")

    def refit_config(self) -> Optional[RefitConfig]:
        return _refit_config(self, self.data)

    stats: Optional[str] = Field(None, description="also keep the calibration statistics here, for later `plan` runs",
                                 json_schema_extra={"metavar": "STATS"})
    full_stats: Optional[bool] = Field(None, description="collect expert-output statistics even if the chosen "
                                       "methods do not need them")


__all__ = ["StageConfig", "MethodOptions", "CalibrateConfig", "PlanConfig", "BuildConfig", "ConvertConfig",
           "RefitConfig", "positional"]
