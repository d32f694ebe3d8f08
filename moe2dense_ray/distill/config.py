"""The typed configs of the two distillation stages: `teacher-logits` and `distill`.

Both share the teacher service's settings (how text becomes blocks, how the teacher's
distribution is encoded, how many teacher replicas run), so a stream written offline by
`teacher-logits` is exactly the stream `distill` would have computed online.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from ..core.config import Resources, StageConfig, positional


class TeacherStreamConfig(StageConfig):
    """Text -> token blocks -> the teacher's compact distribution per token."""

    data: Optional[str] = Field(None, description="training text: .txt, .jsonl, .parquet, a directory, or hf:NAME",
                                json_schema_extra={"metavar": "DATA"})
    text_field: str = Field("text", description="field/column holding the text")
    tokens: Optional[PositiveInt] = Field(None, description="training tokens to stream (whole blocks)",
                                          json_schema_extra={"metavar": "N"})
    seq_len: PositiveInt = Field(256, description="tokens per block", json_schema_extra={"metavar": "L"})
    seed: int = Field(0, description="seed for the order of documents and for sampled targets")
    codec: Literal["topk", "sampled"] = Field("topk", description="teacher distribution per token: the top-k "
                                              "log-probabilities, or tokens sampled from it with counts")
    top_k: PositiveInt = Field(128, description="entries per token for --codec topk", json_schema_extra={"metavar": "K"})
    draws: PositiveInt = Field(12, description="tokens drawn per position for --codec sampled",
                               json_schema_extra={"metavar": "M"})
    temperature: PositiveFloat = Field(1.0, description="softmax temperature of teacher and student (paper: 1)",
                                       json_schema_extra={"metavar": "T"})
    teacher_workers: PositiveInt = Field(1, description="teacher replicas (Ray actors). In `distill` they live "
                                         "as long as the run, not a training worker, and each worker sends its "
                                         "blocks to its own share of them (to all, when they do not divide evenly)",
                                         json_schema_extra={"metavar": "N"})
    teacher_batch: PositiveInt = Field(8, description="blocks per teacher forward pass", json_schema_extra={"metavar": "B"})
    gpus_per_teacher: Optional[float] = Field(None, ge=0, description="GPUs per teacher replica (default: 1 when "
                                              "the cluster has GPUs); more than 1 shards the teacher over them",
                                              json_schema_extra={"metavar": "G"})
    cpus_per_teacher: PositiveFloat = Field(0.5, description="CPUs reserved per teacher replica",
                                            json_schema_extra={"metavar": "C"})
    teacher_resources: Resources = Field({}, description="custom Ray resources per teacher replica, "
                                         "NAME=AMOUNT[,...] (e.g. teacher=1: replicas go only to nodes that declare "
                                         "`teacher`)", json_schema_extra={"metavar": "RES"})
    val_blocks: PositiveInt = Field(16, description="held-out blocks (the first of the stream, never trained on) "
                                    "for perplexity and KL to the teacher", json_schema_extra={"metavar": "N"})


class TeacherLogitsConfig(TeacherStreamConfig):
    """`moe2dense teacher-logits`: run the teacher once and keep its stream as Parquet (LOGITS)."""

    teacher: str = positional("the MoE teacher checkpoint (local or URL)", metavar="TEACHER")
    out: str = Field(..., description="LOGITS directory to write (local or URL)", json_schema_extra={"metavar": "LOGITS"})
    overwrite: bool = Field(False, description="replace LOGITS if it holds a teacher stream")

    @model_validator(mode="after")
    def _needs_data(self):
        if not self.data or not self.tokens:
            raise ValueError("--data and --tokens are required")
        return self


