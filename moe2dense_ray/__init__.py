"""moe2dense-ray: turn a trained Mixture-of-Experts LLM into a standard dense model.

Pipeline (each stage is a function here and a `moe2dense` subcommand):
calibrate -> plan -> build -> distill -> evaluate; `convert` chains the first three.
"""

__version__ = "0.1.0"
