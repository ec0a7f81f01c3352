"""A Hugging Face checkpoint directory, opened lazily.

Tensors are memory-mapped through safetensors and read one at a time; routed experts are
read one expert at a time, from either layout found on disk:

  per-expert  {moe}.experts.{e}.w1/w3/w2.weight  or  .gate_proj/.up_proj/.down_proj.weight
  fused       {moe}.experts.gate_up_proj [E, 2I, H]  and  {moe}.experts.down_proj [E, H, I]

so the checkpoint is never materialised twice in memory.

Opening checks everything the header tells, before a byte of weights is read: the layers and
experts present match config.json, and every tensor has the shape and a floating-point dtype
the model needs. Reading checks what only the bytes tell: `tensor()` refuses a tensor holding
NaN or Inf (the host store checks each expert it reads the same way), naming it and its shard.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from moeflow.errors import CheckpointError
from moeflow.architectures.registry import spec_from_config
from moeflow.architectures.spec import ModelSpec
from moeflow.weights.finite import check_finite

_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Where one MoE layer's routed experts sit in the checkpoint."""

    kind: Literal["per_expert", "fused"]
    prefix: str  # e.g. "model.layers.3.mlp"
    names: tuple[str, str, str] = ("", "", "")  # per_expert: gate, up, down suffixes

    def tensor_names(self, num_experts: int) -> list[str]:
        if self.kind == "fused":
            return [f"{self.prefix}.experts.gate_up_proj", f"{self.prefix}.experts.down_proj"]
        return [f"{self.prefix}.experts.{e}.{n}.weight" for e in range(num_experts) for n in self.names]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class Checkpoint:
    def __init__(self, model_dir: str | Path, *, allow_nonfinite: bool = False):
        """`allow_nonfinite`: read tensors holding NaN or Inf instead of refusing them."""
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {str(self.dir)!r} does not exist")
        self.allow_nonfinite = allow_nonfinite
        self.config = self._read_config()
        self.spec: ModelSpec = spec_from_config(self.config)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._open_shards()
        self._check_layers()
        self.layouts: dict[int, ExpertLayout] = {l: self._find_layout(l) for l in self.spec.moe_layers}
        self._check_experts()
        self._check_tensors()

    # -- opening ---------------------------------------------------------------------------

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{self.dir} has no config.json; is it a Hugging Face model directory?")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None

    def _open_shards(self) -> None:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is malformed ({exc!s}); it needs a 'weight_map'") from None
            shards = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, shards = {}, ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.dir.iterdir())
            hint = " (only safetensors checkpoints are supported)" if any(f.endswith(".bin") for f in found) else ""
            raise CheckpointError(
                f"{self.dir} has neither model.safetensors nor model.safetensors.index.json{hint}; found: "
                + ", ".join(found)
            )
        for shard in shards:
            path = self.dir / shard
            if not path.is_file():
                raise CheckpointError(f"shard {shard} named in {index.name} is missing from {self.dir}")
            try:
                handle = safe_open(str(path), framework="pt")
            except SafetensorError as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
            self._handles[shard] = handle
            for name in handle.keys():
                self._where[name] = shard
        for name, shard in weight_map.items():
            if self._where.get(name) != shard:
                raise CheckpointError(f"tensor {name!r} is listed in {index.name} under {shard} but is not in that file")

    def _check_layers(self) -> None:
        """config.json's num_hidden_layers is the number of decoder layers the checkpoint holds."""
        present = {int(m.group(1)) for name in self._where if (m := _LAYER.match(name))}
        n = self.spec.num_layers
        if present and max(present) >= n:
            raise CheckpointError(f"config.json: num_hidden_layers={n}, but the checkpoint holds layers up to "
                                  f"model.layers.{max(present)} ({max(present) + 1} layers): the ones past {n - 1} "
                                  f"would be silently ignored")
        missing = sorted(set(range(n)) - present)
        if missing:
            raise CheckpointError(f"config.json: num_hidden_layers={n}, but the checkpoint holds no tensors for "
                                  f"layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:8]))}")

    def _check_experts(self) -> None:
        """A per-expert layout holds exactly the routed experts config.json counts (the fused one's shape says so)."""
        E = self.spec.num_experts
        field = "num_experts" if self.config.get("num_experts") is not None else "num_local_experts"
        for layer, lay in self.layouts.items():
            if lay.kind != "per_expert":
                continue
            head = f"{lay.prefix}.experts."
            found = {int(m.group(1)) for name in self._where if name.startswith(head)
                     and (m := _EXPERT.search(name, len(lay.prefix)))}
            if found and max(found) >= E:
                raise CheckpointError(f"config.json: {field}={E}, but layer {layer} of the checkpoint holds "
                                      f"{max(found) + 1} experts ({head}0 to {head}{max(found)})")

    def _find_layout(self, layer: int) -> ExpertLayout:
        for moe in self.spec.moe_prefixes:
            prefix = f"model.layers.{layer}.{moe}"
            if f"{prefix}.experts.gate_up_proj" in self._where:
                return ExpertLayout("fused", prefix)
            for names in _PER_EXPERT_NAMES:
                if f"{prefix}.experts.0.{names[0]}.weight" in self._where:
                    return ExpertLayout("per_expert", prefix, names)
        raise CheckpointError(
            f"no routed-expert weights found for layer {layer}: looked for "
            + " or ".join(f"model.layers.{layer}.{m}.experts.(gate_up_proj|0.w1.weight|0.gate_proj.weight)"
                          for m in self.spec.moe_prefixes)
        )

    def _check_tensors(self) -> None:
        """Every tensor the model needs is present with the right shape, before anything is loaded."""
        s = self.spec
        H, I, E = s.hidden_size, s.expert_width, s.num_experts
        expected: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab_size, H), "model.norm.weight": (H,)}
        if not s.tie_word_embeddings:
            expected["lm_head.weight"] = (s.vocab_size, H)
        for layer in range(s.num_layers):
            expected.update(self.dense_layer_shapes(layer))
            if layer in self.layouts:
                lay = self.layouts[layer]
                if lay.kind == "fused":
                    expected[f"{lay.prefix}.experts.gate_up_proj"] = (E, 2 * I, H)
                    expected[f"{lay.prefix}.experts.down_proj"] = (E, H, I)
                else:
                    for e in range(E):
                        g, u, d = (f"{lay.prefix}.experts.{e}.{n}.weight" for n in lay.names)
                        expected.update({g: (I, H), u: (I, H), d: (H, I)})
        for name, shape in expected.items():
            if name not in self._where:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
            sl = self._slice(name)
            got = tuple(sl.get_shape())
            if got != shape:
                raise CheckpointError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
            if (code := sl.get_dtype()) not in _FLOAT_DTYPES:
                # read as is, it would be cast to the compute dtype without a word: integers as weights
                raise CheckpointError(f"tensor {name!r} in {self._where[name]} is stored as {code}; moeflow reads "
                                      f"weights stored as {', '.join(_FLOAT_DTYPES)} (quantized checkpoints are not "
                                      f"supported)")

    def dense_layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        return dense_layer_shapes(self.spec, self.layouts, layer)

    def dense_numel(self) -> int:
        return dense_numel(self.spec, self.layouts)

    # -- reading ---------------------------------------------------------------------------

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its memory-mapped shard; one holding NaN or Inf is refused."""
        t = self._read(name)
        if not self.allow_nonfinite:
            check_finite(self.describe(name), t)
        return t

    def describe(self, name: str) -> str:
        return f"tensor {name!r} in {self._where[name]}"

    def describe_expert(self, layer: int, expert: int, part: Literal["gate", "up", "down"]) -> str:
        """Where routed expert `expert`'s gate, up or down projection sits on disk, for messages."""
        lay = self.layouts[layer]
        if lay.kind == "per_expert":
            return self.describe(f"{lay.prefix}.experts.{expert}.{lay.names[('gate', 'up', 'down').index(part)]}.weight")
        fused = f"{lay.prefix}.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        half = "" if part == "down" else f", its {part} half"
        return f"tensor {fused!r} (expert {expert}{half}) in {self._where[fused]}"

    def _read(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed expert `expert` of MoE layer `layer` as (gate [I, H], up [I, H], down [H, I])."""
        lay = self.layouts[layer]
        if lay.kind == "fused":
            I = self.spec.expert_width
            gate_up = self._slice(f"{lay.prefix}.experts.gate_up_proj")[expert : expert + 1][0]
            down = self._slice(f"{lay.prefix}.experts.down_proj")[expert : expert + 1][0]
            return gate_up[:I], gate_up[I:], down
        # the host store checks what it copies, in the dtype it keeps: no second pass here
        g, u, d = (self._read(f"{lay.prefix}.experts.{expert}.{n}.weight") for n in lay.names)
        return g, u, d

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    @property
    def tensor_dtype(self) -> torch.dtype:
        """The dtype the routed experts are stored in."""
        lay = self.layouts[self.spec.moe_layers[0]]
        return self.tensor_dtype_of(lay.tensor_names(1)[0])

    def tensor_dtype_of(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        return _SAFETENSORS_DTYPES[code]


_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def dense_layer_shapes(s: ModelSpec, layouts: dict[int, ExpertLayout], layer: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder layer's non-expert tensors."""
    H, D = s.hidden_size, s.head_dim
    p = f"model.layers.{layer}"
    q, kv = s.num_heads * D, s.num_kv_heads * D
    out = {
        f"{p}.input_layernorm.weight": (H,),
        f"{p}.post_attention_layernorm.weight": (H,),
        f"{p}.self_attn.q_proj.weight": (q, H),
        f"{p}.self_attn.k_proj.weight": (kv, H),
        f"{p}.self_attn.v_proj.weight": (kv, H),
        f"{p}.self_attn.o_proj.weight": (H, q),
    }
    if s.qkv_bias:
        out.update({f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                    f"{p}.self_attn.v_proj.bias": (kv,)})
    if s.o_bias:
        out[f"{p}.self_attn.o_proj.bias"] = (H,)
    if s.qk_norm == "per_head":
        out.update({f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)})
    elif s.qk_norm == "full":
        out.update({f"{p}.self_attn.q_norm.weight": (q,), f"{p}.self_attn.k_norm.weight": (kv,)})
    if layer in s.moe_layers:
        moe = layouts[layer].prefix
        out[f"{moe}.gate.weight"] = (s.num_experts, H)
        if s.shared_expert_width:
            W = s.shared_expert_width
            out.update({f"{moe}.shared_expert.gate_proj.weight": (W, H), f"{moe}.shared_expert.up_proj.weight": (W, H),
                        f"{moe}.shared_expert.down_proj.weight": (H, W), f"{moe}.shared_expert_gate.weight": (1, H)})
    else:
        W = s.dense_intermediate_size
        out.update({f"{p}.mlp.gate_proj.weight": (W, H), f"{p}.mlp.up_proj.weight": (W, H),
                    f"{p}.mlp.down_proj.weight": (H, W)})
    return out


def dense_numel(s: ModelSpec, layouts: dict[int, ExpertLayout]) -> int:
    """Elements of every tensor that is not a routed expert (embeddings, attention, norms, routers, ...)."""
    shapes = [(s.vocab_size, s.hidden_size), (s.hidden_size,)]
    if not s.tie_word_embeddings:
        shapes.append((s.vocab_size, s.hidden_size))
    for layer in range(s.num_layers):
        shapes.extend(dense_layer_shapes(s, layouts, layer).values())
    return sum(math.prod(shape) for shape in shapes)
