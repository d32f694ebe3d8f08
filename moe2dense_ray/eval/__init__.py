"""Evaluation: held-out perplexity and KL (`metrics`, the one implementation every stage and
benchmark uses) and the `moe2dense eval` stage over lm-evaluation-harness (`stage`, `tasks/`)."""

from .stage import EvalConfig, evaluate_model

__all__ = ["EvalConfig", "evaluate_model"]
