"""Distillation: teacher replicas stream compact top-k distributions to Ray Train workers.

`driver.py` drives a run on the Ray driver (`distill`, `teacher_logits`): it checks the inputs,
starts the teacher replicas and the TorchTrainer. `worker.py` is the per-worker training
function (DeepSpeed). `blocks.py` packs text into token blocks and records what was trained;
`stream.py` hosts the teacher replicas and moves their targets; `codec.py` encodes a teacher
distribution; `losses.py` compares it with the student's; `export.py` writes the student.

The stage functions are importable from here; the driver is imported on first use, so a
training worker that imports `moe2dense_ray.distill.worker` does not load it.
"""

from ..core.lazy import exports

__getattr__ = exports(__name__, {"distill": "driver", "teacher_logits": "driver", "DistillResult": "driver",
                                 "read_metrics": "driver", "DistillConfig": "config", "TeacherLogitsConfig": "config"})
__all__ = ["distill", "teacher_logits", "DistillResult", "read_metrics", "DistillConfig", "TeacherLogitsConfig"]
