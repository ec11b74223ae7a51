"""The time-robustness frontier: robust and clean accuracy against training seconds, every method at each budget.

The budgets are multiples of the record budget R, the default's training time for the recipe's epochs on the
same seed, measured in the same process (``--budgets 1,0.5,2``, in that order). Each method is trained *for*
each budget, not truncated: its epochs at a budget are the budget over its epoch time, from an unscored
``--timing-epochs`` run of the method in the same process (a method whose schedule depends on its total
epochs, DynACL's annealing or a cosine rate, gets the whole schedule at every budget); post-processing
(LP-AFT) counts as a fixed cost (a budget below it still gets one epoch, and shows its real time). The
default's own epochs scale with the budget. Every run is scored like ``compare.py``'s and written in its report
format (``runs``; ``compare.py --render`` merges seeds and gives the paired differences); ``frontier.png`` plots
robust accuracy against seconds (clean in a second panel).

Command of record (per seed N, one thread per process, the three side by side; then ``--plot`` merges the seeds
and writes ``frontier.md`` and ``frontier.png``):

    OMP_NUM_THREADS=1 python benchmarks/frontier.py --dataset cifar10-subset \\
        --data-path ../shared/cifar10-subset/cifar10_subset.npz --split test --aa-samples 500 --lean-eval --alf \\
        --budgets 1,0.5,0.25,2 --seeds N --timing-epochs 3 \\
        --methods 'simclr+robust-reg,simclr+robust-reg[inner=n-fgsm],simclr-dynacl++,simclr-dynacl,simclr' \\
        --out benchmarks/results/frontier-cifar10-subset/seedN
    R=benchmarks/results/frontier-cifar10-subset
    python benchmarks/frontier.py --plot $R/seed?/results.json $R/seed?-more/results.json $R/seed?-more2/results.json \\
        $R/seed?-more[3-7]/results.json \\
        --posthoc benchmarks/results/posthoc-cifar10-subset/seed*/results.json \\
        --versus 'simclr+robust-reg[inner=n-fgsm,anneal_augment=true]' --out $R

Rows added later to the same seeds take R from the first run instead of training the default again
(``--record-from``; the same data, split, evaluation and processor, else refused: ``--other-device`` accepts another
processor's R and records it), e.g. the second and third batches of record
(``seedN-more2``: ``--budgets 1,0.5 --methods 'simclr+robust-reg[inner=n-fgsm,anneal_augment=true]'``; ``seedN-more3``:
the same row, 0.3's default, with ``--budgets 0.25``; ``seedN-more4``: ``--budgets 1`` and
``'simclr+robust-reg[inner=n-fgsm,anneal_augment=true,detach_anchor=true]'``, ``seedN-more6`` the same row with
``--budgets 0.5,0.25``; ``seedN-more5``: ``--budgets 1,0.5`` and
``'simclr+robust-reg[inner=n-fgsm-clean,anneal_augment=true,detach_anchor=true],simclr+robust-reg[inner=n-fgsm-clean,anneal_augment=true]'``;
``seedN-more7``: ``--budgets 1,0.5,0.25`` and the same two rows with ``inner=n-fgsm-noisy``):

    ROWS='simclr+robust-reg[anneal_augment=true],simclr-acl-ds,simclr+robust-reg[inner=n-fgsm,detach_anchor=true]'
    OMP_NUM_THREADS=1 python benchmarks/frontier.py ... --budgets 1,0.5,0.25 --seeds N --methods "$ROWS" \\
        --record-from benchmarks/results/frontier-cifar10-subset/seedN/results.json \\
        --out benchmarks/results/frontier-cifar10-subset/seedN-more

``--posthoc`` adds the pretrained-backbone route (plain SimCLR, then ``harden``, DeACL's or FARE's stage:
``posthoc.py``'s run of the same protocol) to the table and the plot, each stage against that run's default from
scratch at the same total time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402

REFERENCE = "simclr+robust-reg"
DEFAULT_METHODS = (
    "simclr,simclr+robust-reg,simclr+robust-reg[inner=n-fgsm],simclr+robust-reg[anneal_augment=true],simclr-acl-ds,"
    "simclr-dynacl,simclr-dynacl++"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = compare.script_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help="compare.py rows; the default sets the budgets")
    p.add_argument(
        "--budgets",
        default="1,0.5,2",
        help="multiples of the default's time for the recipe's epochs, run in this order",
    )
    p.add_argument("--timing-epochs", type=int, default=3)
    p.add_argument(
        "--record-from",
        metavar="RESULTS_JSON",
        help="add rows to an earlier run of this seed: take R from its report instead of training the default "
        "again (same data, split, evaluation and processor, refused otherwise); --plot merges both reports",
    )
    p.add_argument(
        "--other-device",
        action="store_true",
        help="with --record-from: accept an earlier run on another processor (R is seconds on that machine: the "
        "rows get its seconds, not its speed); the report records both devices",
    )
    p.add_argument("--plot", nargs="+", metavar="RESULTS_JSON", help="only plot (and table) merged results")
    p.add_argument(
        "--posthoc",
        nargs="+",
        metavar="RESULTS_JSON",
        help="with --plot: add the pretrained-backbone route (plain SimCLR, then a stage) from posthoc.py's "
        "per-seed reports, each stage against that run's default from scratch at the same total time",
    )
    p.add_argument(
        "--versus",
        metavar="ROW",
        help="with --plot: also pair every row with ROW (e.g. 0.3's default) at each budget where ROW ran, saying "
        "whether each row trained in ROW's batch (results folder): only then is the pairing fair in time",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        report = compare.merge_reports([_with_batch(json.loads(Path(p).read_text()), p) for p in args.plot])
        table = frontier_table(report)
        if args.versus:
            table += "\n" + versus_table(report, args.versus)
        posthoc = None
        if args.posthoc:
            posthoc = compare.merge_reports([json.loads(Path(p).read_text()) for p in args.posthoc])
            table += "\n" + posthoc_table(posthoc)
        (out / "frontier.md").write_text(table)
        print(table)
        plot(report, out / "frontier.png", posthoc)
        return report
    names = compare.split_methods(args.methods)
    if REFERENCE not in names and not args.record_from:
        raise SystemExit(f"--methods must include {REFERENCE}: its time sets the budgets (or pass --record-from)")
    multiples = [float(b) for b in args.budgets.split(",")]
    data, eval_config, epochs, report = compare.script_setup("frontier", args, argv, quick_epochs=2)
    prior = _prior_record(args.record_from, report, args.seeds, args.other_device) if args.record_from else None
    if prior is not None:
        names = [n for n in names if n != REFERENCE]
    if args.quick:
        multiples = multiples[:2]
    runner, cpu = compare.RECIPE, torch.device("cpu")
    report.update(timing_runs=[], budgets={}, paired_reference=REFERENCE)
    started = time.perf_counter()

    def save() -> None:
        report["elapsed_seconds"] = time.perf_counter() - started
        compare.write_json(report, out / "results.json")

    # ALF (an adversarially trained head) is scored at the record budget only: it is the costliest protocol.
    record_eval = eval_config
    other_eval = dataclasses.replace(eval_config, protocols=tuple(p for p in eval_config.protocols if p != "alf"))
    for seed in args.seeds:
        if prior is not None:
            reference, record = None, prior[str(seed)]
            print(f"[frontier] seed {seed}: R = {record:.0f} s from {args.record_from}", flush=True)
        else:
            print(f"[frontier] seed {seed}: {REFERENCE}, {epochs} epochs (sets R)", flush=True)
            reference = compare.run_one(REFERENCE, data, runner, record_eval, cpu, seed, epochs, False)
            record = reference["train_seconds"]
        report["budgets"][str(seed)] = {f"{k:g}R": k * record for k in multiples}
        timings = {}
        for name in names:
            if name != REFERENCE:
                timings[name] = compare.run_one(
                    name, data, runner, eval_config, cpu, seed, args.timing_epochs, False, score=False
                )
                report["timing_runs"].append(timings[name])
        # Budgets outer, in the order given: a run stopped early still has every method at its first budgets.
        for k in multiples:
            for name in names:
                if name == REFERENCE:
                    n = max(1, round(k * epochs))
                else:
                    n = compare.epochs_in_budget(timings[name], k * record, timings[name]["epochs"])
                print(f"[frontier] seed {seed}: {name} at {k:g}R ({k * record:.0f} s): {n} epochs", flush=True)
                scoring = record_eval if k == 1 else other_eval
                run = reference if (name == REFERENCE and n == epochs) else None
                run = run or compare.run_one(name, data, runner, scoring, cpu, seed, n, False)
                report["runs"].append({**run, "method": f"{name} @{k:g}R", "budget_seconds": k * record})
                save()
    report["elapsed_seconds"] = time.perf_counter() - started
    print(compare.write_outputs(report, out))
    save()
    print(frontier_table(report))
    plot(report, out / "frontier.png")
    return report


def _prior_record(path: str, report: dict, seeds: list[int], other_device: bool = False) -> dict[str, float]:
    """R per seed from an earlier frontier report, which must have scored the same way on the same images, on the
    same processor (R is seconds: on a faster machine the same seconds buy more epochs) unless ``other_device``."""
    prior = json.loads(Path(path).read_text())
    for key in ("benchmark", "dataset", "split", "epochs", "eval"):
        if prior.get(key) != json.loads(json.dumps(report[key], default=str)):
            raise SystemExit(f"--record-from {path}: its {key} differs from this run's ({prior.get(key)!r})")
    if prior.get("device") != report.get("device"):
        if not other_device:
            raise SystemExit(
                f"--record-from {path}: it ran on {prior.get('device')!r}, this run on {report.get('device')!r}; "
                "R is seconds on that machine: train the default here too, or pass --other-device"
            )
        report["record_device"] = prior.get("device")
    missing = [s for s in seeds if str(s) not in prior["budgets"]]
    if missing:
        raise SystemExit(f"--record-from {path}: no record budget for seed(s) {missing}")
    return {seed: budgets["1R"] for seed, budgets in prior["budgets"].items()}


def _points(report: dict) -> dict[str, list[tuple[float, float, float]]]:
    """Per method (budget suffix removed): ``(mean seconds, mean robust, mean clean)`` per budget."""
    eps = max(report["eval"]["epsilons"])
    groups: dict[str, dict[str, list[dict]]] = {}
    for run in report["runs"]:
        name, _, budget = run["method"].rpartition(" @")
        groups.setdefault(name, {}).setdefault(budget, []).append(run)
    points = {}
    for name, budgets in groups.items():
        rows = []
        for runs in budgets.values():
            seconds = statistics.fmean(r["train_seconds"] for r in runs)
            robust = statistics.fmean(compare._robust(r, eps) or 0.0 for r in runs)
            clean = statistics.fmean(r["robustness"]["clean_accuracy"] for r in runs)
            rows.append((seconds, robust, clean))
        points[name] = sorted(rows)
    return points


def _by_budget(report: dict) -> list[tuple[str, list[dict]]]:
    """The runs grouped by budget (``"0.5R"``, ...), smallest first, each named without its ``" @budget"``."""
    groups: dict[str, list[dict]] = {}
    for run in report["runs"]:
        name, _, budget = run["method"].rpartition(" @")
        groups.setdefault(budget, []).append(dict(run, method=name))
    return sorted(groups.items(), key=lambda item: float(item[0][:-1]))


def frontier_table(report: dict) -> str:
    """Per budget: each row's time, clean and robust accuracy, and its paired difference from the default's row
    at that budget (95 % t-interval over seeds; ALF where it was scored, at the record budget)."""
    eps = max(report["eval"]["epsilons"])
    lines = []
    for budget, runs in _by_budget(report):
        differences = {d["method"]: d for d in compare.paired_differences(runs, eps, REFERENCE)}
        alf = _alf_differences(runs, eps)
        head = "| row | epochs | train (s) | clean (%) | robust (%) | per seed | Δ robust vs the default [95 %] "
        head += "| Δ clean |"
        lines += [
            f"#### {budget} (R = the default's time for the recipe's epochs on the same seed)",
            "",
            head + (" ALF robust (%) | Δ ALF robust [95 %] |" if alf is not None else ""),
            "|---|---|---:|---:|---:|---|---|---:|" + ("---:|---|" if alf is not None else ""),
        ]
        for name in sorted(dict.fromkeys(r["method"] for r in runs), key=lambda n: n != REFERENCE):
            mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
            epochs = sorted({r["epochs"] for r in mine})
            span = "–".join(str(e) for e in (epochs[0], epochs[-1]) if len(epochs) > 1) or str(epochs[0])
            cells = [name, span, *_row_cells(mine, eps, differences.get(name), alf)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _alf_differences(runs: list[dict], eps: float, reference: str = REFERENCE) -> dict[str, dict] | None:
    """Paired ALF differences from ``reference`` by row, or None where no run of these was scored with ALF."""
    alf_runs = [dict(r, robustness=r["protocols"]["alf"]["robustness"]) for r in runs if "alf" in r["protocols"]]
    return {d["method"]: d for d in compare.paired_differences(alf_runs, eps, reference)} if alf_runs else None


def versus_table(report: dict, reference: str) -> str:
    """Every row paired with ``reference`` (robust, clean and ALF robust differences, 95 % t-interval over
    seeds), at each budget where ``reference`` ran; the last column says whether the row trained in the same
    batch (results folder) as the reference on every seed: across batches the machine's speed may have changed
    the epochs a budget buys."""
    eps = max(report["eval"]["epsilons"])
    lines = [
        f"#### Paired with {reference}",
        "",
        "| budget | row | Δ robust [95 %] | Δ clean | Δ ALF robust [95 %] | batch |",
        "|---|---|---|---:|---|---|",
    ]
    for budget, runs in _by_budget(report):
        if reference not in {r["method"] for r in runs}:
            continue
        alf = _alf_differences(runs, eps, reference) or {}
        for d in compare.paired_differences(runs, eps, reference):
            a = alf.get(d["method"])
            cells = [budget, d["method"], _verdict(d["robust"]), f"{100 * d['clean']['mean']:+.1f}"]
            cells += [_verdict(a["robust"]) if a else "", _same_batch(runs, d["method"], reference)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_batch(report: dict, path: str | Path) -> dict:
    """``report`` with each run marked by the results folder it came from (its batch), unless already marked."""
    batch = re.sub(r"seed\d+", "seed?", Path(path).parent.name)  # one name for a batch's per-seed folders
    for key in ("runs", "budget_runs", "timing_runs"):
        for run in report.get(key, []):
            run.setdefault("batch", batch)
    return report


def _same_batch(runs: list[dict], method: str, reference: str) -> str:
    """``same`` where ``method`` trained in the reference's batch on every seed, else both batches named."""
    batches = {r["seed"]: r.get("batch") for r in runs if r["method"] == reference}
    mine = {r["seed"]: r.get("batch") for r in runs if r["method"] == method}
    if None in batches.values() or None in mine.values():
        return ""
    if all(batches.get(seed) == batch for seed, batch in mine.items()):
        return "same"
    names = lambda found: "/".join(sorted(set(found.values())))  # noqa: E731
    return f"**other**: {names(mine)} vs {names(batches)}"


