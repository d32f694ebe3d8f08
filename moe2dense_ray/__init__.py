"""moe2dense-ray: turn a trained Mixture-of-Experts LLM into a standard dense model.

The package reads like the pipeline (docs/architecture.md):

- `convert`: calibrate -> plan -> refit -> build (`convert.convert` chains them), and prune-dense;
- `distill`: knowledge distillation from the MoE teacher on Ray Train + DeepSpeed;
- `sweep`: Ray Tune over conversion configurations, early-stopped by perplexity;
- `eval`: held-out perplexity and lm-evaluation-harness tasks;
- `core`: what they all use (families, checkpoints, storage, configs, teacher hosting, Ray).

Each stage is a function that takes its typed config and a `moe2dense` subcommand.
"""

__version__ = "0.1.0"
