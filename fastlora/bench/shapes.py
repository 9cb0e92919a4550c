"""The layer shapes the suite measures: the QLoRA-adapted linear layers of real models.

K = in_features, N = out_features (x [M, K] @ W^T, W [N, K]), taken from each model's
config.json on the Hugging Face Hub:
    Llama-3-8B    hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128
    Mistral-7B    hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128
                  (the same layer shapes as Llama-3-8B; kept so results can be named by model)
    Qwen2.5-7B    hidden 3584, intermediate 18944, 28 heads / 4 KV heads of 128; q/k/v have bias
    Llama-2-70B   hidden 8192, intermediate 28672, 64 heads / 8 KV heads of 128
Names are "<model>.<layer>" (e.g. "llama3-8b.q_proj"); a bare model name selects its 7 layers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    name: str
    n: int          # out_features
    k: int          # in_features
    bias: bool = False


def _model(prefix: str, hidden: int, intermediate: int, kv_heads: int, head_dim: int = 128,
           qkv_bias: bool = False) -> list[LayerShape]:
    kv = kv_heads * head_dim
    return [LayerShape(f"{prefix}.q_proj", hidden, hidden, qkv_bias),
            LayerShape(f"{prefix}.k_proj", kv, hidden, qkv_bias),
            LayerShape(f"{prefix}.v_proj", kv, hidden, qkv_bias),
            LayerShape(f"{prefix}.o_proj", hidden, hidden),
            LayerShape(f"{prefix}.gate_proj", intermediate, hidden),
            LayerShape(f"{prefix}.up_proj", intermediate, hidden),
            LayerShape(f"{prefix}.down_proj", hidden, intermediate)]


MODELS = {
    "llama3-8b": _model("llama3-8b", 4096, 14336, 8),
    "mistral-7b": _model("mistral-7b", 4096, 14336, 8),
    "qwen2.5-7b": _model("qwen2.5-7b", 3584, 18944, 4, qkv_bias=True),
    "llama2-70b": _model("llama2-70b", 8192, 28672, 8),
}
SHAPES = {s.name: s for layers in MODELS.values() for s in layers}

# tokens per layer call (batch x sequence): decode (1) to a long packed batch (16384)
M_FULL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
M_DEFAULT = (1, 16, 128, 512, 2048, 4096, 8192, 16384)
RANKS_FULL = (8, 16, 64)
RANK_DEFAULT = 16
MODES = ("forward", "backward", "full")

# the smoke pass (no GPU): small enough for Triton's interpreter, with an uneven M and a bias
SMOKE_SHAPES = (LayerShape("smoke.square", 64, 64), LayerShape("smoke.wide_bias", 96, 128, True))
SMOKE_M = 20
SMOKE_RANK = 8


def select_shapes(spec: str) -> list[LayerShape]:
    """Comma-separated layer names, model names, or 'all' -> shapes (in the order given).

    Raises ValueError naming the unknown entry and listing what exists."""
    chosen: list[LayerShape] = []
    for item in (part.strip().lower() for part in spec.split(",")):
        if not item:
            continue
        if item == "all":
            found = list(SHAPES.values())
        elif item in MODELS:
            found = MODELS[item]
        elif item in SHAPES:
            found = [SHAPES[item]]
        else:
            raise ValueError(f"unknown shape {item!r}: use 'all', a model "
                             f"({', '.join(MODELS)}) or a layer such as llama3-8b.q_proj")
        chosen += [s for s in found if s not in chosen]
    if not chosen:
        raise ValueError("no shape selected (--shapes is empty)")
    return chosen


def parse_positive_ints(spec: str, what: str) -> tuple[int, ...]:
    """'1,16,128' -> (1, 16, 128); every value must be an integer >= 1."""
    values = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{what} must be integers, got {part!r}") from None
        if value <= 0:
            raise ValueError(f"{what} must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise ValueError(f"no {what} given")
    return tuple(values)
