"""The routing-path predictor's network and its files (PRED_DIR), apart from running it (learned.py).

RouteNet: [W_cur cur | W_prev prev | W_last last | W_hist hist (| W_lens lens)] -> GELU MLP -> 2 x L*E logits (this
token's experts; those of any of the next `horizon` tokens), and the layer-to-layer transitions T_l of the
refinement.

The router lens (`lens_width` > 0): every MoE layer's own router applied to the current token's normalised
embedding, lens = cur @ A with A [H, L*E] = [gamma_l * W_l^T] (W_l the layer's router, gamma_l the RMSNorm weight
before it): what each router would say of the token alone. It is a function of the model's weights, not of the
traces, so it says something of tokens the traces never held; A is read from the model the predictor is bound to
(`attach_lens`), never saved with it. On moeflow-tiny, with the token's embedding projected to 8 of its 160
dimensions (5%, as the bench model's 96 of 2048 are), the lens gave back the recall that squeeze cost: 0.784 ->
0.798 on validation sequences, 0.668 -> 0.681 on held-out python_docs, against 0.799 / 0.683 unsqueezed; with the
embedding unsqueezed it changed nothing (docs/benchmarks/2026-12-06-cpu-session9).

PRED_DIR holds predictor.safetensors (float16 weights) and config.json (the widths, the model it was trained
for and that model's fingerprint); a predictor refuses to load for any other model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.errors import ConfigError

WEIGHTS_NAME, CONFIG_NAME = "predictor.safetensors", "config.json"
FORMAT = "moeflow-route-predictor/1"


@dataclass(frozen=True)
class NetConfig:
    num_layers: int
    num_experts: int
    top_k: int
    model_hidden: int
    cur_width: int = 96
    prev_width: int = 32
    last_width: int = 64
    hist_width: int = 64
    hidden: int = 256
    hist_decay: float = 0.9
    horizon: int = 1  # the second head: an expert's use in any of the next `horizon` tokens
    lens_width: int = 0  # the router lens's projection (0: none; the module docstring)

    def num_params(self) -> int:
        LE, H = self.num_layers * self.num_experts, self.model_hidden
        d_in = self.cur_width + self.prev_width + self.last_width + self.hist_width + self.lens_width
        return (H * (self.cur_width + self.prev_width) + (LE + 1) * self.last_width + LE * self.hist_width
                + (LE + 1) * self.lens_width
                + (d_in + 1) * self.hidden + (self.hidden + 1) * self.hidden + (self.hidden + 1) * 2 * LE
                + (self.num_layers - 1) * self.num_experts ** 2)


class RouteNet(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        L, E, H = cfg.num_layers, cfg.num_experts, cfg.model_hidden
        self.cur = nn.Linear(H, cfg.cur_width, bias=False)
        self.prev = nn.Linear(H, cfg.prev_width, bias=False)
        self.last = nn.Linear(L * E, cfg.last_width)
        self.hist = nn.Linear(L * E, cfg.hist_width, bias=False)
        if cfg.lens_width:
            self.lens = nn.Linear(L * E, cfg.lens_width)
            self.register_buffer("lens_basis", torch.zeros(H, L * E), persistent=False)  # A, from the model
        self._lens_attached = False
        d_in = cfg.cur_width + cfg.prev_width + cfg.last_width + cfg.hist_width + cfg.lens_width
        self.body = nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.head = nn.Linear(cfg.hidden, 2 * L * E)  # this token's routes, and the next token's
        self.transition = nn.Parameter(torch.zeros(L - 1, E, E))  # T_l for layers 1..L-1, from layer l-1's route

    def forward(self, cur: torch.Tensor, prev: torch.Tensor, last: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """cur, prev [B, H] normalised embeddings; last, hist [B, L*E]. Returns logits [B, 2, L, E]: [:, 0] for the
        token about to be routed, [:, 1] for any of the `horizon` tokens after it (whatever they turn out to be)."""
        parts = [self.cur(cur), self.prev(prev), self.last(last), self.hist(hist)]
        if self.cfg.lens_width:
            if not self._lens_attached:
                raise RuntimeError("this predictor reads its model's routers (lens_width > 0): attach_lens(checkpoint) "
                                   "first")
            parts.append(self.lens(cur @ self.lens_basis))
        return self.head(self.body(torch.cat(parts, dim=-1))).view(-1, 2, self.cfg.num_layers, self.cfg.num_experts)

    def attach_lens(self, checkpoint) -> RouteNet:
        """Read the router lens's A from the model `checkpoint` holds (nothing to read when lens_width is 0)."""
        if self.cfg.lens_width:
            cols = [checkpoint.tensor(f"model.layers.{layer}.post_attention_layernorm.weight").float()[:, None]
                    * checkpoint.tensor(router_weight_name(checkpoint, layer)).float().T
                    for layer in checkpoint.spec.moe_layers]
            self.lens_basis.copy_(torch.cat(cols, dim=1).to(self.lens_basis.device))
            self._lens_attached = True
        return self

    def refined(self, logits: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """Every layer's logits once the layer before has routed: routes [B, L, E] multi-hot (teacher-forced)."""
        step = torch.einsum("ble,lef->blf", routes[:, :-1], self.transition)
        return torch.cat([logits[:, :1], logits[:, 1:] + step], dim=1)


def normalized_embedding(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the model's token embedding, RMS-normalised (as a router's input is); id -1 gives zeros."""
    rows = F.embedding(ids.clamp(min=0), weight).float()
    rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
    return rows * (ids >= 0).unsqueeze(-1)


# -- the model a predictor belongs to ----------------------------------------------------------------


def router_weight_name(checkpoint, layer: int) -> str:
    return f"{checkpoint.layouts[layer].prefix}.gate.weight"


def model_fingerprint(checkpoint) -> str:
    """A hash of what makes a model route the way it does: its architecture and sizes, every router's weights,
    and a few rows of its token embedding (which the predictor reads)."""
    s = checkpoint.spec
    h = hashlib.sha256()
    h.update(json.dumps([s.architecture, s.vocab_size, s.hidden_size, s.num_layers, list(s.moe_layers),
                         s.num_experts, s.router.top_k]).encode())
    for layer in s.moe_layers:
        h.update(checkpoint.tensor(router_weight_name(checkpoint, layer)).float().numpy().tobytes())
    emb = checkpoint.tensor("model.embed_tokens.weight")
    for row in (0, s.vocab_size // 2, s.vocab_size - 1):
        h.update(emb[row].float().numpy().tobytes())
    return h.hexdigest()[:16]


def model_bytes(checkpoint) -> int:
    """Bytes of the model's weights as stored (dense and routed experts)."""
    s = checkpoint.spec
    size = torch.empty((), dtype=checkpoint.tensor_dtype).element_size()
    return (checkpoint.dense_numel() + s.num_moe_layers * s.num_experts * s.expert_numel()) * size


def describe_model(checkpoint) -> dict:
    s = checkpoint.spec
    model = getattr(checkpoint, "dir", None)
    return {"model": Path(model).name if model is not None else "synthetic", "architecture": s.architecture,
            "num_moe_layers": s.num_moe_layers, "num_experts": s.num_experts, "top_k": s.router.top_k,
            "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "fingerprint": model_fingerprint(checkpoint)}


# -- PRED_DIR ------------------------------------------------------------------------------------------


@dataclass
class PredictorFiles:
    """What PRED_DIR holds: the network and the JSON config beside it."""

    net: RouteNet
    model: dict  # describe_model() of the model it was trained for
    metrics: dict = field(default_factory=dict)  # validation recall per layer etc., from training
    training: dict = field(default_factory=dict)  # traces, options, date

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
        config = {"format": FORMAT, "net": asdict(self.net.cfg), "model": self.model, "metrics": self.metrics,
                  "training": self.training}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> PredictorFiles:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{path} is not a predictor directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                              "(written by `moeflow predictor train`)")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise ConfigError(f"{path / CONFIG_NAME} has format {config.get('format')!r}; this moeflow reads {FORMAT}")
        net = RouteNet(NetConfig(**config["net"]))
        net.load_state_dict({k: v.float() for k, v in load_file(str(path / WEIGHTS_NAME)).items()})
        return cls(net.eval(), config["model"], config.get("metrics", {}), config.get("training", {}))


def find_predictor(model_dir: str | Path) -> Path | None:
    """The predictor that belongs with a model directory: `predictor/` inside it, else `<model_dir>-predictor` or
    `<model_dir>.predictor` beside it; None if there is none."""
    model_dir = Path(model_dir)
    for cand in (model_dir / "predictor", model_dir.with_name(model_dir.name + "-predictor"),
                 model_dir.with_name(model_dir.name + ".predictor")):
        if (cand / CONFIG_NAME).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    return None


def check_model(files: PredictorFiles, checkpoint, path: str | Path) -> None:
    """Refuse a predictor trained for another model, saying which."""
    ours, theirs = describe_model(checkpoint), files.model
    shape = ("architecture", "num_moe_layers", "num_experts", "top_k", "vocab_size", "hidden_size")

    def text(d: dict) -> str:
        return (f"{d.get('model')!r} ({d.get('architecture')}, {d.get('num_moe_layers')} MoE layers x "
                f"{d.get('num_experts')} experts, top-{d.get('top_k')}, fingerprint {d.get('fingerprint')})")

    if any(ours[k] != theirs.get(k) for k in shape) or ours["fingerprint"] != theirs.get("fingerprint"):
        raise ConfigError(f"the predictor in {path} was trained for model {text(theirs)}, not for this model "
                          f"{text(ours)}; train one for it with `moeflow predictor train MODEL_DIR --traces ...`")