def _row_cells(runs: list[dict], eps: float, d: dict | None, alf: dict[str, dict] | None) -> list[str]:
    """One row's seconds, clean, robust, per-seed robust, paired differences and (where scored) ALF cells."""
    robust = [compare._robust(r, eps) or 0.0 for r in runs]
    cells = [
        f"{statistics.fmean(r['train_seconds'] for r in runs):.0f}",
        compare._fmt([r["robustness"]["clean_accuracy"] for r in runs]),
        compare._fmt(robust),
        ", ".join(f"{100 * v:.1f}" for v in robust),
    ]
    cells += ["", ""] if d is None else [_verdict(d["robust"]), f"{100 * d['clean']['mean']:+.1f}"]
    if alf is not None:
        scores = [compare._robust(r["protocols"]["alf"], eps) for r in runs if "alf" in r.get("protocols", {})]
        cells.append(compare._fmt([v or 0.0 for v in scores]) if scores else "")
        cells.append(_verdict(alf[runs[0]["method"]]["robust"]) if runs[0]["method"] in alf else "")
    return cells


def _posthoc_budgets(report: dict) -> dict[str, list[dict]]:
    """Per stage budget of a ``posthoc.py`` report (``0.5B``, ``1B``): its stage rows (``simclr+deacl[1B]``: plain
    SimCLR, then the stage; their time is the total) renamed ``SimCLR → deacl``, with that run's default from
    scratch at the same total time as the reference row (at ``1B``: the default's own 30-epoch row)."""
    budgets: dict[str, list[dict]] = {}
    for run in report["runs"]:
        name = run["method"]
        if name == REFERENCE:
            budgets.setdefault("1B", []).append(run)
        elif name.startswith(f"{REFERENCE}[scratch "):
            budgets.setdefault(name[len(REFERENCE) + len("[scratch ") : -1], []).append(dict(run, method=REFERENCE))
        elif name.startswith("simclr+") and name.endswith("B]"):
            stage, budget = name[len("simclr+") :].rsplit("[", 1)
            budgets.setdefault(budget[:-1], []).append(dict(run, method=f"SimCLR → {stage}"))
    return dict(sorted(budgets.items(), key=lambda item: float(item[0][:-1])))


