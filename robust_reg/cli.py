"""The ``robust-reg`` command: ``demo`` (pretrain, probe, attack, offline), ``evaluate`` (a saved encoder) and
``harden`` (make a pretrained encoder robust, without labels).

Every bad argument or file is reported as one line on stderr naming the
argument, with exit status 2, before any training or loading work and before
anything is written; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .methods import method_settings
from .regularizer import RobustnessRegularizer

# ``robust-reg evaluate`` without --full: what finishes in a few minutes on 2 CPU cores for the demo's encoder.
EVALUATE_AA_SAMPLES = 200
EVALUATE_CURVE_SAMPLES = 500
# Measured on 2 CPU cores (docs/protocols.md), for the help text.
PROTOCOL_COST = (
    "fine-tuning cost on 2 CPU cores, small CNN, 4,660 CIFAR-10 training images (cpu schedule): ALF ~45 s, AFF "
    "~75 s, each then attacked like SLF (~30 s with PGD only; AutoAttack adds minutes); paper: 2.5x the epochs, PGD-10"
)


class UsageError(Exception):
    """A bad argument or input file: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the message names the argument
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: Callable[[str], float], test: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed  # argparse names the type in some messages
    return parse


def _fraction(text: str) -> float:
    """A number, or a fraction such as ``8/255`` (how radii are written)."""
    if text.count("/") == 1:
        top, bottom = (float(part) for part in text.split("/"))
        return top / bottom
    return float(text)


_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
_count = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
_nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
_radius = _number(_fraction, lambda v: v > 0, "a finite number > 0 such as 0.1 or 8/255")
_any_int = _number(int, lambda v: True, "an integer")


def _protocols(text: str) -> tuple[str, ...]:
    from .demo.pipeline import PROTOCOLS

    modes = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    if not modes or any(m not in PROTOCOLS for m in modes):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {', '.join(PROTOCOLS)}, got {text!r}")
    return modes if "slf" in modes else ("slf", *modes)  # the probe is always fitted: the bound and tasks need it


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _check_radii(epsilons, norm: str, flag: str, x: torch.Tensor | None = None) -> None:
    """The radii against ``ThreatModel``'s checks (a unit mistake; an L2 radius that does not fit the inputs),
    as a one-line ``UsageError`` naming the flag, before any work."""
    from .attacks import ThreatModel, check_radius

    for eps in epsilons:
        try:
            check_radius(eps, norm, flag)
            if x is not None:
                ThreatModel(eps, norm=norm).check_size(x, flag)
        except ValueError as err:
            raise UsageError(str(err)) from None


def _output_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder")
    return out


def _need_examples_extra() -> None:
    missing = []
    for module in ("mlxtend", "lightly", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"this command needs {', '.join(missing)}: pip install 'robust-reg[examples]'")


def _say(message: str) -> None:
    print(message, flush=True)


def _summary_row(name: str, evaluation, epsilons, seconds: float | None) -> dict:
    rob = evaluation.robustness
    main = max(epsilons)
    row = {"method": name, "clean": rob.clean_accuracy}
    for eps in epsilons:
        row[f"robust @{eps:g}"] = rob.robust_accuracy(eps)
    for attack in (f"PGD-{evaluation.curve[0].steps}", "AutoAttack"):
        row[f"{attack} @{main:g}"] = rob.accuracy(attack, main)
    worst = evaluation.worst_task(main)
    row[f"worst task @{main:g}"] = None if worst is None else f"{100 * worst[1]:.1f} % ({worst[0]})"
    row["R/sigma @main eps"] = evaluation.bound.relative_deviation
    if "slf" in evaluation.corruptions:
        row["corruptions"] = evaluation.corruptions["slf"].mean_accuracy
    if evaluation.embedding is not None:
        row["emb. attack dev/sigma"] = evaluation.embedding.mean
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
    if "sigma" in key:
        return f"{value:.3f}"
    return f"{100 * value:.1f} %"


