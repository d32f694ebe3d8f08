"""The MoE checkpoint a run starts from, read from its headers and config alone: its family row,
its MoE shape, its tensors. A `Source` is opened once per run and handed to every stage that
needs it (`convert` calibrates, refits and builds from one), so the checkpoint is inspected once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from .checkpoint import CheckpointReader
from .errors import UserError
from .families import Family, MoEShape, get_family, moe_shape
from .storage import first_nonfinite_json


def _load_config(reader: CheckpointReader):
    d = reader.config_dict()
    mt = d.get("model_type")
    family = get_family(mt)
    bad = first_nonfinite_json(d)
    if bad is not None:  # json reads NaN and Infinity; a NaN rms_norm_eps would make every output NaN
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in bad[0]).lstrip(".")
        raise UserError(f"{reader.url}/config.json: {where} is {bad[1]}, not a finite number: the config is broken")
    return d, family, hf_config(reader.url, d)


def hf_config(url: str, d: dict[str, Any]):
    """transformers' config object for the parsed config.json `d` of checkpoint `url`, or one
    error line (config classes raise anything for a field of the wrong type)."""
    from transformers import CONFIG_MAPPING

    mt = d.get("model_type")
    try:
        return CONFIG_MAPPING[mt].from_dict({k: v for k, v in d.items() if k != "quantization_config"})
    except Exception as e:  # noqa: BLE001
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{url}/config.json is not a valid {mt} config: {why[:300]}") from None


def _check_weight_dtypes(reader: CheckpointReader, cfg_dict: dict) -> None:
    """No weight is stored as integers or booleans: transformers would cast them silently, and the
    student would be copied from a broken checkpoint. Quantized checkpoints store integers by design."""
    if cfg_dict.get("quantization_config"):
        return
    for k in reader.keys():
        if not str(reader.key_to_file.get(k, "")).endswith(".safetensors") or k.endswith("position_ids"):
            continue
        dt = reader.dtype(k)
        if not dt.is_floating_point:
            raise UserError(f"{reader.url}: tensor {k} is stored as {str(dt).replace('torch.', '')}, but the "
                            f"model's weights are floating point: the checkpoint is broken")


@dataclass
class Source:
    """An opened MoE checkpoint: a lazy tensor reader over its files, its config (as a dict and as
    transformers' config object), its family row and its MoE shape.

    Opening checks what a header can tell: a supported family, a finite config that transformers
    accepts, floating-point weights. `check_experts` checks every routed expert's tensors."""

    url: str
    reader: CheckpointReader
    config: dict[str, Any]
    family: Family
    hf_config: Any
    shape: MoEShape

    @classmethod
    def open(cls, src: str, *, allow_pickle: bool = False) -> "Source":
        reader = CheckpointReader(src, allow_pickle=allow_pickle)
        try:
            cfg_dict, family, cfg = _load_config(reader)
            shape = moe_shape(family, cfg)
            _check_weight_dtypes(reader, cfg_dict)
        except BaseException:
            reader.close()
            raise
        return cls(src, reader, cfg_dict, family, cfg, shape)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def check_experts(self) -> None:
        """What can be checked from the safetensors headers alone, in the driver, before any
        replica loads the model: every routed expert's tensors are there with the shapes
        config.json implies."""
        reader, family, shape, src = self.reader, self.family, self.shape, self.url
        keys = [k for k in reader.keys() if str(reader.key_to_file.get(k, "")).endswith(".safetensors")]
        if family.expert_layout != "per_expert":
            return
        H, I, E = shape.hidden_size, shape.expert_size, shape.num_experts
        want = dict(zip(family.expert_keys, ((I, H), (I, H), (H, I))))
        present = set(keys)
        for layer in shape.moe_layers:
            for block in dict.fromkeys((family.moe_prefix, "mlp")):
                base = f"model.layers.{layer}.{block}.experts."
                mine = [k[len(base):] for k in keys if k.startswith(base) and k[len(base):].split(".", 1)[0].isdigit()]
                if not mine:
                    continue  # fused experts (or none): transformers checks their shapes when loading
                beyond = sorted({int(m.split(".", 1)[0]) for m in mine} - set(range(E)))
                if beyond:
                    raise UserError(f"{src}: layer {layer} holds expert {beyond[0]}, but config.json says "
                                    f"{E} experts ({family.experts_attr})")
                for e in range(E):
                    for name, dims in want.items():
                        key = f"{base}{e}.{name}.weight"
                        if key not in present:
                            raise UserError(f"{src}: tensor {key} is missing (layer {layer} has {E} experts "
                                            f"by its config.json)")
                        if tuple(reader.shape(key)) != dims:
                            raise UserError(f"{src}: tensor {key} has shape {tuple(reader.shape(key))}, but "
                                            f"config.json implies {dims}")


@contextlib.contextmanager
def opened(src: "str | Source", *, allow_pickle: bool = False) -> Iterator[Source]:
    """`src` as an open Source for the block: a Source handed in is used (and left open); a path
    or URL is opened here and closed after."""
    if isinstance(src, Source):
        yield src
        return
    with Source.open(src, allow_pickle=allow_pickle) as source:
        yield source


__all__ = ["Source", "opened", "hf_config"]