def posthoc_table(report: dict) -> str:
    """The pretrained-backbone route on the frontier's axes: each stage's total time (plain pretraining + stage),
    accuracy and paired difference from the post-hoc run's default from scratch at the same total time."""
    eps = max(report["eval"]["epsilons"])
    lines = [
        "#### The pretrained-backbone route: plain SimCLR, then a label-free stage (posthoc.py's run)",
        "",
        "B = R - P: the default's time beyond plain pretraining (P) in that run; a stage at kB totals P + kB.",
        "",
        "| row | stage budget | total (s) | clean (%) | robust (%) | per seed | Δ robust vs the default from scratch, "
        "same total time [95 %] | Δ clean | ALF robust (%) | Δ ALF robust [95 %] |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for budget, runs in _posthoc_budgets(report).items():
        differences = {d["method"]: d for d in compare.paired_differences(runs, eps, REFERENCE)}
        alf = _alf_differences(runs, eps) or {}
        for name in sorted(dict.fromkeys(r["method"] for r in runs), key=lambda n: n != REFERENCE):
            mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
            label = "the default from scratch" if name == REFERENCE else name
            lines.append("| " + " | ".join([label, budget, *_row_cells(mine, eps, differences.get(name), alf)]) + " |")
    return "\n".join(lines) + "\n"


def _verdict(d: dict) -> str:
    span = "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return f"{100 * d['mean']:+.1f}{span} {d['verdict']}"


def plot(report: dict, path: Path, posthoc: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (robust_ax, clean_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = iter(plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])  # 20 distinct lines
    lines = [(name, rows, "o", "-") for name, rows in _points(report).items()]
    lines.sort(key=lambda line: line[0] != REFERENCE)
    if posthoc is not None:  # the pretrained-backbone route, dashed: its time is plain pretraining + the stage
        stages = [
            dict(r, method=f"{r['method']} (plain SimCLR + stage; post-hoc run) @{budget}")
            for budget, runs in _posthoc_budgets(posthoc).items()
            for r in runs
            if r["method"] != REFERENCE
        ]
        lines += [(name, rows, "s", "--") for name, rows in _points(dict(posthoc, runs=stages)).items()]
    for name, rows, marker, style in lines:
        seconds, color = [s for s, _, _ in rows], next(colors)
        for ax, values in ((robust_ax, [r for _, r, _ in rows]), (clean_ax, [c for _, _, c in rows])):
            ax.plot(seconds, [100 * v for v in values], marker=marker, linestyle=style, color=color, label=name)
    robust_ax.set(xlabel="training seconds (mean over seeds)", ylabel="robust accuracy @ the main eps (%)")
    clean_ax.set(xlabel="training seconds (mean over seeds)", ylabel="clean accuracy (%)")
    robust_ax.set_title("per-sample worst case (an upper estimate of robust accuracy)", fontsize=9)
    clean_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