def _samples_note(evaluation, what: str) -> str:
    """Which test samples each figure uses (the table, the curve and the bound use different ones)."""
    rob = evaluation.robustness
    sizes = {r.attack: r.num_samples for r in rob.results}
    parts = [f"clean and PGD on all {rob.num_samples} test {what}"]
    for attack in ("AutoAttack", "Square"):
        if attack in sizes:
            parts.append(f"{attack} on the first {sizes[attack]}")
    worst = rob.worst_case(max(rob.epsilons))
    if worst is not None:
        parts.append(f"robust = per-sample {worst.attack} (and clean), on the {worst.num_samples} samples all attacked")
    if len(evaluation.tasks) > 1:
        parts.append(
            f"worst task = the least robust of the label sets {', '.join(evaluation.tasks)} (each its own probe; "
            f"clean and PGD on all {rob.num_samples})"
        )
    parts.append(f"R/sigma, the bound and the plots on the first {evaluation.curve.reports[0].num_samples}")
    return "; ".join(parts)


def _plots(curves: dict, out: Path, title: str, robust: dict | None = None) -> list[Path]:
    from .demo.plots import plot_accuracy_vs_eps, plot_bound_vs_loss

    return [
        plot_accuracy_vs_eps(curves, out / "accuracy_vs_eps.png", title=title, robust=robust),
        plot_bound_vs_loss(curves, out / "bound_vs_loss.png", title=title),
    ]


def demo(args: argparse.Namespace) -> int:
    """Pretrain SimCLR twice (plain, + regulariser) on real MNIST digits, probe, attack, report."""
    _check_radii([args.epsilon], "linf", "--epsilon")
    _need_examples_extra()
    device = _device(args.device)
    out = _output_folder(args.out)
    from .demo.data import load_dataset
    from .demo.pipeline import EvalConfig

    if args.weight is None:
        settings = method_settings("simclr")
        args.weight = 1.0 if settings is None else settings.weight
    data = load_dataset(args.dataset)
    eval_config = EvalConfig.for_dataset(
        args.dataset, autoattack_samples=EVALUATE_AA_SAMPLES, square_samples=EVALUATE_AA_SAMPLES, curve_samples=500
    )
    epochs = args.epochs
    if args.quick:
        data = data.subset(train=512, test=200)
        epochs = min(epochs, 1)
        eval_config.pgd_steps, eval_config.check_steps, eval_config.autoattack = 5, 10, False
        eval_config.curve_epsilons, eval_config.curve_samples = (0.0, 0.1), 100
    _say(
        f"robust-reg demo: SimCLR on {data.x_train.shape[0]} real {args.dataset} digits, {epochs} epochs, plain vs. "
        f"+ robust-reg ({_demo_recipe(args)}); then a linear probe on frozen features, attacked on "
        f"{data.x_test.shape[0]} test digits ({device})."
    )
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        name: _demo_run(args, data, eval_config, epochs, robust, device, out)
        for name, robust in (("SimCLR", False), ("SimCLR + robust-reg", True))
    }
    _demo_report(args, runs, eval_config, epochs, out, started)
    return 0


def _demo_recipe(args: argparse.Namespace) -> str:
    """The robust run's recipe in words, as the demo's options set it."""
    reg = RobustnessRegularizer(args.epsilon, steps=args.steps)  # its inner maximisation, as the run builds it
    steps = "" if args.steps is None else f", steps={args.steps}"
    inner = "N-FGSM's one noisy step" if reg.inner == "n-fgsm" else f"PGD-{reg.steps}"
    augmentation = "at full strength" if args.constant_augmentation else "annealed from strong to weak"
    default = "the package default" if args.steps is None and not args.constant_augmentation else "not the default"
    return (
        f"{default}: RobustnessRegularizer(epsilon={args.epsilon}{steps}), {inner}, on the embedding the loss "
        f"compares, weight {args.weight}, adversarial view; augmentation {augmentation}"
    )


