"""The decoder: embed -> for each layer: attention (KV cache) -> MoE or dense MLP -> norm -> logits.

Shapes: T tokens in the step (all sequences flattened), H hidden, N query heads, G KV
heads, D head dim, V vocabulary, B sequences in the step.

Dense weights live on the device for the engine's whole life; routed experts are reached
only through `experts` (the cache-backed compute), so this file never sees where an
expert's weights are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from moeflow.architectures.spec import ModelSpec
from moeflow.errors import ConfigError
from moeflow.models import fused_decode
from moeflow.models.decode_attention import decode_attention
from moeflow.models.layers import PREFILL_SDPA_BACKENDS, Rotary, attend_decode, attend_prefill, dense_mlp, rms_norm
from moeflow.routing.record import RouteRecord
from moeflow.routing.router import Routing, route
from moeflow.routing.selection import SelectionContext, Selector
from moeflow.weights.checkpoint import Checkpoint

ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForwardBatch:
    """One step's tokens. Prefill steps carry whole prompts; decode steps one token per sequence."""

    input_ids: torch.Tensor  # [T] on the device
    positions: torch.Tensor  # [T] on the device
    is_prefill: bool
    kv_rows: list[int]  # per sequence, its row in the KV cache
    starts: list[int]  # per sequence, tokens already in its KV cache before this step
    lengths: list[int]  # per sequence, tokens in this step
    kv_rows_t: torch.Tensor | None = None  # decode: [B] on the device
    context_lens_t: torch.Tensor | None = None  # decode: [B] on the device (past + 1)
    max_context: int = 0  # decode: longest context in the batch
    selector: Selector | None = None  # rewrites this step's routing; None: the router's choice runs (exact)
    slot_table: torch.Tensor | None = None  # [L, E] the expert cache's device table (None: all resident)


