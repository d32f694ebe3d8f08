"""Distillation: a teacher service streams compact top-k distributions to Ray Train workers.

`stream.py` packs text into token blocks and runs the teacher actors (Ray Data); `codec.py`
encodes their distributions; `losses.py` compares them with the student's; `train.py` is the
per-worker training function (DeepSpeed); `run.py` drives a run (`distill`, `teacher_logits`).
"""
