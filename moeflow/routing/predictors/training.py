"""Training the routing-path predictor (learned.py) from `moeflow trace` files.

Shapes: N trace tokens, L MoE layers, E experts per layer, K top-k, H the model's hidden size.

Each trace row is one token of a document, routed with the document before it as context (teacher forcing), so
its features are what a decode step would know before routing that token: the token, the one before, the
previous token's routes and the sequence's route history (learned.py). The label is the token's own multi-hot
top-k at every layer, and for the second head the experts any of the next `horizon` tokens uses (1: the next
token's). Loss: binary cross-entropy on the plain logits,
on the refined ones (each layer given the layer before's real route) and on the next token's, so one network
serves `predict`, `refine` and the cache's look one step on.

The data sit on the training device whole (token ids, routes as int16, history as float16) and batches are
gathered there, so a GPU trains the bench model's predictor (12 x 64, top-8) on a few hundred thousand tokens in
well under a minute; the tiny model's trains on two CPU cores in a few minutes.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeflow.errors import ConfigError
from moeflow.routing.predictors.net import (NetConfig, PredictorFiles, RouteNet, describe_model, model_bytes,
                                            normalized_embedding)
from moeflow.routing.predictors.route_data import RouteData
from moeflow.routing.traces import Trace

MAX_SHARE = 0.02  # a predictor's bytes (float16 weights) may be at most this share of the model's
# the default width's cap. On the bench model (4M trace tokens, python_docs held out) width 1024 scored 0.713
# held-out recall after 8 of 16 epochs and 0.723 after 16, where width 512 had scored 0.691 after 8 (on another
# training of the same model; docs/benchmarks/2026-12-06-h100-session16); its forward is one CUDA graph either way
MAX_WIDTH = 1024


@dataclass
class TrainOptions:
    epochs: int = 6
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.01
    hidden: int | None = None  # None: the widest (multiple of 16, at most MAX_WIDTH) within MAX_SHARE of the model
    hist_decay: float = 0.9
    horizon: int = 2  # tokens ahead the second head looks: an expert used by any of them is a positive
    lens_width: int = 0  # the router lens (net.py): 0 none, else the width of its projection
    cur_width: int = 96  # the projection of the token's embedding (its share of the model's width: 60% of
    # moeflow-tiny's 160, 5% of the bench model's 2048)
    val_fraction: float = 0.05  # of the sequences, held out to report validation recall while training
    holdout_domain: str | None = None  # train on every other domain
    max_minutes: float | None = None  # stop early past this
    seed: int = 0


def size_net(spec, budget_bytes: int, hidden: int | None, hist_decay: float, horizon: int = 1,
             lens_width: int = 0, cur_width: int = 96) -> NetConfig:
    """The widest network whose float16 weights fit `budget_bytes` (or the width asked for, if it fits)."""
    base = dict(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.router.top_k,
                model_hidden=spec.hidden_size, hist_decay=hist_decay, horizon=horizon, lens_width=lens_width,
                cur_width=cur_width)
    widths = [hidden] if hidden is not None else list(range(MAX_WIDTH, 15, -16))
    for w in widths:
        cfg = NetConfig(**base, hidden=w)
        if 2 * cfg.num_params() <= budget_bytes:
            return cfg
    cfg = NetConfig(**base, hidden=widths[-1])
    raise ConfigError(f"a predictor of hidden width {widths[-1]} needs {2 * cfg.num_params():,} bytes, over the "
                      f"{budget_bytes:,} bytes ({MAX_SHARE:.0%} of the model) it may have")


class _DeviceData:
    """One RouteData on the training device: features gathered per batch."""

    def __init__(self, data: RouteData, embedding: torch.Tensor, decay: float, device: torch.device,
                 horizon: int = 1):
        self.device = device
        self.horizon = horizon
        self.E = data.num_experts
        self.tok = torch.from_numpy(data.token_ids).to(device)
        self.prev = torch.from_numpy(data.prev_ids).to(device)
        self.routes = torch.from_numpy(data.routes).to(device)
        self.starts = torch.from_numpy(data.starts).to(device)
        self.seq = torch.from_numpy(data.seq_ids).to(device)
        self.hist = torch.from_numpy(data.history(decay)).to(device)
        self.embedding = embedding

    def __len__(self) -> int:
        return len(self.tok)

    def multi_hot(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.routes[rows].long()
        out = torch.zeros(*ids.shape[:-1], self.E, device=self.device)
        return out.scatter_(-1, ids, 1.0)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(cur, prev, last, hist, target, next target, next mask) for `rows`; targets [n, L, E], the next one the
        experts any of the next `horizon` tokens of the same sequence uses (masked out at a sequence's last token)."""
        last = self.multi_hot((rows - 1).clamp(min=0)) * (~self.starts[rows]).float()[:, None, None]
        def ahead(h: int) -> tuple[torch.Tensor, torch.Tensor]:  # routes h tokens on, and whether they exist
            after = (rows + h).clamp(max=len(self.tok) - 1)
            same = ((rows + h < len(self.tok)) & (self.seq[after] == self.seq[rows])).float()
            return self.multi_hot(after) * same[:, None, None], same

        y_next, has_next = ahead(1)
        for h in range(2, self.horizon + 1):
            y_next = torch.maximum(y_next, ahead(h)[0])
        emb = self.embedding
        return (normalized_embedding(emb, self.tok[rows]), normalized_embedding(emb, self.prev[rows]),
                last.flatten(1), self.hist[rows].float(), self.multi_hot(rows), y_next, has_next)


