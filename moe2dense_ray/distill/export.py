"""The distilled student as a standard dense Hugging Face checkpoint, written atomically."""

from __future__ import annotations

import os
import tempfile

import torch


def export_student(student_src: str, weights: dict[str, torch.Tensor], out: str, *,
                   extra: dict[str, str] | None = None) -> None:
    """Write `weights` into the class, config, dtype and tokenizer of `student_src` at `out`.

    transformers' own `save_pretrained` writes the weights (tied embeddings and all), so the
    result loads with `from_pretrained` like the `build` output it started from; the files go
    through the checkpoint writer, which moves them into place only once all are written.
    """
    from ..core.checkpoint import AUX_FILES, CheckpointReader, CheckpointWriter
    from ..eval.metrics import load_model

    model = load_model(student_src)
    reader = CheckpointReader(student_src)
    saved = reader.config_dict().get("dtype") or reader.config_dict().get("torch_dtype") or "float32"
    dtype = getattr(torch, saved) if isinstance(getattr(torch, str(saved), None), torch.dtype) else torch.float32
    result = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    tied = model.get_input_embeddings().weight
    missing = [k for k in result.missing_keys if model.get_parameter(k) is not tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"trained weights do not match the student: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    model.to(dtype)  # the student's own dtype (load_model computes in fp32)
    with tempfile.TemporaryDirectory() as tmp, CheckpointWriter(out, overwrite=True, sources=(student_src,)) as w:
        model.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                w.write_bytes(name, f.read())
        for name in (*AUX_FILES, "moe2dense_plan.json"):
            if reader.exists(name) and not os.path.exists(os.path.join(tmp, name)):
                w.write_bytes(name, reader.read_bytes(name))
        for name, text in (extra or {}).items():
            w.write_text(name, text)
    reader.close()
