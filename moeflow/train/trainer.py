"""Trains a preset's transformers `Qwen3MoeForCausalLM` on the corpus and saves a Hugging Face checkpoint.

The loss is transformers' next-token cross-entropy (`model.loss_function`) plus `router_aux_loss_coef` times
transformers' Switch load-balancing loss (`load_balancing_loss_func`) applied per layer and averaged (see
`balance_loss`), from the router logits of a forward pass with `output_router_logits=True`. AdamW with linear
warmup and a cosine decay to `min_lr_ratio`, gradients clipped to `grad_clip`. float32 parameters on CPU; on
CUDA a bf16 autocast, and for presets with bf16 parameters (`bench`) an AdamW that keeps fp32 master weights.

Reproducibility. The seed fixes the initial weights (torch RNG of the training device) and the whole data order
(one numpy Generator). On CPU, two runs with the same seed, device and thread count are bitwise identical (losses
and saved tensors; tests check it). Across thread counts or CPU models results differ in the last bits (BLAS
reduction order). On CUDA runs are close but not bitwise identical: the embedding and attention backward
kernels accumulate with atomics. A run bounded by `--max-minutes` without `--steps`
sizes its cosine schedule from the measured step time; the log records the step count it chose, and repeating
the run with `--steps N` repeats the schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.data.corpus import read_split
from moeflow.errors import ConfigError
from moeflow.train import data as train_data
from moeflow.train.presets import Preset, build_config, checkpoint_bytes, padded_vocab_size

LOG_NAME = "training_log.json"
CALIBRATION_STEPS = 4  # steps timed before a time-bounded run fixes its step count


@dataclass(frozen=True, slots=True)
class TrainJob:
    preset: Preset
    data_dir: Path
    tokenizer_dir: Path
    out_dir: Path
    device: str = "cpu"
    seed: int = 0
    steps: int | None = None  # None: preset.steps, or as many as --max-minutes allows
    max_minutes: float | None = None  # hard bound on the whole job, start-up and save included
    threads: int | None = None
    progress: bool = True
    command: str = ""


def resolve_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {name!r}")
    return name


def lr_at(step: int, total: int, preset: Preset) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to min_lr_ratio."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    span = max(1, total - preset.warmup_steps)
    progress = min(1.0, (step - preset.warmup_steps) / span)
    floor = preset.lr * preset.min_lr_ratio
    return floor + (preset.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(preset: Preset, vocab_size: int, sep_id: int, pad_id: int | None, device: str):
    """A freshly initialised model, created directly on `device` in the preset's parameter dtype."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    config = build_config(preset, vocab_size, bos_token_id=sep_id, eos_token_id=sep_id, pad_token_id=pad_id)
    # Created under the device context so a 3.8 B-parameter model is never materialised in host memory.
    with torch.device(device):
        model = Qwen3MoeForCausalLM._from_config(
            config, dtype=getattr(torch, preset.param_dtype),
            attn_implementation="sdpa", experts_implementation="grouped_mm",
        )
    return model


class MasterWeightAdamW:
    """AdamW for bf16 parameters: fp32 master weights, moments in `state_dtype`, bf16 parameters refreshed from
    the masters after each step. Memory per parameter: 4 (master) + 2 * size(state_dtype) bytes, beside the bf16
    parameter and gradient. Exposes `param_groups` with an "lr" key like torch optimizers."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, state_dtype):
        import torch

        self.param_groups = [dict(g, lr=lr) for g in groups]
        self.betas, self.eps, self.steps = betas, eps, 0
        self.state = {}
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p] = (p.detach().float(), torch.zeros_like(p, dtype=state_dtype),
                                 torch.zeros_like(p, dtype=state_dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def step(self) -> None:
        import torch

        b1, b2 = self.betas
        self.steps += 1
        bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        with torch.no_grad():
            for g in self.param_groups:
                lr, wd = g["lr"], g["weight_decay"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    master, m, v = self.state[p]
                    grad = p.grad.float()
                    m32 = m.float().lerp_(grad, 1 - b1)
                    v32 = v.float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    m.copy_(m32)
                    v.copy_(v32)
                    denom = v32.div_(bc2).sqrt_().add_(self.eps)
                    master.mul_(1 - lr * wd).addcdiv_(m32, denom, value=-lr / bc1)
                    p.copy_(master)


def build_optimizer(model, preset: Preset):
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (preset.beta1, preset.beta2)
    if preset.param_dtype == "float32":
        return torch.optim.AdamW(groups, lr=preset.lr, betas=betas, eps=1e-8, foreach=True)
    return MasterWeightAdamW(groups, lr=preset.lr, betas=betas, eps=1e-8,
                             state_dtype=getattr(torch, preset.state_dtype))


def balance_loss(router_logits, num_experts: int, top_k: int):
    """transformers' Switch load-balancing loss applied to each layer alone, averaged over layers (K when the
    load is balanced). Called on the tuple of all layers, as Qwen3MoeForCausalLM does when given labels, it pools
    the layers' counts, so one layer's favourite expert can offset another's; per layer, each layer is
    balanced, as in the Switch Transformer and in Qwen3's own training."""
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((r,), num_experts, top_k) for r in router_logits]).mean()