def _demo_run(args: argparse.Namespace, data, eval_config, epochs: int, robust: bool, device, out: Path) -> tuple:
    """One of the demo's two encoders: pretrained on the public API's loop, saved, evaluated."""
    from .demo.pipeline import evaluate_encoder
    from .demo.training import DATASET_DEFAULTS, TrainConfig, collapse_monitor, pretrain

    defaults = DATASET_DEFAULTS[args.dataset]
    config = TrainConfig(
        method="simclr",
        robust=robust,
        arch=defaults["arch"],
        batch_size=defaults["batch_size"],
        lr=defaults["lr"],
        epochs=epochs,
        weight=args.weight,
        epsilon=args.epsilon,
        steps=args.steps,
        anneal_augmentation=not args.constant_augmentation,
        seed=args.seed,
        amp=device.type == "cuda",
    )
    name = "SimCLR + robust-reg" if robust else "SimCLR"
    monitor = collapse_monitor(config, data)
    result = pretrain(data, config, device=device, progress_bar=not args.no_progress, monitor=monitor)
    _say(f"[{name}] pretrained in {result.seconds:.0f} s; evaluating ...")
    if monitor is not None:
        _say(f"[{name}] collapse monitor (128 training images, after each epoch), last: {monitor.history[-1]}")
    evaluation = evaluate_encoder(
        result.encoder, data, eval_config, device=device, progress_bar=not args.no_progress, log=_say
    )
    result.save(out / f"{'robust' if robust else 'plain'}_encoder.pt")
    return evaluation, result.seconds


def _demo_report(args: argparse.Namespace, runs: dict, eval_config, epochs: int, out: Path, started: float) -> None:
    """The demo's table, bound reports, evaluation, plots and ``demo.json``."""
    rows = [_summary_row(name, ev, eval_config.epsilons, seconds) for name, (ev, seconds) in runs.items()]
    evaluations = {name: ev for name, (ev, _) in runs.items()}
    robust = evaluations["SimCLR + robust-reg"]
    samples = _samples_note(robust, "digits")
    _say("\nDownstream linear probe, attacked (accuracies under attack are estimates):\n")
    _say(_table(rows))
    _say(f"Samples: {samples}.")
    _say(f"\nBound for the robust encoder's probe at eps {robust.main_epsilon:g}:\n")
    _say(str(robust.bound))
    _say(f"\nPlain SimCLR, same probe protocol, for comparison:\n\n{evaluations['SimCLR'].bound}\n")
    _say(str(robust.robustness))
    _say(robust.tasks_summary())
    title = (
        f"{args.dataset}, SimCLR, {epochs} epochs: plain vs. + robust-reg (curves: first "
        f"{robust.curve.reports[0].num_samples} test digits; stars: robust worst case, samples as in the table)"
    )
    curves = {name: [[r.to_dict() for r in ev.curve]] for name, ev in evaluations.items()}
    points = {name: [ev.robustness.to_dict()["robust_accuracy"]] for name, ev in evaluations.items()}
    plots = _plots(curves, out, title, points)
    summary = {
        "command": "robust-reg " + " ".join(args.argv),
        "rows": rows,
        "samples": samples,
        "evaluations": {k: v.to_dict() for k, v in evaluations.items()},
        "seconds": time.perf_counter() - started,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    _say(f"\nWrote {out / 'demo.json'}, {', '.join(str(p) for p in plots)} and the two encoders' checkpoints.")
    _say(
        f"Evaluate a checkpoint again with: robust-reg evaluate {out / 'robust_encoder.pt'}\n"
        f"(default budget: AutoAttack and Square on the first {EVALUATE_AA_SAMPLES} test digits, a few minutes on "
        "2 CPU cores; --full attacks every test digit with every attack, several times longer)"
    )


def evaluate(args: argparse.Namespace) -> int:
    """Robust downstream evaluation of a saved encoder: probe, PGD, AutoAttack, checks, bound, curve."""
    _need_examples_extra()
    device = _device(args.device)
    out = _output_folder(args.out)
    if args.epsilons and not all(math.isfinite(e) and e > 0 for e in args.epsilons):
        raise UsageError(f"--epsilons must be finite numbers > 0, got {args.epsilons}")
    _check_radii(args.epsilons or [], args.norm, "--epsilons")
    from .demo.pipeline import evaluate_encoder

    encoder, meta, dataset, data = _encoder_and_data(args)
    config = _evaluation_config(args, data)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"robust-reg evaluate: {args.checkpoint} on {dataset} ({device}): {_evaluation_cost(args, config, data)}")
    evaluation = evaluate_encoder(encoder, data, config, device=device, progress_bar=not args.no_progress, log=_say)
    _say(str(evaluation.robustness))
    _say(evaluation.tasks_summary())
    _say(f"\nFine-tuning modes on '{next(iter(evaluation.tasks))}' ({config.finetune_schedule} schedule):\n")
    _say(evaluation.protocols_summary())
    _say("")
    _say(str(evaluation.bound))
    _say("")
    _say(str(evaluation.curve))
    name = Path(args.checkpoint).stem
    record = {"checkpoint": str(args.checkpoint), "meta": meta, "dataset": dataset, **evaluation.to_dict()}
    record["samples"] = _samples_note(evaluation, "samples")
    (out / f"{name}_evaluation.json").write_text(json.dumps(record, indent=1, default=str))
    curves = {name: [[r.to_dict() for r in evaluation.curve]]}
    robust = {name: [record["robustness"]["robust_accuracy"]]}
    title = f"{name} on {dataset} (curves: first {config.curve_samples} test samples; stars: robust worst case)"
    plots = _plots(curves, out, title, robust)
    _say(f"Samples: {record['samples']}.")
    _say(f"\nWrote {out / f'{name}_evaluation.json'}, {', '.join(str(p) for p in plots)}")
    return 0 if evaluation.robustness.passed else 3