def _loss(net: RouteNet, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE of this token's plain and refined logits and of the next token's; returns (loss, z, refined z)."""
    cur, prev, last, hist, y, y_next, has_next = batch
    both = net(cur, prev, last, hist)
    z, z_next = both[:, 0], both[:, 1]
    zr = net.refined(z, y)
    nxt = F.binary_cross_entropy_with_logits(z_next, y_next, reduction="none").mean((1, 2))
    loss = (F.binary_cross_entropy_with_logits(z, y) + F.binary_cross_entropy_with_logits(zr, y)
            + (nxt * has_next).sum() / has_next.sum().clamp(min=1.0))
    return loss, z, zr


def _recall(z: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[L] mean |top-k(z) & y| / k per layer."""
    return y.gather(-1, z.topk(k, dim=-1).indices).sum(-1).mean(0) / k


@torch.no_grad()
def validate(net: RouteNet, data: _DeviceData, k: int, batch_size: int = 8192) -> dict:
    net.eval()
    loss, rec, ref, n = 0.0, 0.0, 0.0, 0
    for a in range(0, len(data), batch_size):
        rows = torch.arange(a, min(a + batch_size, len(data)), device=data.device)
        b = data.batch(rows)
        l, z, zr = _loss(net, b)
        loss += l.item() * len(rows)
        rec = rec + _recall(z, b[4], k) * len(rows)
        ref = ref + _recall(zr, b[4], k) * len(rows)
        n += len(rows)
    net.train()
    per_layer = (rec / n).tolist()
    return {"loss": loss / n, "recall": float(np.mean(per_layer)), "recall_refined": float((ref / n).mean()),
            "recall_per_layer": per_layer}


def split_sequences(data: RouteData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), whole sequences to each side."""
    slices = data.sequence_slices()
    rng = np.random.default_rng(seed)
    val = rng.random(len(slices)) < fraction
    if fraction > 0 and not val.any() and len(slices) > 1:
        val[-1] = True
    rows = [np.arange(s.start, s.stop) for s in slices]
    pick = lambda keep: np.concatenate([r for r, v in zip(rows, keep) if v] or [np.zeros(0, np.int64)])
    return pick(~val), pick(val)


def train(checkpoint, traces: Sequence[Trace], options: TrainOptions, device: str | torch.device = "cpu",
          progress: bool = True) -> tuple[PredictorFiles, dict]:
    """Train a predictor for the model `checkpoint` holds from its traces. Returns the predictor and the log."""
    from tqdm import tqdm

    if options.horizon < 1:
        raise ConfigError(f"the predictor's horizon must be at least 1 token, got {options.horizon}")
    if isinstance(options.lens_width, bool) or not isinstance(options.lens_width, int) or options.lens_width < 0:
        raise ConfigError(f"the router lens's width must be an integer >= 0 (0: none), got {options.lens_width!r}")
    if isinstance(options.cur_width, bool) or not isinstance(options.cur_width, int) or options.cur_width < 1:
        raise ConfigError(f"the token embedding's projection must be an integer >= 1 wide, got {options.cur_width!r}")
    device = torch.device(device)
    spec = checkpoint.spec
    torch.manual_seed(options.seed)
    data = RouteData.from_traces(traces)
    if (data.num_layers, data.num_experts, data.top_k) != (spec.num_moe_layers, spec.num_experts, spec.router.top_k):
        raise ConfigError(f"the traces route {data.num_layers} layers x {data.num_experts} experts, top-"
                          f"{data.top_k}, but the model has {spec.num_moe_layers} x {spec.num_experts}, top-"
                          f"{spec.router.top_k}: they were recorded from another model")
    heldout = None
    if options.holdout_domain is not None:
        if options.holdout_domain not in data.domain_names:
            raise ConfigError(f"--holdout-domain {options.holdout_domain!r} is not in the traces' domains: "
                              f"{', '.join(data.domain_names)}")
        d = data.domain_names.index(options.holdout_domain)
        heldout = data.select(np.flatnonzero(data.domains == d))
        data = data.select(np.flatnonzero(data.domains != d))
    train_rows, val_rows = split_sequences(data, options.val_fraction, options.seed)
    if len(train_rows) == 0:
        raise ConfigError("no training tokens left after holding out validation sequences and domains")
    budget = int(MAX_SHARE * model_bytes(checkpoint))
    cfg = size_net(spec, budget, options.hidden, options.hist_decay, options.horizon, options.lens_width,
                   options.cur_width)
    net = RouteNet(cfg).to(device).attach_lens(checkpoint)
    embedding = checkpoint.tensor("model.embed_tokens.weight").to(device)
    def dev_data(d: RouteData) -> _DeviceData:
        return _DeviceData(d, embedding, cfg.hist_decay, device, cfg.horizon)

    train_d = dev_data(data.select(train_rows))
    val_d = dev_data(data.select(val_rows)) if len(val_rows) else None
    held_d = dev_data(heldout) if heldout is not None else None

    steps_per_epoch = max(1, len(train_d) // options.batch_size)
    total = steps_per_epoch * options.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    log: dict = {"steps": [], "epochs": [], "net": asdict(cfg), "options": asdict(options),
                 "train_tokens": len(train_d), "val_tokens": len(val_rows), "device": str(device)}
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(options.seed)
    bar = tqdm(total=total, desc="training predictor", unit="step", disable=not progress)
    step, smooth, stopped = 0, None, False
    for epoch in range(options.epochs):
        perm = torch.randperm(len(train_d), device=device, generator=gen)
        for i in range(steps_per_epoch):
            rows = perm[i * options.batch_size : (i + 1) * options.batch_size]
            loss, _, _ = _loss(net, train_d.batch(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == total:
                value = loss.item()
                smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
                log["steps"].append({"step": step, "loss": value, "lr": sched.get_last_lr()[0]})
                bar.set_postfix(loss=f"{smooth:.4f}")
            bar.update(1)
            if options.max_minutes is not None and time.perf_counter() - t0 > 60 * options.max_minutes:
                stopped = True
                break
        entry = {"epoch": epoch + 1, "step": step, "elapsed_s": time.perf_counter() - t0}
        if val_d is not None:
            entry["val"] = validate(net, val_d, cfg.top_k)
        if held_d is not None:
            entry["heldout"] = validate(net, held_d, cfg.top_k)
        log["epochs"].append(entry)
        if stopped:
            break
    bar.close()
    log["train_s"] = time.perf_counter() - t0
    log["stopped_early"] = stopped
    last = log["epochs"][-1]
    metrics = dict(last.get("val", {}))
    if "heldout" in last:
        metrics["heldout"] = last["heldout"]
    files = PredictorFiles(net.cpu().eval(), describe_model(checkpoint), metrics, {
        "date": datetime.date.today().isoformat(), "tokens": data.num_tokens, "domains": data.domain_names,
        "holdout_domain": options.holdout_domain, "options": asdict(options), "params": cfg.num_params(),
        "bytes_budget": budget, "train_s": log["train_s"], "device": str(device),
        "traces": [t.meta.get("data") for t in traces]})
    return files, log


def plot_loss(log: dict, path: str | Path) -> Path | None:
    """loss_curve.png: training loss by step, validation loss by epoch; None (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'moeflow[train]'): no loss curve written")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = log["steps"]
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1, label="train (BCE, plain + refined)")
    val = [e for e in log["epochs"] if "val" in e]
    if val:
        ax.plot([e["step"] for e in val], [e["val"]["loss"] for e in val], "o-", label="validation")
    held = [e for e in log["epochs"] if "heldout" in e]
    if held:
        ax.plot([e["step"] for e in held], [e["heldout"]["loss"] for e in held], "s--", label="held-out domain")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("routing predictor training")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
