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
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- YAML ---------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str, **overrides: Any):
        """Load `path` (local or fsspec URL) and apply `overrides` on top; bad files are UserErrors."""
        from .checkpoint import url_to_fs

        fs, p = url_to_fs(path)
        if not fs.exists(p):
            raise UserError(f"no such config file: {path}")
        try:
            with fs.open(p, "r") as f:
                data = yaml.safe_load(f) or {}
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
            if not field.is_required() and field.default is not None:
                help_text += f" (default {field.default})"
            kw: dict[str, Any] = dict(help=help_text, default=argparse.SUPPRESS)
            if kind is bool:  # a switch; one that is on by default gets a --no- form
                kw["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
            else:
                kw["type"] = kind
                if choices:
                    kw["choices"] = choices
                if "metavar" in extra or not choices:
                    kw["metavar"] = extra.get("metavar", name.upper())
            if extra.get("positional"):
                kw.pop("default")
                parser.add_argument(name, nargs="?" if not field.is_required() else None, **kw)
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
    return str, None


def positional(description: str, **kw: Any) -> Any:
    """A required field given as a positional argument on the command line."""
    return Field(..., description=description, json_schema_extra={"positional": True, **kw})


class MethodOptions(StageConfig):
    """Settings of individual methods; every plan records all of them, so a plan says exactly how
    it was made. Each method reads only its own (`Registry.register(..., options=...)`), and the
    methods' defaults are these (here, not in the methods, so the CLI can list them without torch)."""

    ridge_scale: float = Field(1.0, gt=0, description="do-acp: ridge lambda = scale * mean(diag K) / k")
    kmeans_restarts: int = Field(8, ge=1, description="weight grouping: seeded k-means restarts (lowest inertia wins)")
    output_distance: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="output grouping: distance between the experts' mean outputs")
    score_reduction: Literal["sum", "mean"] = Field(
        "sum", description="score scaling: a group's score is the sum or the mean of its members'")


__all__ = ["StageConfig", "MethodOptions", "positional"]