def _encoder_and_data(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, str, Any]:
    """``(encoder, metadata, dataset name, data)`` of ``evaluate`` and ``harden``: the checkpoint, then its data,
    each refused in one line (a file of no kind read, a dataset to download, channels that do not fit)."""
    from .demo.checkpoints import CheckpointError, load_checkpoint

    try:
        encoder, meta = load_checkpoint(args.checkpoint, arch=args.arch, in_channels=args.in_channels)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    dataset, data = _evaluation_data(args, args.dataset or meta.get("dataset"))
    _check_channels(args.checkpoint, meta, dataset, data.x_test.shape[1])
    return encoder, meta, dataset, data


def _evaluation_config(args: argparse.Namespace, data):
    """``evaluate``'s ``EvalConfig`` from its flags; the radii checked against the data before any work."""
    from .demo.pipeline import EvalConfig

    overrides = {"pgd_steps": args.pgd_steps, "norm": args.norm}
    if args.epsilons:
        overrides["epsilons"] = tuple(args.epsilons)
    if args.no_autoattack:
        overrides["autoattack"] = False
    config = EvalConfig.for_data(data, **overrides)
    _check_radii(config.epsilons, config.norm, "--epsilons", data.x_test[:1])
    n_test = data.x_test.shape[0] if args.test_samples is None else min(args.test_samples, data.x_test.shape[0])
    expensive = n_test if args.full else min(args.aa_samples or EVALUATE_AA_SAMPLES, n_test)
    config.autoattack_samples = config.square_samples = expensive
    config.curve_samples = n_test if args.full else min(EVALUATE_CURVE_SAMPLES, n_test)
    config.test_samples = args.test_samples
    config.protocols, config.finetune_schedule = args.protocol, args.finetune_schedule
    config.finetune_epochs = args.finetune_epochs
    config.corruptions, config.embedding_attack = not args.no_corruptions, not args.no_embedding_attack
    return config


def _evaluation_cost(args: argparse.Namespace, config, data) -> str:
    """What ``evaluate`` will run, said before it starts (the sanity checks' attacks are a large share)."""
    n_test = data.x_test.shape[0] if config.test_samples is None else min(config.test_samples, data.x_test.shape[0])
    attacks = (
        "no AutoAttack or Square (--no-autoattack)"
        if args.no_autoattack
        else f"AutoAttack (standard) and Square ({config.square_queries} queries) on the first "
        f"{config.autoattack_samples}"
    )
    return (
        f"PGD-{config.pgd_steps} on {n_test} test samples, {attacks}, curve and bound on the first "
        f"{config.curve_samples}{' (--full)' if args.full else ''}; the sanity checks add PGD-{config.check_steps} "
        f"at the largest eps and PGD-{config.pgd_steps} at the whole range on all {n_test} (together about "
        f"{1 + config.check_steps // config.pgd_steps}x the PGD-{config.pgd_steps} cost)"
    )


def _check_channels(checkpoint: str, meta: dict, dataset: str, channels: int) -> None:
    """An encoder trained on images of other channels than the dataset's: one line, before any probe."""
    trained = meta.get("in_channels")
    if trained is not None and int(trained) != channels:
        source = f" ({meta['dataset']})" if meta.get("dataset") else ""
        raise UsageError(
            f"checkpoint {checkpoint} takes {trained}-channel images{source} but --dataset {dataset} has {channels} "
            f"channels: pass the dataset it was trained on" + (f" (--dataset {meta['dataset']})" if source else "")
        )