def validation_loss(model, windows: dict[str, np.ndarray], device: str, batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy (no auxiliary loss) per domain, and over all windows as "all"."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), _autocast(device):
        for domain, w in windows.items():
            for start in range(0, len(w), batch_size):
                ids = torch.from_numpy(w[start:start + batch_size]).long().to(device)
                logits = model(input_ids=ids).logits.float()
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                      reduction="sum")
                totals[domain] = totals.get(domain, 0.0) + nll.item()
                counts[domain] = counts.get(domain, 0) + ids[:, 1:].numel()
    model.train(was_training)
    out = {d: totals[d] / counts[d] for d in totals}
    out["all"] = sum(totals.values()) / max(1, sum(counts.values()))
    return out


def _autocast(device: str):
    import torch

    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def save_reserve_s(preset: Preset, vocab_size: int) -> float:
    """Seconds kept free at the end of a time-bounded run for the save: enough for a disk of 150 MB/s."""
    return 5.0 + checkpoint_bytes(preset, vocab_size) / 150e6


class Budget:
    """Time for a `--max-minutes` run: when to stop so the final validation and the save still fit, and (without
    `--steps`) how many steps the cosine schedule should plan, from the step time measured over the first steps."""

    def __init__(self, deadline: float | None, resolve_steps: bool, calibration_steps: int):
        self.deadline, self.resolve_steps, self.calibration_steps = deadline, resolve_steps, calibration_steps
        self._t1: float | None = None

    def plan(self, step: int, now: float, step_s: float, eval_s: float, eval_every: int, total: int) -> int:
        """Called after each step; returns the (possibly re-planned) total."""
        if step == 1:
            self._t1 = now
        if not self.resolve_steps or step != self.calibration_steps:
            return total
        if step > 1:
            step_s = (now - self._t1) / (step - 1)  # steps 2.. leave out the first step's warm-up
        left = self.deadline - now - eval_s  # keep the final validation
        return max(step, step + int(left / (step_s + eval_s / eval_every)))

    def out_of_time(self, now: float, step_s: float, eval_s: float) -> bool:
        return self.deadline is not None and now + step_s + eval_s > self.deadline


def _load_data(job: TrainJob):
    tokenizer, sep_id = train_data.load_tokenizer(job.tokenizer_dir)
    train_streams = train_data.token_streams(tokenizer, read_split(job.data_dir, "train"), sep_id)
    val_streams = train_data.token_streams(tokenizer, read_split(job.data_dir, "validation"), sep_id)
    sampler = train_data.DomainSampler(train_data.pack_streams(train_streams, job.preset.seq_len),
                                       job.preset.domain_alpha, job.seed)
    val_windows = train_data.pack_streams(val_streams, job.preset.seq_len, job.preset.eval_windows_per_domain)
    return tokenizer, sep_id, train_streams, sampler, val_windows


def _train_step(model, optimizer, params, sampler, preset: Preset, lr: float, device: str
                ) -> tuple[float, float, float]:
    """One optimizer step over grad_accum micro-batches; returns (lm loss, balance loss, grad norm)."""
    import torch

    for g in optimizer.param_groups:
        g["lr"] = lr
    lm_sum = aux_sum = 0.0
    for _ in range(preset.grad_accum):
        ids = torch.from_numpy(sampler.next_batch(preset.micro_batch)).long().to(device)
        with _autocast(device):
            out = model(input_ids=ids, output_router_logits=True)
            lm_loss = model.loss_function(out.logits, ids, model.config.vocab_size)
            aux_loss = balance_loss(out.router_logits, preset.num_experts, preset.top_k)
            loss = lm_loss + preset.aux_loss_coef * aux_loss
        (loss / preset.grad_accum).backward()
        lm_sum += lm_loss.item()
        aux_sum += aux_loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, preset.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lm_sum / preset.grad_accum, aux_sum / preset.grad_accum, grad_norm


