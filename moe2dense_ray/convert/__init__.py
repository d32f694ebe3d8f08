"""MoE -> dense conversion, in the order the data flows: `calibrate` (statistics of the teacher's
routing and experts, on teacher replicas: `core.teachers`), `plan` (score, select, group, scale:
`methods/`), `refit` (closed-form down projections, on the same replicas), `ffn` + `build` (the
dense checkpoint, streamed tensor by tensor). `stage.convert` chains them; `prune` is the
dense-to-dense baseline.
"""

# (`calibrate`, `refit` and `build` are both a module and its stage function: import those from
# their modules, so the package's attributes stay the modules)
from .plan import make_plan
from .prune import prune_dense
from .stage import ConvertResult, convert

__all__ = ["convert", "ConvertResult", "make_plan", "prune_dense"]