def _evaluation_data(args: argparse.Namespace, dataset: str | None) -> tuple[str, Any]:
    """``(name, data)``: the dataset ``evaluate`` attacks on, or a ``UsageError`` naming the flag that is missing
    or wrong."""
    from .demo.data import dataset_available, load_dataset

    if dataset is None:
        raise UsageError("--dataset is needed: the checkpoint does not name its dataset")
    if dataset in ("npz", "cifar10-subset") and args.data_path is None:
        raise UsageError(f"--dataset {dataset} reads an .npz file: pass --data-path FILE")
    if not args.download and not dataset_available(dataset, args.data_root):
        raise UsageError(f"--dataset {dataset} is not under --data-root {args.data_root}; pass --download to fetch it")
    try:
        return dataset, load_dataset(dataset, root=args.data_root, download=args.download, path=args.data_path)
    except ValueError as err:  # a file that is not the arrays it should be: one line, naming it
        raise UsageError(str(err)) from err


def harden(args: argparse.Namespace) -> int:
    """Robustify a pretrained encoder without labels (``robust_reg.harden``) and write a checkpoint."""
    _need_examples_extra()
    device = _device(args.device)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "-hardened.pt")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
    if args.epsilon is not None:
        _check_radii([args.epsilon], "linf", "--epsilon")  # a unit mistake (8 for 8/255) before any loading
    from . import harden as harden_encoder
    from .demo.pipeline import ShuffledBatches, crop_flip
    from .finetune import FinetuneSchedule

    encoder, meta, dataset, data = _encoder_and_data(args)
    if args.epsilon is None:
        from .demo.training import training_defaults

        args.epsilon = training_defaults(data)["epsilon"]  # the dataset's training eps (0.1 digits, 8/255 RGB)
    _check_radii([args.epsilon], "linf", "--epsilon", data.x_train[:1])
    schedule = FinetuneSchedule(
        epochs=args.epochs, lr=args.lr, milestones=(), steps=args.steps, batch_size=args.batch_size
    )
    loader = ShuffledBatches(data.x_train, data.y_train, schedule.batch_size, args.seed)
    augment = crop_flip(flip=data.kind != "digits", seed=args.seed)
    encoder = encoder.to(device)
    seconds = _harden_step_seconds(harden_encoder, encoder, loader, augment, args, device)
    steps = len(loader) * schedule.epochs
    _say(
        f"robust-reg harden: {args.checkpoint} ({meta['source']}, {meta['arch']}) on the {data.x_train.shape[0]:,} "
        f"training images of {dataset}, no labels: {schedule.epochs} epochs of {len(loader)} steps, "
        f"eps {args.epsilon:.4g}, about {_duration(seconds * steps)} on {device} (one step took {seconds:.2f} s)"
    )
    torch.manual_seed(args.seed)
    robust = harden_encoder(
        encoder,
        loader,
        epsilon=args.epsilon,
        weight=args.weight,
        schedule=schedule,
        augment=augment,
        device=device,
        progress_bar=not args.no_progress,
    )
    _save_hardened(out, robust.cpu(), args, meta, dataset, schedule)
    _say(
        f"Wrote {out}. Evaluate it with: robust-reg evaluate {out}"
        + (f" --data-path {args.data_path}" if args.data_path else "")
    )
    return 0


