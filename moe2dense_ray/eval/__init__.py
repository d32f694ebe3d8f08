"""Evaluation: held-out perplexity and KL (`metrics`, the one implementation every stage and
benchmark uses) and the `moe2dense eval` stage over lm-evaluation-harness (`stage`, `tasks/`)."""

from ..core.lazy import exports

__getattr__ = exports(__name__, {"EvalConfig": "stage", "evaluate_model": "stage"})
__all__ = ["EvalConfig", "evaluate_model"]
