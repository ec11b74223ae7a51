"""The ``robust-reg`` command: ``demo`` (pretrain, probe, attack, offline) and ``evaluate`` (a saved encoder)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _need_examples_extra() -> None:
    missing = []
    for module in ("mlxtend", "lightly", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(f"robust-reg: this command needs {', '.join(missing)}: pip install 'robust-reg[examples]'")


def _summary_row(name: str, evaluation, epsilons, seconds: float | None) -> dict:
    rob = evaluation.robustness
    row = {"method": name, "clean": rob.clean_accuracy}
    for attack in (f"PGD-{evaluation.curve[0].steps}", "AutoAttack"):
        for eps in epsilons:
            row[f"{attack} @{eps:g}"] = rob.accuracy(attack, eps)
    row["R/sigma @main eps"] = evaluation.bound.relative_regularizer
    row["train_seconds"] = seconds
    row["sanity checks"] = "passed" if rob.passed else "FAILED"
    return row


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(k, row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _cell(key: str, value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if key == "train_seconds":
        return f"{value:.0f} s"
    if key.startswith("R/"):
        return f"{value:.3f}"
    return f"{100 * value:.1f} %"


def _plots(curves: dict, out: Path, title: str) -> list[Path]:
    from .experiments.plots import plot_accuracy_vs_eps, plot_bound_vs_loss

    return [
        plot_accuracy_vs_eps(curves, out / "accuracy_vs_eps.png", title=title),
        plot_bound_vs_loss(curves, out / "bound_vs_loss.png", title=title),
    ]


def demo(args: argparse.Namespace) -> int:
    """Pretrain SimCLR twice (plain, + regulariser) on real MNIST digits, probe, attack, report."""
    _need_examples_extra()
    from .experiments.data import load_dataset
    from .experiments.pipeline import EvalConfig, evaluate_encoder
    from .experiments.ssl import DATASET_DEFAULTS, PretrainConfig, pretrain

    device = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.dataset)
    eval_config = EvalConfig.for_dataset(args.dataset, autoattack_samples=200, square_samples=200, curve_samples=500)
    epochs = args.epochs
    if args.quick:
        data = data.subset(train=512, test=200)
        epochs = min(epochs, 1)
        eval_config.pgd_steps, eval_config.check_steps, eval_config.autoattack = 5, 10, False
        eval_config.curve_epsilons, eval_config.curve_samples = (0.0, 0.1), 100
    print(
        f"robust-reg demo: SimCLR on {data.x_train.shape[0]} real {args.dataset} digits, {epochs} epochs, plain vs. "
        f"+ RobustnessRegularizer(epsilon={args.epsilon}, steps={args.steps}) x {args.weight}; then a linear probe "
        f"on frozen features, attacked on {data.x_test.shape[0]} test digits ({device}).",
        flush=True,
    )
    rows, curves, evaluations, started = [], {}, {}, time.perf_counter()
    for name, variant in (("SimCLR", "plain"), ("SimCLR + robust-reg", "reg")):
        defaults = DATASET_DEFAULTS[args.dataset]
        config = PretrainConfig(
            method="simclr",
            variant=variant,
            arch=defaults["arch"],
            batch_size=defaults["batch_size"],
            lr=defaults["lr"],
            epochs=epochs,
            robust_weight=args.weight,
            epsilon=args.epsilon,
            steps=args.steps,
            seed=args.seed,
            amp=device.type == "cuda",
        )
        result = pretrain(data, config, device=device, progress_bar=not args.no_progress)
        print(f"[{name}] pretrained in {result.seconds:.0f} s; evaluating ...", flush=True)
        evaluation = evaluate_encoder(
            result.encoder, data, eval_config, device=device, progress_bar=not args.no_progress
        )
        result.save(out / f"{variant}_encoder.pt")
        rows.append(_summary_row(name, evaluation, eval_config.epsilons, result.seconds))
        curves[name] = [[r.to_dict() for r in evaluation.curve]]
        evaluations[name] = evaluation
    print("\nDownstream linear probe, attacked (accuracies under attack are estimates):\n")
    print(_table(rows))
    robust = evaluations["SimCLR + robust-reg"]
    print(f"\nBound for the robust encoder's probe at eps {robust.main_epsilon:g}:\n")
    print(robust.bound)
    print(f"\nPlain SimCLR, same probe protocol, for comparison:\n\n{evaluations['SimCLR'].bound}\n")
    print(robust.robustness)
    plots = _plots(curves, out, f"{args.dataset}, SimCLR, {epochs} epochs: plain vs. + robust-reg")
    summary = {
        "command": "robust-reg " + " ".join(args.argv),
        "rows": rows,
        "evaluations": {k: v.to_dict() for k, v in evaluations.items()},
        "seconds": time.perf_counter() - started,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nWrote {out / 'demo.json'}, {', '.join(str(p) for p in plots)} and the two encoders' checkpoints.")
    print(f"Evaluate a checkpoint again with: robust-reg evaluate {out / 'reg_encoder.pt'}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Robust downstream evaluation of a saved encoder: probe, PGD, AutoAttack, checks, bound, curve."""
    _need_examples_extra()
    from .experiments.data import load_dataset
    from .experiments.pipeline import EvalConfig, evaluate_encoder, load_checkpoint

    device = _device(args.device)
    encoder, meta = load_checkpoint(args.checkpoint, arch=args.arch, in_channels=args.in_channels)
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise SystemExit("robust-reg evaluate: the checkpoint does not name its dataset; pass --dataset")
    data = load_dataset(dataset, root=args.data_root, download=args.download)
    overrides = {"pgd_steps": args.pgd_steps, "norm": args.norm}
    if args.epsilons:
        overrides["epsilons"] = tuple(args.epsilons)
    if args.no_autoattack:
        overrides["autoattack"] = False
    config = EvalConfig.for_dataset(dataset, **overrides)
    config.autoattack_samples = config.square_samples = args.aa_samples
    config.test_samples = args.test_samples
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = evaluate_encoder(encoder, data, config, device=device, progress_bar=not args.no_progress)
    print(evaluation.robustness)
    print()
    print(evaluation.bound)
    print()
    print(evaluation.curve)
    name = Path(args.checkpoint).stem
    record = {"checkpoint": str(args.checkpoint), "meta": meta, "dataset": dataset, **evaluation.to_dict()}
    (out / f"{name}_evaluation.json").write_text(json.dumps(record, indent=1, default=str))
    curves = {name: [[r.to_dict() for r in evaluation.curve]]}
    plots = _plots(curves, out, f"{name} on {dataset}")
    print(f"\nWrote {out / f'{name}_evaluation.json'}, {', '.join(str(p) for p in plots)}")
    return 0 if evaluation.robustness.passed else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robust-reg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="offline CPU demo: pretrain plain vs. robust SimCLR, probe, attack, report")
    d.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--weight", type=float, default=1.0, help="weight of the regulariser")
    d.add_argument("--epsilon", type=float, default=0.1, help="training eps (L-inf, pixel units)")
    d.add_argument("--steps", type=int, default=3, help="ascent steps of the regulariser")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--out", default="robust-reg-demo")
    d.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=demo)

    e = sub.add_parser("evaluate", help="robust downstream evaluation of a saved encoder")
    e.add_argument("checkpoint", help="a checkpoint from robust-reg demo / examples/pretrain.py, or a state_dict")
    e.add_argument("--arch", choices=["cnn", "resnet18"], help="needed for a bare state_dict")
    e.add_argument("--in-channels", type=int, help="needed for a bare state_dict")
    e.add_argument("--dataset", choices=["mnist5k", "digits", "fake", "cifar10"], help="default: the checkpoint's")
    e.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    e.add_argument("--data-root", default="datasets")
    e.add_argument("--epsilons", type=float, nargs="+", help="default: 0.05 0.1 (digits), 4/255 8/255 (CIFAR-10)")
    e.add_argument("--norm", default="linf", choices=["linf", "l2"])
    e.add_argument("--pgd-steps", type=int, default=20)
    e.add_argument("--aa-samples", type=int, default=500, help="test samples attacked by AutoAttack and Square")
    e.add_argument("--no-autoattack", action="store_true")
    e.add_argument("--test-samples", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default="robust-reg-eval")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