def train(job: TrainJob, started: float | None = None) -> dict:
    """Runs the job and returns the training log (also written to OUT_DIR/training_log.json)."""
    started = time.monotonic() if started is None else started
    preset, device = job.preset, resolve_device(job.device)
    if device == "cuda":
        # Read when the CUDA allocator starts (first allocation), so setting it here still counts: expert
        # activations whose size changes with every batch's routing fragment the default allocator.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import transformers
    from tqdm import tqdm

    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, sep_id, train_streams, sampler, val_windows = _load_data(job)
    data_s = time.monotonic() - started

    vocab_size = padded_vocab_size(tokenizer.get_vocab_size())
    model = build_model(preset, vocab_size, sep_id, tokenizer.token_to_id(train_data.PAD), device)
    model.train()
    optimizer = build_optimizer(model, preset)
    params = list(model.parameters())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    deadline = None
    if job.max_minutes is not None:
        deadline = started + job.max_minutes * 60 - save_reserve_s(preset, vocab_size)
    budget = Budget(deadline, resolve_steps=job.steps is None and deadline is not None,
                    calibration_steps=min(CALIBRATION_STEPS, max(1, preset.warmup_steps)))
    total = job.steps or preset.steps

    def validate(step: int) -> float:
        t0 = time.monotonic()
        validations.append({"step": step, "tokens": step * preset.tokens_per_step,
                            **validation_loss(model, val_windows, device, preset.micro_batch)})
        return time.monotonic() - t0

    history, validations = [], []
    eval_s = validate(0)
    train_started = time.monotonic()
    stopped_early = False
    bar = tqdm(total=total, disable=not job.progress, desc=f"train {preset.name}", unit="step", file=sys.stderr)
    step = 0
    while step < total:
        t_step = time.monotonic()
        lr = lr_at(step, total, preset)
        lm, aux, grad_norm = _train_step(model, optimizer, params, sampler, preset, lr, device)
        step += 1
        now = time.monotonic()
        history.append({"step": step, "lr": lr, "loss": lm + preset.aux_loss_coef * aux, "lm_loss": lm,
                        "aux_loss": aux, "grad_norm": grad_norm, "tokens": step * preset.tokens_per_step,
                        "time_s": round(now - started, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.1e}")
        total = bar.total = budget.plan(step, now, now - t_step, eval_s, preset.eval_every, total)
        if step % preset.eval_every == 0 and step < total:
            eval_s = validate(step)
            bar.write(f"step {step}: validation loss {validations[-1]['all']:.4f}")
        if step < total and budget.out_of_time(time.monotonic(), now - t_step, eval_s):
            stopped_early = True
            bar.write(f"stopping at step {step} of {total}: --max-minutes {job.max_minutes} reached")
            break
    bar.close()
    train_s = time.monotonic() - train_started
    validate(step)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    del optimizer  # frees the master weights and moments before the save
    t_save = time.monotonic()
    save_checkpoint(model, preset, job.tokenizer_dir, job.out_dir)
    save_s = time.monotonic() - t_save

    tail = history[-min(len(history), 20):]
    log = {
        "command": job.command,
        "preset": dataclasses.asdict(preset),
        "seed": job.seed,
        "device": device,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "experts_implementation": model.config._experts_implementation,
        "parameters": sum(p.numel() for p in params),
        "vocab_size": vocab_size,
        "steps_requested": job.steps,
        "steps_planned": total,
        "steps_done": step,
        "stopped_early": stopped_early,
        "tokens_seen": step * preset.tokens_per_step,
        "train_tokens": {d: int(s.size) for d, s in train_streams.items()},
        "domain_probabilities": dict(zip(sampler.domains, map(float, sampler.probabilities))),
        "windows_drawn": sampler.drawn,
        "data_time_s": round(data_s, 2),
        "train_time_s": round(train_s, 2),
        "save_time_s": round(save_s, 2),
        "wall_time_s": round(time.monotonic() - started, 2),
        "tokens_per_s": round(step * preset.tokens_per_step / max(train_s, 1e-9), 1),
        "peak_gpu_memory_gib": peak_gb,
        "final": {"train_lm_loss": float(np.mean([h["lm_loss"] for h in tail])) if tail else None,
                  "validation_loss": validations[-1]["all"]},
        "validation": validations,
        "history": history,
    }
    (job.out_dir / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    return log


def save_checkpoint(model, preset: Preset, tokenizer_dir: Path, out_dir: Path) -> None:
    """save_pretrained (safetensors, per-expert tensors as in Qwen's own checkpoints, sharded with an index when
    larger than preset.max_shard_size) in preset.save_dtype, plus the tokenizer files."""
    import torch

    dtype = getattr(torch, preset.save_dtype)
    model.to(dtype=dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir, max_shard_size=preset.max_shard_size)
    for name in train_data.TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
