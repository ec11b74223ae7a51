"""DynACL++'s LP-AFT on one DynACL encoder, under several random streams (MNIST-5k, the seed-2 fall).

Pretrains DynACL for ``--epochs`` on ``--seed`` once, then runs LP-AFT on copies of that encoder: first
exactly as ``simclr-dynacl++`` does (right after pretraining), then after ``torch.manual_seed(1000 + j)``
for each further draw. The k-means pseudo labels are the same every time (their own fixed seed); only the
fine-tuning's random draws (PGD starts) change. Each encoder gets the screening evaluation (PGD-20).

    OMP_NUM_THREADS=1 python benchmarks/lp_aft_draws.py --seed 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import light_eval  # noqa: E402
from harness import PretrainConfig, lp_aft, pretrain, pseudo_label_purity, training_defaults  # noqa: E402

from robust_reg.demo.data import load_dataset  # noqa: E402
from robust_reg.demo.pipeline import EvalConfig, evaluate_encoder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--draws", type=int, default=3, help="LP-AFT runs after reseeding, besides the benchmark's own")
    args = p.parse_args()
    data = load_dataset("mnist5k")
    d = training_defaults(data)
    config = PretrainConfig(
        method="simclr",
        variant="dynacl",
        arch=d["arch"],
        epochs=args.epochs,
        batch_size=d["batch_size"],
        lr=d["lr"],
        epsilon=d["epsilon"],
        seed=args.seed,
    )
    encoder = pretrain(data, config, progress_bar=False).encoder
    device = torch.device("cpu")
    tuned = {"as in the benchmark": lp_aft(copy.deepcopy(encoder), data, config, device)}
    for j in range(args.draws):
        torch.manual_seed(1000 + j)
        tuned[f"torch.manual_seed({1000 + j})"] = lp_aft(copy.deepcopy(encoder), data, config, device)
    evaluation = light_eval(data, EvalConfig.for_data(data))
    rows = []
    for name, (model, pseudo) in [("DynACL (no LP-AFT)", (encoder, None)), *tuned.items()]:
        result = evaluate_encoder(model, data, evaluation, seed=args.seed).to_dict()["robustness"]
        robust = {r["epsilon"]: r["accuracy"] for r in result["robust_accuracy"]}
        purity = None if pseudo is None else pseudo_label_purity(pseudo, data.y_train)
        rows.append({"run": name, "clean": result["clean_accuracy"], "robust": robust, "purity": purity})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
