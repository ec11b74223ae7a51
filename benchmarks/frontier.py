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
    python benchmarks/frontier.py --plot benchmarks/results/frontier-cifar10-subset/seed*/results.json \\
        --out benchmarks/results/frontier-cifar10-subset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--plot", nargs="+", metavar="RESULTS_JSON", help="only plot (and table) merged results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        report = compare.merge_reports([json.loads(Path(p).read_text()) for p in args.plot])
        table = frontier_table(report)
        (out / "frontier.md").write_text(table)
        print(table)
        plot(report, out / "frontier.png")
        return report
    names = compare.split_methods(args.methods)
    if REFERENCE not in names:
        raise SystemExit(f"--methods must include {REFERENCE}: its time sets the budgets")
    multiples = [float(b) for b in args.budgets.split(",")]
    data, eval_config, epochs, report = compare.script_setup("frontier", args, argv, quick_epochs=2)
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


def frontier_table(report: dict) -> str:
    """Per budget: each row's time, clean and robust accuracy, and its paired difference from the default's row
    at that budget (95 % t-interval over seeds; ALF where it was scored, at the record budget)."""
    eps = max(report["eval"]["epsilons"])
    by_budget: dict[str, list[dict]] = {}
    for run in report["runs"]:
        name, _, budget = run["method"].rpartition(" @")
        by_budget.setdefault(budget, []).append(dict(run, method=name))
    lines = []
    for budget, runs in sorted(by_budget.items(), key=lambda item: float(item[0][:-1])):
        differences = {d["method"]: d for d in compare.paired_differences(runs, eps, REFERENCE)}
        alf_runs = [dict(r, robustness=r["protocols"]["alf"]["robustness"]) for r in runs if "alf" in r["protocols"]]
        alf = {d["method"]: d for d in compare.paired_differences(alf_runs, eps, REFERENCE)} if alf_runs else None
        head = "| row | epochs | train (s) | clean (%) | robust (%) | per seed | Δ robust vs the default [95 %] "
        head += "| Δ clean |"
        lines += [
            f"#### {budget} (R = the default's time for the recipe's epochs on the same seed)",
            "",
            head + (" ALF robust (%) | Δ ALF robust [95 %] |" if alf is not None else ""),
            "|---|---|---:|---:|---:|---|---|---:|" + ("---:|---|" if alf is not None else ""),
        ]
        for name in dict.fromkeys(r["method"] for r in runs):
            mine = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
            robust = [compare._robust(r, eps) or 0.0 for r in mine]
            epochs = sorted({r["epochs"] for r in mine})
            cells = [
                name,
                "–".join(str(e) for e in (epochs[0], epochs[-1]) if len(epochs) > 1) or str(epochs[0]),
                f"{statistics.fmean(r['train_seconds'] for r in mine):.0f}",
                compare._fmt([r["robustness"]["clean_accuracy"] for r in mine]),
                compare._fmt(robust),
                ", ".join(f"{100 * v:.1f}" for v in robust),
            ]
            d = differences.get(name)
            cells += ["", ""] if d is None else [_verdict(d["robust"]), f"{100 * d['clean']['mean']:+.1f}"]
            if alf is not None:
                scores = [compare._robust(r["protocols"]["alf"], eps) for r in mine if "alf" in r.get("protocols", {})]
                cells.append(compare._fmt([v or 0.0 for v in scores]) if scores else "")
                cells.append(_verdict(alf[name]["robust"]) if name in alf else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _verdict(d: dict) -> str:
    span = "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return f"{100 * d['mean']:+.1f}{span} {d['verdict']}"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (robust_ax, clean_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in _points(report).items():
        seconds = [s for s, _, _ in rows]
        robust_ax.plot(seconds, [100 * r for _, r, _ in rows], marker="o", label=name)
        clean_ax.plot(seconds, [100 * c for _, _, c in rows], marker="o", label=name)
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