class DistillConfig(TeacherStreamConfig):
    """`moe2dense distill`: train a dense student on the teacher's stream with Ray Train and DeepSpeed."""

    teacher: Optional[str] = Field(None, description="the MoE teacher (local or URL); not needed with --logits",
                                   json_schema_extra={"metavar": "T"})
    student: str = Field(..., description="the dense student to refine (a `moe2dense build` output)",
                         json_schema_extra={"metavar": "S"})
    logits: Optional[str] = Field(None, description="a stream written by `moe2dense teacher-logits`, "
                                  "instead of running the teacher", json_schema_extra={"metavar": "LOGITS"})
    out: str = Field(..., description="RUN directory: checkpoints, metrics, TensorBoard, student/",
                     json_schema_extra={"metavar": "RUN"})
    # optimisation
    loss: str = Field("forward_kl", description="distillation loss (forward_kl, reverse_kl, jsd)")
    ce_weight: float = Field(0.0, ge=0, le=1, description="weight of next-token cross-entropy "
                             "(the loss is (1-w)*KD + w*CE)", json_schema_extra={"metavar": "W"})
    lr: Optional[PositiveFloat] = Field(None, description="peak learning rate (AdamW; default 1e-3, and for a student "
                                        "whose plan records a refit 1e-3 x sqrt(error after / error before the fit), "
                                        "so its first steps do not undo the fit: docs/refit.md)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up before the cosine decay")
    batch_size: PositiveInt = Field(8, description="blocks per micro-batch per training worker",
                                    json_schema_extra={"metavar": "B"})
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    clip: float = Field(1.0, ge=0, description="gradient-norm clipping (0: none)")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    workers: PositiveInt = Field(1, description="training workers (data parallel)", json_schema_extra={"metavar": "N"})
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs per training worker", json_schema_extra={"metavar": "C"})
    worker_resources: Resources = Field({}, description="custom Ray resources per training worker, "
                                        "NAME=AMOUNT[,...] (e.g. student=1: workers go only to nodes that declare "
                                        "`student`)", json_schema_extra={"metavar": "RES"})
    activation_checkpointing: Optional[bool] = Field(None, description="keep only each layer's input in the "
                                                     "forward pass and recompute the rest in backward (default: "
                                                     "on when training on GPUs)")
    threads: Optional[PositiveInt] = Field(None, description="torch threads per training worker (default: the "
                                           "node's cores / --workers: the teacher leaves them idle much of the time)",
                                           json_schema_extra={"metavar": "N"})
    # validation, checkpoints, faults
    val_data: Optional[str] = Field(None, description="held-out text, whose first --val-blocks blocks (in file "
                                    "order) validate (default: the first blocks of DATA's stream)", json_schema_extra={"metavar": "DATA"})
    report_every: PositiveInt = Field(25, description="optimizer steps between reports (validation, metrics)",
                                      json_schema_extra={"metavar": "STEPS"})
    checkpoint_every: PositiveInt = Field(50, description="optimizer steps between checkpoints",
                                          json_schema_extra={"metavar": "STEPS"})
    keep_checkpoints: PositiveInt = Field(2, description="checkpoints kept in RUN")
    max_failures: int = Field(3, ge=-1, description="losses of a training worker (restarted from the last "
                              "checkpoint) or of a teacher replica (restarted) to recover from, -1: always. "
                              "Preemptions Ray recognises are not counted; a non-finite loss, out of memory or a "
                              "bad input ends the run at once", json_schema_extra={"metavar": "N"})
    resume: bool = Field(False, description="continue the run in RUN from its last checkpoint")
    overwrite: bool = Field(False, description="replace RUN if it holds an earlier run")

    @model_validator(mode="after")
    def _source(self):
        if self.logits:
            if self.teacher or self.data or self.val_data:
                raise ValueError("give either --logits or --teacher with --data (and --val-data), not both")
        elif not (self.teacher and self.data and self.tokens):
            raise ValueError("--teacher, --data and --tokens are required (or --logits)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        return self

    def warmup_steps(self, steps: int) -> int:
        """The steps of linear warm-up in a run of `steps` (rounded down: under 1/warmup steps,
        none; the scheduler's and the error lines' one count)."""
        return int(self.warmup * steps)


__all__ = ["TeacherStreamConfig", "TeacherLogitsConfig", "DistillConfig"]
