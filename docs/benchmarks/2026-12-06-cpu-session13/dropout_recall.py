"""Held-out recall of moeflow-tiny's predictor when training drops features from a share of its rows.

    python3 dropout_recall.py MODE P [WEIGHT_DECAY] --trace tiny_train.npz

MODE: none, tok (the current and previous token's embeddings zeroed), route (the last routes and the route
history zeroed) or both, each in a share P of the training rows (validation and held-out rows are left alone).
Trains as `moeflow predictor train --holdout-domain python_docs --epochs 8` does (the same TrainOptions
otherwise) and prints the last epoch's validation and held-out recall. An experiment, not kept in the trainer:
the figures are in README.md.
"""

import argparse
import json

import torch

import moeflow.routing.predictors.training as training
from moeflow.assets import default_model_dir
from moeflow.routing.traces import Trace
from moeflow.weights.checkpoint import Checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("none", "tok", "route", "both"))
    p.add_argument("p", type=float)
    p.add_argument("weight_decay", type=float, nargs="?", default=0.01)
    p.add_argument("--trace", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    made = []  # the first _DeviceData the trainer makes holds the training rows
    init, batch = training._DeviceData.__init__, training._DeviceData.batch

    def tagged_init(self, *a, **k):
        init(self, *a, **k)
        self.training = not made
        made.append(self)

    def dropped_batch(self, rows):
        out = list(batch(self, rows))
        if self.training and args.p > 0:
            n = len(rows)
            if args.mode in ("tok", "both"):
                keep = (torch.rand(n, generator=gen) >= args.p).float()[:, None]
                out[0], out[1] = out[0] * keep, out[1] * keep
            if args.mode in ("route", "both"):
                keep = (torch.rand(n, generator=gen) >= args.p).float()[:, None]
                out[2], out[3] = out[2] * keep, out[3] * keep
        return tuple(out)

    training._DeviceData.__init__, training._DeviceData.batch = tagged_init, dropped_batch
    options = training.TrainOptions(epochs=8, holdout_domain="python_docs", weight_decay=args.weight_decay)
    _, log = training.train(Checkpoint(default_model_dir()), [Trace.load(args.trace)], options, "cpu",
                            progress=False)
    last = log["epochs"][-1]
    print(json.dumps({"mode": args.mode, "p": args.p, "weight_decay": args.weight_decay,
                      "val": round(last["val"]["recall"], 4), "heldout": round(last["heldout"]["recall"], 4)}))


if __name__ == "__main__":
    main()
