"""Hosting an MoE teacher for passes over calibration blocks: a loaded teacher, the hook pass that
accumulates sums on it, and a pool of replicas (in this process or as Ray actors) that keeps the
teacher loaded across passes (`convert` calibrates and refits on the same replicas).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .errors import UserError
from .families import Family, MoEShape, get_family, moe_shape
from .models import load_causal_lm
from .ray_session import cluster_resources, ensure_ray_after, first_line, require_resources


@dataclass
class LoadedTeacher:
    """A teacher in memory with what every pass over it needs: its family row and MoE shape."""

    model: Any
    family: Family
    shape: MoEShape
    device: str
    # what passes derive from the teacher and reuse across passes (a sequential refit's student
    # FFNs: built once per layer, not once per layer and pass)
    cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, src: str, *, device: str = "auto", dtype: str = "auto") -> "LoadedTeacher":
        model, cfg, device = load_causal_lm(src, device=device, dtype=dtype, experts_as_weights=True)
        family = get_family(cfg.get("model_type"))
        return cls(model, family, moe_shape(family, model.config), device)

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.family.model_type, "num_experts": self.shape.num_experts,
                "hidden_size": self.shape.hidden_size, "moe_layers": list(self.shape.moe_layers)}


class StopForward(Exception):
    """Raised by a pass's hook once every layer it reads is done: the rest of the forward is waste
    (a sequential refit of layer l needs layers 0..l only)."""


class TeacherPass:
    """Hooks on a loaded teacher that accumulate sums over the real (non-padding) tokens of the
    blocks given to `run`; `close` removes them, so one loaded teacher serves pass after pass.

    Used directly (in-process) or inside a Ray actor; `result` returns the running sums, which
    the driver adds across replicas."""

    def __init__(self, teacher: "LoadedTeacher | str", *, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if isinstance(teacher, str):
            teacher = LoadedTeacher.load(teacher, device=device, dtype=dtype)
        self.teacher = teacher
        self.model, self.family, self.shape, self.device = teacher.model, teacher.family, teacher.shape, teacher.device
        self._decoder = getattr(self.model, "model", self.model)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.samples = 0
        self._mask: torch.Tensor | None = None
        self._all_real = True
        self._handles: list[Any] = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _add(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Accumulate in float64 on the model's device; per-batch partial sums may be float32."""
        key = f"layers.{layer}.{name}"
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = value.detach().to(torch.float64).clone()
        else:
            acc.add_(value.detach())

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a [tokens, ...] tensor that are real tokens (all of them when nothing is padded)."""
        t = t.reshape(-1, t.shape[-1])
        return t if self._all_real else t[self._mask.to(t.device)]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> int:
        """Accumulate the sums over token blocks; returns the number of tokens counted."""
        counted = 0
        dev = self.model.device if hasattr(self.model, "device") else self.device
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(dev)
            mask = attention_mask[s:s + batch_size].to(dev)
            self._mask = mask.reshape(-1).bool()
            self._all_real = bool(self._mask.all())
            # the decoder stack only: the sums come from hooks inside it, and the LM head would
            # materialise [B, S, vocab] logits (5 GB at B=4, S=2048 for Qwen3's 151k vocabulary)
            try:
                self._decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            counted += int(mask.sum())
        self.tokens += counted
        self.samples += int(input_ids.shape[0])
        return counted

    def result(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "tokens": self.tokens, "samples": self.samples}

    def describe(self) -> dict[str, Any]:
        return self.teacher.describe()


# The kinds of pass a replica can run: name -> "module:class" of a TeacherPass (imported by name,
# so an actor needs no other module than this one to be shipped).
PASSES = {"stats": "moe2dense_ray.convert.calibrate:Calibrator", "refit": "moe2dense_ray.convert.refit:RefitPass"}


def _pass_class(kind: str):
    import importlib

    module, name = PASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


class _Replica:
    """One loaded teacher running pass after pass (in this process, or as a Ray actor). The
    teacher is loaded by `load`, not in `__init__`, so a failure to load comes back to the driver
    as that task's exception (a UserError stays one line), not as an actor that died with a
    traceback in its text."""

    def __init__(self, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.teacher: LoadedTeacher | None = None
        self.current: TeacherPass | None = None

    def load(self, src: str, dtype: str) -> dict[str, Any]:
        self.teacher = LoadedTeacher.load(src, dtype=dtype)
        return self.teacher.describe()

    def begin(self, kind: str, options: dict[str, Any]) -> None:
        if self.current is not None:
            self.current.close()
        self.current = _pass_class(kind)(self.teacher, **options)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> int:
        return self.current.run(input_ids, attention_mask, batch_size)

    def result(self) -> dict[str, Any]:
        out = self.current.result()
        self.current.close()
        self.current = None
        return out


_RAY_ERROR_KEYS = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:", "The actor died unexpectedly")


def _worker_error(e: BaseException) -> str:
    """One line for an error that a calibration actor raised or died of."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return first_line(str(cause))
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
        return f"a calibration worker failed: {type(cause).__name__}: {first_line(cause)}"
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # an exception raised in an actor's creation task: the last line of its traceback
    raised = [ln for ln in lines if ln.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception", "Exit"))
              and ": " in ln and not ln.startswith(("File ", "ray."))]
    if raised:
        kind, msg = raised[-1].split(": ", 1)
        kind = kind.split(".")[-1]
        return msg if kind == "UserError" else f"a calibration worker failed: {kind}: {msg}"
    useful = [ln for ln in lines if not ln.startswith(_RAY_ERROR_KEYS)]
    detail = " ".join((useful or lines or [type(e).__name__])[0].split())
    return f"a calibration worker died: {detail[:500]}"