def _save_hardened(out: Path, robust: torch.nn.Module, args: argparse.Namespace, meta: dict, dataset: str, schedule):
    """Write ``harden``'s checkpoint with what made it (``evaluate`` reads it like any robust-reg checkpoint)."""
    from .demo.checkpoints import save_checkpoint
    from .hardening import HARDEN_CPU

    config = {
        "hardened_from": str(args.checkpoint),
        "source": meta["source"],
        "epsilon": args.epsilon,
        "weight": args.weight,
        "schedule": {"epochs": schedule.epochs, "lr": schedule.lr, "steps": schedule.steps, "batch": args.batch_size},
        "default_schedule": {"epochs": HARDEN_CPU.epochs, "lr": HARDEN_CPU.lr, "steps": HARDEN_CPU.steps},
    }
    save_checkpoint(
        out, robust, arch=meta["arch"], dataset=dataset, config=config, arch_options=meta.get("arch_options")
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _harden_step_seconds(harden_encoder, encoder, loader, augment, args, device) -> float:
    """The time of one training step, on copies (nothing of the run is spent), for the estimate said up front: two
    steps timed after one untimed (the first call pays for warming up)."""
    from .finetune import FinetuneSchedule

    batch = next(iter(loader))
    one = FinetuneSchedule(epochs=1, lr=args.lr, steps=args.steps, batch_size=args.batch_size)
    options = dict(epsilon=args.epsilon, weight=args.weight, schedule=one, augment=augment, device=device)
    harden_encoder(encoder, [batch], **options)
    start = time.perf_counter()
    harden_encoder(encoder, [batch, batch], **options)
    return (time.perf_counter() - start) / 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robust-reg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_harden(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="offline CPU demo: pretrain plain vs. robust SimCLR, probe, attack, report")
    d.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits"])
    d.add_argument("--epochs", type=_positive_int, default=30)
    d.add_argument(
        "--weight", type=_positive_float, default=None, help="weight of the regulariser (> 0; default: SimCLR's, 1.0)"
    )
    d.add_argument(
        "--epsilon", type=_radius, default=0.1, help="training eps (L-inf, a fraction of the pixel range, e.g. 0.1)"
    )
    d.add_argument(
        "--steps",
        type=_count,
        default=None,
        help="PGD ascent steps of the regulariser (>= 0; default: its one N-FGSM step; 0.2's default: 3)",
    )
    d.add_argument(
        "--constant-augmentation",
        action="store_true",
        help="keep the robust run's augmentation at full strength (default: annealed from strong to weak)",
    )
    d.add_argument("--seed", type=_any_int, default=0)
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    d.add_argument("--out", default="robust-reg-demo")
    d.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (milestone lines still print)")
    d.add_argument("--debug", action="store_true", help="show tracebacks for bad arguments")
    d.set_defaults(func=demo)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="robust downstream evaluation of a saved encoder",
        description=(
            "Fit a linear probe on frozen clean features and attack it. Default budget: PGD-20 and the PGD-100 "
            f"check on every test sample, AutoAttack and Square on the first {EVALUATE_AA_SAMPLES}, the bound curve "
            f"on the first {EVALUATE_CURVE_SAMPLES}: a few minutes on 2 CPU cores for the demo's encoder. --full "
            "attacks every test sample with every attack (the paper-style protocol), several times longer."
        ),
    )
    e.add_argument(
        "checkpoint",
        help="a robust-reg checkpoint (demo, harden, examples/pretrain.py), a solo-learn or Lightning .ckpt with a "
        "`backbone`, a torchvision ResNet-18 state_dict, or a state_dict of --arch",
    )
    e.add_argument(
        "--arch", choices=["cnn", "cnn-wide", "resnet18", "resnet18-imagenet"], help="needed for a bare state_dict"
    )
    e.add_argument("--in-channels", type=_positive_int, help="needed for a bare state_dict")
    e.add_argument(
        "--dataset",
        choices=["mnist5k", "digits", "fake", "cifar10", "cifar10-subset", "npz"],
        help="default: the checkpoint's; npz and cifar10-subset read --data-path",
    )
    e.add_argument(
        "--data-path",
        help="an .npz with x_train, y_train, x_test, y_test (uint8 NHWC or float NCHW in [0, 1]; integer labels)",
    )
    e.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    e.add_argument("--data-root", default="datasets")
    e.add_argument(
        "--epsilons",
        type=_radius,
        nargs="+",
        help="radii, fractions of the pixel range (8/255 is accepted); default: 0.05 0.1 (digits), 4/255 8/255 (RGB)",
    )
    e.add_argument("--norm", default="linf", choices=["linf", "l2"])
    e.add_argument("--pgd-steps", type=_positive_int, default=20)
    e.add_argument(
        "--aa-samples",
        type=_positive_int,
        default=None,
        help=f"test samples attacked by AutoAttack and Square (default {EVALUATE_AA_SAMPLES}; --full: all)",
    )
    e.add_argument("--full", action="store_true", help="every attack on every test sample (paper-style, slow)")
    e.add_argument("--no-autoattack", action="store_true")
    e.add_argument("--test-samples", type=_positive_int, default=None, help="use only the first N test samples")
    _add_protocol_options(e)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--out", default="robust-reg-eval")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (one line per attack still prints)")
    e.add_argument("--debug", action="store_true", help="show tracebacks for bad arguments and files")
    e.set_defaults(func=evaluate)


