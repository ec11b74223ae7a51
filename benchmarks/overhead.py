"""Cost of the regulariser: one SimCLR training step, plain vs. regularised vs. adversarial contrastive.

Measures forward + backward of a whole SimCLR step (two views through the
backbone and lightly's projection head, NT-Xent loss) with and without
``RobustnessRegularizer`` on the backbone (steps 1 and 3, features reused or
recomputed); the package's recommended form (the regulariser on the embedding NT-Xent
compares, its adversarial embedding fed to the loss) with 0.2's PGD-3 and with 0.3's
default N-FGSM step, written as a plain loop and through the lightly adapter (``robustify`` on a lightly-style
LightningModule); the warm-started step (the ascent from where each image's last
one ended, kept in a ``PerturbationMemory``), as a plain loop and through the
lightly adapter, also moved with each view's crop (``geometry=``); and the
ACL-style baseline (PGD-5 on the SSL loss). The default and ACL rows run the
training step of ``benchmarks/compare.py``. On a
CIFAR-size ResNet-18 and on a small CNN for 28x28 inputs.

Time: all configurations run interleaved in one process (round-robin, in a
shuffled order each round) after warm-up; each configuration's median over the
repeats is divided by the plain step's median. Memory: on CUDA the peak
allocated memory of one step; on CPU the peak resident-set increase of one
step, each configuration in a fresh process (Linux ``VmHWM``), divided by the
plain step's.

    python benchmarks/overhead.py                 # CPU by default, GPU when present
    python benchmarks/overhead.py --device cpu --repeats 15

Writes ``benchmarks/results/overhead-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from robust_reg import (
    BackboneRobustnessRegularizer,
    PerturbationMemory,
    RobustnessRegularizer,
    ThreatModel,
    crop_geometry,
)
from robust_reg.demo.models import build_encoder
from robust_reg.demo.pipeline import device_name

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the screening harness beside this script
from harness import (  # noqa: E402
    PretrainConfig,
    acl_ds_step,
    add_dual_batch_norm,
    add_dual_batch_norm_and_ema,
    build_model,
    free_step,
    regularizer_for,
    reuse_step,
    step_loss,
    warm_start_step,
)

EPSILON = 8 / 255
# name -> (kind, options): "backbone" = reg on model.backbone; "recipe" = compare.py's step for a variant.
CONFIGS = {
    "plain": ("recipe", {"variant": "plain"}),
    "reg steps=1, reused features": ("backbone", {"steps": 1, "reuse": True}),
    "reg steps=1, own clean forward": ("backbone", {"steps": 1, "reuse": False}),
    "reg steps=3, reused features": ("backbone", {"steps": 3, "reuse": True}),
    "reg steps=3, own clean forward": ("backbone", {"steps": 3, "reuse": False}),
    # "0.2's default" rows pin PGD-3 (the harness's own default); 0.3's default is the N-FGSM rows below (the
    # annealed augmentation it adds does not change a step's cost).
    "0.2's default (embedding + adversarial view, positive ascent, steps=3)": ("recipe", {"variant": "robust"}),
    "robust-reg, instance ascent (0.3.0-dev's default)": ("recipe", {"variant": "robust", "ascent": "instance"}),
    "robust-reg, deviation ascent (an earlier default, before 0.2.0)": (
        "recipe",
        {"variant": "robust", "ascent": "deviation"},
    ),
    "0.2's default through the lightly adapter (inner='pgd')": ("lightly", {"inner": "pgd"}),
    "0.3's default through the lightly adapter (N-FGSM)": ("lightly", {}),
    "ACL-style (PGD-5 on the SSL loss)": ("recipe", {"variant": "acl"}),
    # Cheaper candidates of the default, screened in benchmarks/results/screen-mnist5k/:
    "robust-reg, detached anchor (detach_anchor=True)": ("recipe", {"variant": "robust", "detach_anchor": True}),
    "robust-reg, half the batch perturbed (adversarial_fraction=0.5)": (
        "recipe",
        {"variant": "robust", "adversarial_fraction": 0.5},
    ),
    "robust-reg, steps=2": ("recipe", {"variant": "robust", "steps": 2}),
    "robust-reg, ascent from the clean input (random_start=False: one forward fewer)": (
        "recipe",
        {"variant": "robust", "random_start": False},
    ),
    "robust-reg, random_start=False and detach_anchor=True": (
        "recipe",
        {"variant": "robust", "random_start": False, "detach_anchor": True},
    ),
    "ACL-style, PGD-3": ("recipe", {"variant": "acl", "acl_steps": 3}),
    # The cost issue's candidates and peers: one ascent step of 1.25 eps from a random start (FGSM-RS), ACL as
    # published (both views, PGD-5, dual BatchNorm) and DynACL's step (the same with its momentum encoder).
    "robust-reg, one step of 1.25 eps (FGSM-RS)": (
        "recipe",
        {"variant": "robust", "steps": 1, "step_size": 1.25 * EPSILON},
    ),
    "0.3's default: N-FGSM (noise of 2 eps, one step of eps, not projected to eps)": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm"},
    ),
    "robust-reg, N-FGSM with the detached anchor (detach_anchor=True)": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm", "detach_anchor": True},
    ),
    # N-FGSM, then one more ascent step for the quarter of view 0 it moved least (harness refine=0.25).
    "N-FGSM + one more step on the least-moved quarter (harness refine=0.25)": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm", "refine": 0.25},
    ),
    # N-FGSM's sign step taken at the clean view, in its clean pass (the anchor): one forward fewer.
    "N-FGSM from the clean gradient (harness inner='n-fgsm-clean')": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm-clean"},
    ),
    "N-FGSM from the clean gradient, detached anchor": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm-clean", "detach_anchor": True},
    ),
    # N-FGSM itself, its noisy pass also the anchor: view 0 has no clean pass, one forward fewer.
    "N-FGSM with the noisy anchor (harness inner='n-fgsm-noisy')": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm-noisy"},
    ),
    "N-FGSM with the noisy anchor, detached": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm-noisy", "detach_anchor": True},
    ),
    # The same step in the package: RobustnessRegularizer(inner="n-fgsm-start"), called without view 0's clean
    # features (the rows were labelled "0.3's default with anchor='start'" in overhead-cpu-0.11.json).
    "inner='n-fgsm-start' (package)": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm", "anchor": "start"},
    ),
    "inner='n-fgsm-start', detach_anchor=True (package)": (
        "recipe",
        {"variant": "robust", "inner": "n-fgsm", "anchor": "start", "detach_anchor": True},
    ),
    "inner='n-fgsm-start' through the lightly adapter": ("lightly", {"inner": "n-fgsm-start"}),
    "inner='n-fgsm-start', detach_anchor=True through the lightly adapter": (
        "lightly",
        {"inner": "n-fgsm-start", "detach_anchor": True},
    ),
    "ACL as published (ACL-DS: both views, PGD-5, dual BatchNorm)": ("dual", {"variant": "acl-ds"}),
    "DynACL step (ACL-DS with its momentum encoder)": ("dual", {"variant": "dynacl"}),
    # robust_reg.harden's step on a pretrained encoder: one view, the teacher's features given (cached).
    "harden step (one view, the frozen teacher's features cached)": ("harden", {}),
    # The warm start: steps=2 of eps/2 from each image's stored perturbation (PerturbationMemory: the index
    # check, gather and scatter included); the training runs also ramp eps, which does not change a step's cost.
    "robust-reg, warm start (memory=, steps=2)": ("warm", {"steps": 2, "step_size": EPSILON / 2}),
    "robust-reg, warm start (memory=, steps=2) and detach_anchor=True": (
        "warm",
        {"steps": 2, "step_size": EPSILON / 2, "detach_anchor": True},
    ),
    "the same through the lightly adapter (warm_start=True)": (
        "lightly",
        {"warm_start": True, "steps": 2, "step_size": EPSILON / 2, "detach_anchor": True},
    ),
    # Kept in image coordinates and moved with each view's crop (geometry=: two resamplings per step).
    "robust-reg, warm start warped through the crops (geometry=), detach_anchor=True": (
        "warm",
        {"steps": 2, "step_size": EPSILON / 2, "detach_anchor": True, "warp": True},
    ),
    # No ascent pass: the training backward's input gradient moves the stored perturbation (harness inner="reuse").
    "robust-reg, gradient reuse (free step from the memory, detached anchor)": ("warm", {"inner": "reuse"}),
    # Free training's minibatch replay (harness inner="free"): one timed "step" is a whole batch, its replays each
    # a forward and backward (and, in training, an optimizer step), the first drawing the detached anchor.
    "free training, a batch of 2 replays, detached anchor (2 optimizer steps)": (
        "free",
        {"replays": 2, "detach_anchor": True},
    ),
    "free training, a batch of 2 replays, the anchor's gradient (2 optimizer steps)": ("free", {"replays": 2}),
    "free training, a batch of 4 replays, detached anchor (4 optimizer steps)": (
        "free",
        {"replays": 4, "detach_anchor": True},
    ),
    "the same warped, through the lightly adapter (geometry=)": (
        "lightly",
        {"warm_start": True, "steps": 2, "step_size": EPSILON / 2, "detach_anchor": True, "warp": True},
    ),
}
MODELS = {"cnn": ("cnn", (1, 28, 28)), "resnet18": ("resnet18", (3, 32, 32))}


def _lightly_module(model: torch.nn.Module, **options):
    """The same SimCLR written as a lightly user writes it (a LightningModule), robustified in one line."""
    import pytorch_lightning as pl

    from robust_reg.integrations.lightly import robustify

    class SimCLR(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.projection_head, self.criterion = model.backbone, model.projection_head, model.criterion

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def training_step(self, batch, batch_index):
            (x0, x1) = batch[0]
            return self.criterion(self.forward(x0), self.forward(x1))

    options = dict(options)
    if options.get("warm_start"):
        options["index"] = _third_field
    if options.pop("warp", False):
        options["geometry"] = _fourth_field
    return robustify(SimCLR(), epsilon=EPSILON, normalize=None, log=False, **options)


def _third_field(batch):
    return batch[2]


def _fourth_field(batch):
    return batch[3]


def _crops(batch_size: int, device: torch.device) -> torch.Tensor:
    """Random crops of half to all of the image, as ``crop_geometry`` returns them (the warped rows)."""
    side = torch.randint(14, 29, (batch_size, 1), device=device)
    corner = (torch.rand(batch_size, 2, device=device) * (28 - side)).floor()
    return crop_geometry(torch.cat([corner, side, side], dim=1), (28, 28))


def make_step(model_name: str, config: str, batch_size: int, device: torch.device):
    """Build the model and inputs; return a closure running one forward+backward step."""
    torch.manual_seed(0)
    arch, shape = MODELS[model_name]
    model = build_model("simclr", build_encoder(arch, shape[0]), shape).to(device).train()
    x0 = torch.rand(batch_size, *shape, device=device)
    x1 = torch.rand(batch_size, *shape, device=device)
    kind, options = CONFIGS[config]
    if kind == "free":
        return _free_batch(model, x0, PretrainConfig(variant="robust", epsilon=EPSILON, inner="free", **options))
    if kind == "recipe":
        recipe = PretrainConfig(method="simclr", epsilon=EPSILON, **options)
        reg, threat = regularizer_for(recipe), ThreatModel(EPSILON)

        def loss() -> torch.Tensor:
            return step_loss(model, reg, threat, x0, x1, recipe)[0]

    elif kind == "warm":
        options = dict(options)
        warp = {"geometry": _crops(batch_size, device)} if options.pop("warp", False) else {}
        recipe = PretrainConfig(method="simclr", variant="robust", epsilon=EPSILON, warm_start=True, **options)
        reg = regularizer_for(recipe)
        memory = PerturbationMemory(num_samples=4 * batch_size)  # one perturbation per training image
        index = torch.randperm(4 * batch_size, device=device)[:batch_size]

        warm_step = reuse_step if recipe.inner == "reuse" else functools.partial(warm_start_step, reg=reg)

        def loss() -> torch.Tensor:
            return warm_step(model, x0=x0, x1=x1, config=recipe, start=memory.at(index, warp.get("geometry")))[0]

    elif kind == "lightly":
        crops = [_crops(batch_size, device), _crops(batch_size, device)] if options.get("warp") else None
        module = _lightly_module(model, **options)
        index = torch.randperm(4 * batch_size, device=device)[:batch_size]

        def loss() -> torch.Tensor:
            return module.training_step(([x0, x1], None, index, crops), 0)

    elif kind == "dual":
        recipe = PretrainConfig(method="simclr", epsilon=EPSILON, epochs=30, **options)
        (add_dual_batch_norm_and_ema if recipe.ema else add_dual_batch_norm)(model)
        threat = ThreatModel(EPSILON)

        def loss() -> torch.Tensor:
            return acl_ds_step(model, threat, x0, x1, recipe, 0)[0]

    elif kind == "harden":
        reg = RobustnessRegularizer(EPSILON, detach_anchor=True)
        reg._refuse_equal_positive = False  # as harden: the student starts as the teacher's copy
        with torch.no_grad():
            teacher = model.backbone(x0).flatten(1)

        def loss() -> torch.Tensor:
            with torch.no_grad():  # as harden: the detached anchor's pass records no graph
                clean = model.backbone(x0)
            out = reg(model.backbone, x0, features=clean, positive=teacher)
            align = 2 - 2 * torch.nn.functional.cosine_similarity(out.adversarial_features.flatten(1), teacher)
            return align.mean() + out.loss

    else:
        reg = BackboneRobustnessRegularizer(EPSILON, steps=options["steps"])

        def loss() -> torch.Tensor:
            h0, h1 = model.backbone(x0), model.backbone(x1)
            ssl = model.loss_from_features((x0, x1), (h0, h1))
            return ssl + reg(model.backbone, x0, features=h0 if options["reuse"] else None).loss

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    return step


def _free_batch(model: torch.nn.Module, x: torch.Tensor, recipe: PretrainConfig):
    """One batch of free training: ``recipe.replays`` forward+backward replays on the same views (no augmentation,
    as the other rows)."""

    def step() -> None:
        state: dict = {}  # a new batch: its views, anchor and start are drawn in the first replay
        for _ in range(recipe.replays):
            model.zero_grad(set_to_none=True)
            free_step(model, x, torch.clone, recipe, state)[0].backward()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_configs(model_name: str, batch_size: int, device: torch.device, repeats: int, warmup: int) -> dict:
    steps = {name: make_step(model_name, name, batch_size, device) for name in CONFIGS}
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    order = list(CONFIGS)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()} | {
        "_samples": {name: values for name, values in samples.items()}
    }


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def peak_memory_one_step(model_name: str, config: str, batch_size: int, device: torch.device) -> float:
    """Peak extra memory (bytes) of one step; on CPU call this in a fresh process."""
    step = make_step(model_name, config, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    base = _status_kib("VmRSS")
    step()
    return float((_status_kib("VmHWM") - base) * 1024)


def memory_configs(model_name: str, batch_size: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return {name: peak_memory_one_step(model_name, name, batch_size, device) for name in CONFIGS}
    if not Path("/proc/self/clear_refs").exists():
        return {}
    out = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--_memory-child", model_name, name, str(batch_size)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = float(result.stdout.strip().splitlines()[-1])
    return out


def table(results: dict) -> str:
    lines = [
        "| model | batch | configuration | median step (ms) | time ratio | peak memory ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for model_name, r in results["models"].items():
        plain_t, plain_m = r["time"]["plain"], r["memory"].get("plain")
        for name in CONFIGS:
            t = r["time"][name]
            m = r["memory"].get(name)
            mem = f"{m / plain_m:.2f}x" if m is not None and plain_m else "n/a"
            lines.append(f"| {model_name} | {r['batch_size']} | {name} | {1e3 * t:.1f} | {t / plain_t:.2f}x | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size-cnn", type=int, default=None, help="default 256 (CPU) / 512 (GPU)")
    parser.add_argument("--batch-size-resnet18", type=int, default=None, help="default 64 (CPU) / 512 (GPU)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--only", default=None, metavar="REGEX", help="time only the rows it matches (and plain)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead-<device>.json)")
    args = parser.parse_args(argv)
    if args.only:
        global CONFIGS
        CONFIGS = {name: row for name, row in CONFIGS.items() if name == "plain" or re.search(args.only, name)}

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    batch = {
        "cnn": args.batch_size_cnn or (512 if gpu else 256),
        "resnet18": args.batch_size_resnet18 or (512 if gpu else 64),
    }
    results = {
        "benchmark": "overhead",
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "epsilon": EPSILON,
        "memory_measure": "peak CUDA memory allocated during one step"
        if gpu
        else "peak resident-set increase during one step, fresh process per configuration",
        "models": {},
    }
    for model_name in args.models.split(","):
        print(f"[overhead] {model_name}: timing {len(CONFIGS)} configurations x {args.repeats} rounds", flush=True)
        timing = time_configs(model_name, batch[model_name], device, args.repeats, args.warmup)
        samples = timing.pop("_samples")
        memory = {} if args.no_memory else memory_configs(model_name, batch[model_name], device)
        results["models"][model_name] = {
            "batch_size": batch[model_name],
            "time": timing,
            "time_ratio": {k: v / timing["plain"] for k, v in timing.items()},
            "time_samples": samples,
            "memory": memory,
            "memory_ratio": {k: v / memory["plain"] for k, v in memory.items()} if memory.get("plain") else {},
        }
    out = Path(args.out or Path(__file__).parent / "results" / f"overhead-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"[overhead] wrote {out}")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_memory-child":
        torch.manual_seed(0)
        print(peak_memory_one_step(sys.argv[2], sys.argv[3], int(sys.argv[4]), torch.device("cpu")))
    else:
        main()