@contextlib.contextmanager
def _actor_errors() -> Iterator[None]:
    """Errors of Ray actors as one UserError line: the cause's own message, not Ray's wrapping."""
    import ray.exceptions as rx

    kinds = (rx.RayTaskError, rx.RayActorError) + ((rx.OutOfMemoryError,) if hasattr(rx, "OutOfMemoryError") else ())
    try:
        yield
    except kinds as e:
        raise UserError(_worker_error(e)) from None


class TeacherPool:
    """N replicas of the teacher, loaded once and kept for every pass over the calibration blocks
    (`convert --refit` runs the statistics pass and the plan's refit passes on the same replicas).

    `workers=0` is one replica in this process (no Ray); `workers=N` is N Ray actors of
    `cpus_per_worker` CPUs, each on its own GPU when there is one, each taking the next part of at
    most `batch_size` blocks. The
    cluster is checked first (an actor that can never be placed would be waited for forever),
    actors are killed however the pool ends, and an embedded Ray that the pool started is shut
    down when it fails or is interrupted.
    """

    def __init__(self, src: str, *, workers: int, dtype: str = "auto", gpus_per_worker: float | None = None,
                 resources: dict[str, float] | None = None, cpus_per_worker: float = 1.0):
        self.src, self.workers, self.dtype = src, workers, dtype
        self.gpus_per_worker, self.resources = gpus_per_worker, dict(resources or {})
        self.cpus_per_worker = float(cpus_per_worker)
        self.describe: dict[str, Any] = {}  # the teacher's shape, once loaded
        self._actors: list[Any] = []
        self._local: _Replica | None = None
        self._started = False

    def __enter__(self) -> "TeacherPool":
        return self

    def _start(self) -> None:
        """Load the replicas, at the first pass: the caller's checks of its inputs come first."""
        if self._local is not None or self._actors:
            return
        if self.workers <= 0:
            self._local = _Replica()
            self.describe = self._local.load(self.src, self.dtype)
        else:
            self._start_actors()

    def _use_gpu(self) -> float:
        gpus = float(cluster_resources().get("GPU", 0))
        return self.gpus_per_worker if self.gpus_per_worker is not None else (1 if gpus > 0 else 0)

    def _check_resources(self) -> None:
        workers, resources, cpus_each = self.workers, self.resources, self.cpus_per_worker
        res = cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        use_gpu = self._use_gpu()
        need = {"CPU": workers * cpus_each, "GPU": workers * float(use_gpu),
                **{k: workers * v for k, v in resources.items()}}
        if need["CPU"] > cpus:
            advice = f"lower --workers to {int(cpus // cpus_each)} or fewer"
        elif gpus <= 0:
            advice = "leave out --gpus-per-worker to calibrate on CPUs"
        else:
            advice = "lower --gpus-per-worker or --workers"
        require_resources(need, each=[{"CPU": cpus_each, "GPU": float(use_gpu), **resources}], advice=advice,
                          who=f"calibrating on --workers {workers}",
                          parts=f"{cpus_each:g} CPU{f' and {use_gpu:g} GPU' if use_gpu else ''} per worker",
                          custom_flags="--teacher-resources")

    def _start_actors(self) -> None:
        import ray

        self._started = ensure_ray_after(self._check_resources)
        workers, resources, cpus_each, use_gpu = self.workers, self.resources, self.cpus_per_worker, self._use_gpu()
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
        # "DEFAULT": never inside the caller's placement group (a sweep trial's reserves only the trial itself)
        Actor = ray.remote(_Replica).options(num_cpus=cpus_each, num_gpus=use_gpu, resources=resources or None,
                                             scheduling_strategy="DEFAULT")
        self._actors = [Actor.remote(threads) for _ in range(workers)]
        with _actor_errors():
            self.describe = ray.get([a.load.remote(self.src, self.dtype) for a in self._actors])[0]

    def __exit__(self, kind, value, tb) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - an actor that is already gone
                    pass
            self._actors = []
        if self._started and kind is not None:
            import ray

            ray.shutdown()
        if self._local is not None and self._local.current is not None:
            self._local.current.close()

    def parts(self, calib, batch_size: int) -> list[Any]:
        """The blocks split into parts of at most `batch_size` rows, put in Ray's object store
        once when there are actors (a sequential refit sends them again for every layer)."""
        n_parts = -(-calib.num_samples // batch_size)
        # `shard` copies its rows, so each task ships its own tokens, not the whole set's storage
        parts = [calib.shard(j, n_parts) for j in range(n_parts)]
        self._start()
        if not self._actors:
            return parts
        import ray

        return [(ray.put(p.input_ids), ray.put(p.attention_mask)) for p in parts]

    def run_pass(self, kind: str, options: dict[str, Any], parts: list[Any], batch_size: int,
                 on_tokens=None) -> list[dict[str, Any]]:
        """One pass of `kind` over every part; each replica's sums (the caller adds them)."""
        self._start()
        if self._local is not None:
            self._local.begin(kind, options)
            for p in parts:
                n = self._local.run(p.input_ids, p.attention_mask, batch_size)
                if on_tokens:
                    on_tokens(n)
            return [self._local.result()]
        import ray
        from ray.util import ActorPool

        with _actor_errors():
            ray.get([a.begin.remote(kind, options) for a in self._actors])
            pool = ActorPool(self._actors)
            for n in pool.map_unordered(lambda a, p: a.run.remote(p[0], p[1], batch_size), parts):
                if on_tokens:
                    on_tokens(n)
            return ray.get([a.result.remote() for a in self._actors])
