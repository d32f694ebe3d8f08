"""MoE -> dense conversion, in the order the data flows: `calibrate` (statistics of the teacher's
routing and experts, on teacher replicas: `core.teachers`), `plan` (score, select, group, scale:
`methods/`), `refit` (closed-form down projections, on the same replicas), `ffn` + `build` (the
dense checkpoint, streamed tensor by tensor). `stage.convert` chains them; `prune` is the
dense-to-dense baseline.
"""

from ..core.lazy import exports

# (`calibrate`, `refit` and `build` are each a module and its stage function: import those from
# their modules, so that the package's attributes stay the modules)
__getattr__ = exports(__name__, {"convert": "stage", "ConvertResult": "stage", "make_plan": "plan",
                                 "prune_dense": "prune"})
__all__ = ["convert", "ConvertResult", "make_plan", "prune_dense"]
