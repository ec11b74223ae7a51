"""What each evaluation mode costs and reports, side by side, on one saved encoder.

Runs SLF (the L-BFGS linear probe), ALF and AFF under each schedule asked for, the
corruption accuracy of each resulting classifier, and the label-free embedding
attack, timing each stage in one process. Every classifier is scored with the same
attacks (PGD-20, plus AutoAttack on the first ``--aa-samples`` test images unless
``--no-autoattack``) and the per-sample worst case. Writes ``results.json`` and
``results.md`` to ``--out``.

    python benchmarks/protocols.py CHECKPOINT --dataset cifar10-subset \\
        --data-path ../shared/cifar10-subset/cifar10_subset.npz --schedules alf:cpu,aff:cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from robust_reg.corruptions import corruption_accuracy
from robust_reg.demo.checkpoints import load_checkpoint
from robust_reg.demo.data import load_dataset
from robust_reg.demo.pipeline import (
    FINETUNE_SCHEDULES,
    EvalConfig,
    ShuffledBatches,
    crop_flip,
    device_name,
    fixed_batches,
)
from robust_reg.embedding_attack import embedding_attack
from robust_reg.evaluation import PGD, AutoAttack, LinearProbeClassifier, evaluate_robustness
from robust_reg.finetune import adversarial_finetune, fit_adversarial_linear_probe
from robust_reg.probe import extract_features, fit_linear_probe


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-path", default=None)
    p.add_argument(
        "--schedules",
        default="alf:cpu,aff:cpu",
        help="comma-separated mode:schedule[:field=value;...] (schedules: cpu, paper; fields of FinetuneSchedule)",
    )
    p.add_argument("--aa-samples", type=int, default=200)
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/protocols")
    return p.parse_args(argv)


def schedule_of(spec: str):
    """``alf:cpu`` or ``aff:cpu:lr=0.1;epochs=3`` -> (label, mode, FinetuneSchedule)."""
    mode, base, *rest = spec.split(":")
    schedule = FINETUNE_SCHEDULES[base][mode]
    if rest:
        fields = dict(kv.split("=") for kv in rest[0].split(";"))
        types = {f.name: f.type for f in dataclasses.fields(schedule)}
        typed: dict = {
            k: (int(v) if types[k] in ("int", int) else float(v)) for k, v in fields.items() if k != "milestones"
        }
        if "milestones" in fields:
            typed["milestones"] = tuple(int(m) for m in fields["milestones"].split("/") if m)
        schedule = dataclasses.replace(schedule, **typed)
    return spec, mode, schedule


def score(model, data, epsilons, attacks, seed) -> dict:
    start = time.perf_counter()
    ev = evaluate_robustness(model, data.x_test, data.y_test, epsilons=epsilons, attacks=attacks, seed=seed)
    attack_seconds = time.perf_counter() - start
    start = time.perf_counter()
    corr = corruption_accuracy(model, data.x_test, data.y_test, seed=seed)
    return {
        "clean": ev.clean_accuracy,
        "robust": {f"{e:g}": ev.robust_accuracy(e) for e in epsilons},
        "pgd": {f"{e:g}": ev.accuracy("PGD-20", e) for e in epsilons},
        "autoattack": {f"{e:g}": ev.accuracy("AutoAttack", e) for e in epsilons},
        "checks_passed": ev.passed,
        "attack_seconds": attack_seconds,
        "corruptions": corr.mean_accuracy,
        "corruption_seconds": time.perf_counter() - start,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    encoder, meta = load_checkpoint(args.checkpoint)
    data = load_dataset(args.dataset or meta["dataset"], path=args.data_path)
    config = EvalConfig.for_data(data)
    epsilons, eps = list(config.epsilons), max(config.epsilons)
    attacks = [PGD(20)] + ([] if args.no_autoattack else [AutoAttack(samples=args.aa_samples)])
    schedules = [schedule_of(s) for s in args.schedules.split(",")]  # a typo fails before any work
    rows = []

    start = time.perf_counter()
    head = fit_linear_probe(encoder, fixed_batches(data.x_train, data.y_train), data.num_classes)
    rows.append({"mode": "slf", "schedule": "L-BFGS probe", "seconds": time.perf_counter() - start})
    rows[-1].update(score(LinearProbeClassifier(encoder, head).eval(), data, epsilons, attacks, args.seed))
    print(rows[-1], flush=True)
    for label, mode, schedule in schedules:
        loader = ShuffledBatches(data.x_train, data.y_train, schedule.batch_size, args.seed)
        common = dict(epsilon=eps, schedule=schedule, augment=crop_flip(data.kind != "digits", args.seed))
        start = time.perf_counter()
        if mode == "alf":
            model = LinearProbeClassifier(
                encoder, fit_adversarial_linear_probe(encoder, loader, data.num_classes, **common)
            ).eval()
        else:
            model = adversarial_finetune(encoder, loader, data.num_classes, **common)
        rows.append({"mode": mode, "schedule": label, "seconds": time.perf_counter() - start})
        rows[-1].update(score(model, data, epsilons, attacks, args.seed))
        print(rows[-1], flush=True)

    start = time.perf_counter()
    attack = embedding_attack(encoder, data.x_test, epsilon=eps, steps=20, seed=args.seed)
    train_features, _ = extract_features(encoder, fixed_batches(data.x_train, data.y_train))
    knn = attack.knn_changed(train_features, data.y_train, k=20)
    embedding = {**attack.to_dict(), "knn_changed": knn, "seconds": time.perf_counter() - start}
    report = {
        "benchmark": "protocols",
        "command": " ".join(["python", "benchmarks/protocols.py", *(argv if argv is not None else sys.argv[1:])]),
        "checkpoint": meta,
        "dataset": data.name,
        "train_images": len(data.x_train),
        "test_images": len(data.x_test),
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "rows": rows,
        "embedding_attack": embedding,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report, epsilons)
    (out / "results.md").write_text(md)
    print(md)
    return report


def markdown(report: dict, epsilons: list[float]) -> str:
    keys = [f"{e:g}" for e in epsilons]
    head = ["mode", "schedule", "fine-tune (s)", "clean (%)"]
    head += [f"robust @{k} (%)" for k in keys] + [f"PGD-20 @{k} (%)" for k in keys]
    head += ["AutoAttack @" + keys[-1] + " (%)", "corruptions (%)", "attacks (s)", "corruptions (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    for r in report["rows"]:
        cells = [r["mode"].upper(), r["schedule"], f"{r['seconds']:.0f}", pct(r["clean"])]
        cells += [pct(r["robust"][k]) for k in keys] + [pct(r["pgd"][k]) for k in keys]
        cells += [pct(r["autoattack"][keys[-1]]), pct(r["corruptions"])]
        cells += [f"{r['attack_seconds']:.0f}", f"{r['corruption_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    e = report["embedding_attack"]
    lines += [
        "",
        f"Embedding attack (PGD-20 at eps {e['epsilon']:.4g}, {e['num_samples']} test images, {e['seconds']:.0f} s "
        f"with the k-NN reading): deviation / sigma mean {e['mean_relative_deviation']:.3f}, 95th percentile "
        f"{e['p95_relative_deviation']:.3f} (a random point of the ball: {e['random_mean_relative_deviation']:.3f}); "
        f"20-NN predictions changed on {100 * e['knn_changed']:.1f} % of test images.",
        "",
        f"{report['dataset']}: {report['train_images']} training / {report['test_images']} test images; robust = "
        "per-sample worst case of clean, PGD-20 and AutoAttack (where run; attack accuracies are estimates). "
        f"Command: `{report['command']}` on {report['device']}, torch {report['torch']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