def _add_harden(sub: argparse._SubParsersAction) -> None:
    from .hardening import HARDEN_CPU  # the options' defaults are the Python API's

    h = sub.add_parser(
        "harden",
        help="make a pretrained encoder robust without labels; writes a checkpoint evaluate reads",
        description=(
            "Train a copy of a pretrained encoder so that its features of worst-case perturbed images stay at the "
            "original's features of the clean ones (robust_reg.harden: the regulariser's ascent, the frozen original "
            "as the anchor; no labels are read). Reads robust-reg, solo-learn and Lightning checkpoints and "
            "torchvision ResNet-18 state_dicts; says the expected time before it starts."
        ),
    )
    h.add_argument("checkpoint", help="the pretrained encoder (see robust-reg evaluate --help for the kinds)")
    h.add_argument("--arch", choices=["cnn", "cnn-wide", "resnet18", "resnet18-imagenet"], help="for a bare state_dict")
    h.add_argument("--in-channels", type=_positive_int, help="for a bare state_dict whose first layer does not show it")
    h.add_argument(
        "--dataset",
        choices=["mnist5k", "digits", "fake", "cifar10", "cifar10-subset", "npz"],
        help="its training images are used, without labels (default: the checkpoint's)",
    )
    h.add_argument("--data-path", help="the .npz of --dataset npz or cifar10-subset")
    h.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    h.add_argument("--data-root", default="datasets")
    h.add_argument(
        "--epsilon",
        type=_radius,
        default=None,
        help="L-inf radius, a fraction of the pixel range (default: the dataset's training eps: 0.1 digits, 8/255 RGB)",
    )
    h.add_argument("--epochs", type=_positive_int, default=HARDEN_CPU.epochs)
    h.add_argument(
        "--lr",
        type=_positive_float,
        default=HARDEN_CPU.lr,
        help="SGD learning rate (momentum 0.9; HARDEN_CPU's, see the guide)",
    )
    h.add_argument("--steps", type=_positive_int, default=HARDEN_CPU.steps, help="ascent steps of the regulariser")
    h.add_argument("--weight", type=_nonnegative_float, default=1.0, help="the regulariser's penalty weight")
    h.add_argument("--batch-size", type=_positive_int, default=128)
    h.add_argument("--seed", type=_any_int, default=0)
    h.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    h.add_argument("--out", default=None, help="the checkpoint to write (default: CHECKPOINT-hardened.pt beside it)")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    h.add_argument("--no-progress", action="store_true")
    h.add_argument("--debug", action="store_true", help="show tracebacks for bad arguments and files")
    h.set_defaults(func=harden)


def _add_protocol_options(e: argparse.ArgumentParser) -> None:
    """``evaluate``'s fine-tuning modes, corruptions and embedding attack."""
    e.add_argument(
        "--protocol",
        type=_protocols,
        default=("slf",),
        help=f"fine-tuning modes, comma-separated: slf (linear probe), alf (adversarial linear), aff (TRADES full "
        f"fine-tuning); {PROTOCOL_COST}",
    )
    e.add_argument(
        "--finetune-schedule",
        choices=["cpu", "paper"],
        default="cpu",
        help="alf/aff schedule: cpu (10 epochs, SGD lr 0.1, PGD-5) or paper (DynACL's: 25 epochs, PGD-10)",
    )
    e.add_argument("--finetune-epochs", type=_positive_int, default=None, help="override the schedule's epochs")
    e.add_argument("--no-corruptions", action="store_true", help="skip the CIFAR-10-C-style corruption accuracy")
    e.add_argument("--no-embedding-attack", action="store_true", help="skip the label-free embedding attack")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "full", False) and args.aa_samples is not None:
        build_parser().exit(2, "robust-reg evaluate: error: pass --full or --aa-samples, not both (see --help)\n")
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"robust-reg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