class MoEModel:
    def __init__(self, spec: ModelSpec, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, record: RouteRecord, fused: bool = False, gate_ahead: bool = False):
        """fused: run the norms, the router and (in decode) the QK norm, rotary and KV write as the fused
        kernels of fused_decode.py; the q, k and v projections then share one weight (their three entries in
        `w` become views of it).
        gate_ahead: each MoE layer but the last also applies the next MoE layer's router to its own MoE input
        and records the experts that picks (RouteRecord.keep_ahead): a guess at the next layer's route, known
        one layer early. It never changes what runs."""
        if fused and not fused_decode.fused_available(device):
            raise ConfigError(f"fused_ops needs Triton and a CUDA device (device {device})")
        self.fused = fused
        self.spec = spec
        self.dtype, self.device = dtype, device
        self.scale = spec.head_dim ** -0.5
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, max_model_len, dtype, device)
        self.w = {name: checkpoint.tensor(name).to(device=device, dtype=dtype)
                  for name in self._dense_names(checkpoint)}
        self.lm_head = self.w["model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"]
        self.moe_prefix = {l: checkpoint.layouts[l].prefix for l in spec.moe_layers}
        self.moe_ordinal = {l: i for i, l in enumerate(spec.moe_layers)}
        self.experts: ExpertsFn | None = None
        self.record = record  # every router writes its choice here (routing/record.py)
        self.qkv: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = self._fuse_qkv() if fused else {}
        self.ahead_gate: dict[int, torch.Tensor] = self._ahead_gates() if gate_ahead else {}
        record.ahead_on = gate_ahead

    def _ahead_gates(self) -> dict[int, torch.Tensor]:
        """Per MoE ordinal li >= 1, layer li's router weight [E, H] with its RMSNorm weight swapped in for the one
        of layer li - 1: applied to layer li - 1's MoE input (normalised h times that layer's norm weight) it
        gives the router's view of h normalised under layer li's own weight (where the previous weight is 0,
        the column is 0)."""
        out = {}
        layers = self.spec.moe_layers
        for li in range(1, len(layers)):
            prev = self.w[f"model.layers.{layers[li - 1]}.post_attention_layernorm.weight"].float()
            cur = self.w[f"model.layers.{layers[li]}.post_attention_layernorm.weight"].float()
            ratio = torch.where(prev != 0, cur / torch.where(prev != 0, prev, 1.0), 0.0)
            gate = self.w[f"{self.moe_prefix[layers[li]]}.gate.weight"].float()
            out[li] = (gate * ratio).to(self.dtype)
        return out

    def _fuse_qkv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer, (the q, k and v projection weights stacked [(N + 2G) * D, H], their biases or None); the
        separate entries of `w` become views of the stack, so no weight is held twice."""
        out = {}
        for layer in range(self.spec.num_layers):
            p = f"model.layers.{layer}.self_attn"
            stacked = {}
            for kind in ("weight", "bias") if self.spec.qkv_bias else ("weight",):
                names = [f"{p}.{x}_proj.{kind}" for x in "qkv"]
                stacked[kind] = torch.cat([self.w[n] for n in names])
                at = 0
                for n in names:
                    rows = self.w[n].shape[0]
                    self.w[n] = stacked[kind][at : at + rows]
                    at += rows
            out[layer] = (stacked["weight"], stacked.get("bias"))
        return out

    @staticmethod
    def _dense_names(checkpoint: Checkpoint) -> list[str]:
        s = checkpoint.spec
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not s.tie_word_embeddings:
            names.append("lm_head.weight")
        for layer in range(s.num_layers):
            names.extend(checkpoint.dense_layer_shapes(layer))
        return names

    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    # -- forward -----------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Hidden states after the final norm, [T, H]."""
        h = self.embed(batch.input_ids)
        done = 0
        for m in self.spec.moe_layers:
            h = self.dense_layers(done, m, h, batch, kv)
            h, r, routing = self.attention_and_route(m, h, batch, kv)
            h = self.add_moe_output(m, h, r, self.experts(m, r, routing.ids, routing.weights))
            done = m + 1
        return self.final_norm(self.dense_layers(done, self.spec.num_layers, h, batch, kv))

    # The pieces forward is made of. Decode steps that must stop at every router (to learn
    # which experts to load) replay them as separate CUDA graphs; see engine/cuda_graphs.py.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.w["model.embed_tokens.weight"])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h, "model.norm.weight")

    def _norm(self, h: torch.Tensor, name: str) -> torch.Tensor:
        if self.fused:
            return fused_decode.rms_norm(h, self.w[name], self.spec.rms_norm_eps)[1]
        return rms_norm(h, self.w[name], self.spec.rms_norm_eps)

    def dense_layers(self, start: int, stop: int, h: torch.Tensor, batch: ForwardBatch,
                     kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Decoder layers start..stop-1, none of them MoE."""
        for layer in range(start, stop):
            h, r = self._attention_block(layer, h, batch, kv)
            h = h + self._dense(layer, r)
        return h

    def attention_and_route(self, layer: int, h: torch.Tensor, batch: ForwardBatch,
                            kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """MoE layer `layer` up to its router: (residual stream, the MoE block's input, the routing)."""
        h, r = self._attention_block(layer, h, batch, kv)
        li, T, record = self.moe_ordinal[layer], r.shape[0], self.record
        logits = F.linear(r, self.w[f"{self.moe_prefix[layer]}.gate.weight"])
        record.keep_logits(li, logits)
        if self.fused:
            ids, weights = fused_decode.route_into(logits, self.spec.router, record.router_out(li, T))
            routing = Routing(ids, weights, logits)
        else:
            routing = route(logits, self.spec.router, out=record.router_out(li, T))
        if li + 1 in self.ahead_gate:
            record.keep_ahead(li + 1, F.linear(r, self.ahead_gate[li + 1]))
        if batch.selector is not None:
            table = batch.slot_table[li] if batch.slot_table is not None else None
            chosen = batch.selector.select(layer, routing, SelectionContext(
                batch.is_prefill, record.real[:T], record.exact[:T], table, record.selected_out(li, T),
                record.scratch[li]))
            routing = Routing(*record.write_selected(li, chosen.ids, chosen.weights), logits)
        return h, r, routing

    def add_moe_output(self, layer: int, h: torch.Tensor, r: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Residual + routed experts' output (+ the gated shared expert where the family has one)."""
        if self.spec.shared_expert_width:
            p = self.moe_prefix[layer]
            shared = dense_mlp(r, self.w[f"{p}.shared_expert.gate_proj.weight"], self.w[f"{p}.shared_expert.up_proj.weight"],
                               self.w[f"{p}.shared_expert.down_proj.weight"])
            routed = routed + torch.sigmoid(F.linear(r, self.w[f"{p}.shared_expert_gate.weight"])) * shared
        return h + routed

    def _attention_block(self, layer: int, h: torch.Tensor, batch: ForwardBatch,
                         kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"model.layers.{layer}"
        attended = self._attention(layer, self._norm(h, f"{p}.input_layernorm.weight"), batch, kv)
        if self.fused:  # the residual add and the norm in one kernel
            return fused_decode.rms_norm(h, self.w[f"{p}.post_attention_layernorm.weight"], self.spec.rms_norm_eps,
                                         attended)
        h = h + attended
        return h, rms_norm(h, self.w[f"{p}.post_attention_layernorm.weight"], self.spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def _linear(self, x: torch.Tensor, name: str, bias: bool) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"] if bias else None)

    def _attention(self, layer: int, x: torch.Tensor, batch: ForwardBatch,
                   kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s, p = self.spec, f"model.layers.{layer}.self_attn"
        T = x.shape[0]
        if self.fused and not batch.is_prefill:
            return self._fused_decode_attention(layer, x, batch, kv)
        q = self._linear(x, f"{p}.q_proj", s.qkv_bias)
        k = self._linear(x, f"{p}.k_proj", s.qkv_bias)
        v = self._linear(x, f"{p}.v_proj", s.qkv_bias)
        if s.qk_norm == "full":
            q = rms_norm(q, self.w[f"{p}.q_norm.weight"], s.rms_norm_eps)
            k = rms_norm(k, self.w[f"{p}.k_norm.weight"], s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.view(T, s.num_heads, s.head_dim)
        k = k.view(T, s.num_kv_heads, s.head_dim)
        v = v.view(T, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "per_head":
            q = rms_norm(q, self.w[f"{p}.q_norm.weight"], s.rms_norm_eps)
            k = rms_norm(k, self.w[f"{p}.k_norm.weight"], s.rms_norm_eps)
        q = self.rotary.apply(q, batch.positions)
        k = self.rotary.apply(k, batch.positions)
        k_cache, v_cache = kv[0][layer], kv[1][layer]  # [rows, G, max_len, D]
        window = s.sliding_window[layer]
        if batch.is_prefill:
            outs, offset = [], 0
            with sdpa_kernel(PREFILL_SDPA_BACKENDS):
                for row, start, n in zip(batch.kv_rows, batch.starts, batch.lengths):
                    k_cache[row, :, start : start + n] = k[offset : offset + n].transpose(0, 1)
                    v_cache[row, :, start : start + n] = v[offset : offset + n].transpose(0, 1)
                    outs.append(attend_prefill(q[offset : offset + n], k_cache[row, :, : start + n],
                                               v_cache[row, :, : start + n], start, self.scale, window))
                    offset += n
            o = torch.cat(outs) if len(outs) > 1 else outs[0]
        else:
            rows, pos = batch.kv_rows_t, batch.positions
            k_cache[rows, :, pos] = k
            v_cache[rows, :, pos] = v
            if self.device.type == "cuda":  # reads each sequence's length on the device: one graph per batch size
                o = decode_attention(q, k_cache, v_cache, rows, batch.context_lens_t, self.scale, window)
            else:
                C = batch.max_context
                o = attend_decode(q, k_cache[rows, :, :C], v_cache[rows, :, :C], batch.context_lens_t, self.scale,
                                  window)
        return self._linear(o, f"{p}.o_proj", s.o_bias)

    def _fused_decode_attention(self, layer: int, x: torch.Tensor, batch: ForwardBatch,
                                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """_attention's decode branch with one projection for q, k and v and one kernel from there to the
        cache (fused_decode.qk_rope_store)."""
        s, p = self.spec, f"model.layers.{layer}.self_attn"
        weight, bias = self.qkv[layer]
        k_cache, v_cache = kv[0][layer], kv[1][layer]
        norms = (self.w[f"{p}.q_norm.weight"], self.w[f"{p}.k_norm.weight"]) if s.qk_norm != "none" else (None, None)
        q = fused_decode.qk_rope_store(F.linear(x, weight, bias), s, batch.positions, batch.kv_rows_t, self.rotary,
                                       *norms, k_cache, v_cache)
        o = decode_attention(q, k_cache, v_cache, batch.kv_rows_t, batch.context_lens_t, self.scale,
                             s.sliding_window[layer])
        return self._linear(o, f"{p}.o_proj", s.o_bias)

    def _dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp"
        return dense_mlp(x, self.w[f"{p}.gate_proj.weight"], self.w[f"{p}.up_proj.weight"], self.w[f"{p}.down_proj.weight"])
