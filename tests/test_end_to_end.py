"""End to end: the demo, the evaluate command and the comparison benchmark, on tiny offline data."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

from robust_reg.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_demo_writes_a_report_plots_and_checkpoints(demo_dir):
    summary = json.loads((demo_dir / "demo.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["SimCLR", "SimCLR + robust-reg"]
    for evaluation in summary["evaluations"].values():
        assert {"robustness", "curve", "bound", "main_epsilon"} <= evaluation.keys()
        assert evaluation["robustness"]["results"] and evaluation["robustness"]["checks"]
        assert evaluation["bound"]["adversarial_loss"] <= evaluation["bound"]["bound"] + 1e-6
    assert is_png(demo_dir / "accuracy_vs_eps.png") and is_png(demo_dir / "bound_vs_loss.png")
    for name in ("plain_encoder.pt", "robust_encoder.pt"):
        record = torch.load(demo_dir / name, weights_only=True)
        assert record["arch"] == "cnn" and record["dataset"] == "mnist5k"


def test_demo_robust_encoder_deviates_less_than_the_plain_one(demo_dir):
    evaluations = json.loads((demo_dir / "demo.json").read_text())["evaluations"]
    plain = evaluations["SimCLR"]["bound"]["relative_deviation"]
    robust = evaluations["SimCLR + robust-reg"]["bound"]["relative_deviation"]
    assert robust < plain


def test_evaluate_command_reads_a_demo_checkpoint(demo_dir, tmp_path):
    code = cli(
        [
            "evaluate",
            str(demo_dir / "robust_encoder.pt"),
            "--no-autoattack",
            "--pgd-steps",
            "3",
            "--test-samples",
            "100",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    record = json.loads((tmp_path / "robust_encoder_evaluation.json").read_text())
    assert code == (0 if record["robustness"]["passed"] else 3)  # 3 flags a failed sanity check
    assert record["dataset"] == "mnist5k" and record["meta"]["arch"] == "cnn"
    assert record["robustness"]["num_samples"] == 100
    assert [r["epsilon"] for r in record["curve"]["reports"]][0] == 0.0
    assert is_png(tmp_path / "accuracy_vs_eps.png")


def test_evaluate_rebuilds_a_bare_state_dict_given_its_architecture(demo_dir, tmp_path):
    state = torch.load(demo_dir / "plain_encoder.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pt")
    args = ["evaluate", str(tmp_path / "bare.pt"), "--arch", "cnn", "--in-channels", "1", "--dataset", "mnist5k"]
    args += ["--no-autoattack", "--pgd-steps", "2", "--test-samples", "50", "--no-progress", "--out", str(tmp_path)]
    code = cli(args)
    record = json.loads((tmp_path / "bare_evaluation.json").read_text())
    assert code == (0 if record["robustness"]["passed"] else 3)


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_compare():
    return load_benchmark("compare")


def test_compare_smoke_trains_scores_and_writes_tables_and_plots(tmp_path):
    """The fast form of the next test (the default suite): two rows, the same outputs."""
    compare = load_compare()
    methods = ["simclr", "simclr+robust-reg"]
    report = compare.main(["--quick", "--no-progress", "--methods", ",".join(methods), "--out", str(tmp_path)])
    assert [r["method"] for r in report["runs"]] == methods and report["split"] == "validation"
    table = (tmp_path / "results.md").read_text()
    main_table = table.split("### Fine-tuning modes")[0]
    assert main_table.count("| simclr") == 2 and "**robust** @0.1" in table and "validation split" in table
    assert is_png(tmp_path / "accuracy_vs_eps.png") and is_png(tmp_path / "bound_vs_loss.png")


@pytest.mark.slow  # about 100 s on 2 cores: every default row; the smoke test above keeps the default suite fast
def test_compare_quick_runs_every_method_and_writes_tables_and_plots(tmp_path):
    compare = load_compare()
    report = compare.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert [r["method"] for r in report["runs"]] == list(compare.DEFAULT_METHODS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in report["summary"]] == list(compare.DEFAULT_METHODS)
    for run in saved["runs"]:
        assert run["train_seconds"] > 0 and run["bound"]["num_samples"] > 0
        assert {c["name"] for c in run["robustness"]["checks"]} >= {"accuracy falls to ~0 at a very large eps"}
    table = (tmp_path / "results.md").read_text()
    main_table = table.split("### Fine-tuning modes")[0]
    simclr_rows = [m for m in compare.DEFAULT_METHODS if m.startswith("simclr")]
    assert main_table.count("| simclr") == len(simclr_rows) and "AutoAttack" in main_table
    assert "### Fine-tuning modes, corruptions and the label-free embedding attack" in table
    assert is_png(tmp_path / "accuracy_vs_eps.png") and is_png(tmp_path / "bound_vs_loss.png")
    by_method = {row["method"]: row for row in report["summary"]}
    assert by_method["simclr+reg"]["relative_deviation"][0] < by_method["simclr"]["relative_deviation"][0]
    for run in saved["runs"]:  # the headline worst case and the three label sets, per run
        assert set(run["tasks"]) == {"digit", "parity", "digit>=5"}
        (worst,) = [r for r in run["robustness"]["robust_accuracy"] if r["epsilon"] == 0.1]
        assert worst["accuracy"] <= min(r["accuracy"] for r in run["robustness"]["results"] if r["epsilon"] == 0.1)
    assert "**robust** @0.1" in table and "worst task robust @0.1" in table


@pytest.mark.slow
def test_full_mnist_benchmark_meets_the_targets(tmp_path):
    """The full default benchmark (tens of minutes on 2 cores): the targets of the README."""
    compare = load_compare()
    report = compare.main(["--no-progress", "--out", str(tmp_path)])
    rows = {row["method"]: row for row in report["summary"]}

    def mean(values):
        return sum(values) / len(values)

    plain, robust, reg = rows["simclr"], rows["simclr+robust-reg"], rows["simclr+reg"]
    # What the README claims of this release (its issue's targets against ACL are not met and not asserted).
    assert mean(reg["pgd@0.1"]) >= 0.35 and mean(reg["aa@0.1"]) >= 0.30
    assert mean(robust["pgd@0.1"]) >= 0.80 and mean(robust["clean"]) >= mean(plain["clean"]) - 0.015
    assert mean(rows["byol+robust-reg"]["clean"]) >= mean(rows["byol"]["clean"]) - 0.015
    assert all(row["checks_passed"] == row["seeds"] for row in rows.values())


def test_overhead_benchmark_smoke_times_every_configuration_against_plain(tmp_path):
    """The fast form of the next test: timing only, one repeat, no memory subprocesses."""
    overhead = load_benchmark("overhead")
    out = tmp_path / "overhead.json"
    args = ["--models", "cnn", "--repeats", "1", "--warmup", "0", "--batch-size-cnn", "8", "--device", "cpu"]
    overhead.main([*args, "--no-memory", "--out", str(out)])
    cnn = json.loads(out.read_text())["models"]["cnn"]
    assert set(cnn["time"]) == set(overhead.CONFIGS) and cnn["time_ratio"]["plain"] == 1.0


@pytest.mark.slow  # about 80 s on 2 cores (one subprocess per configuration for the memory figures)
def test_overhead_benchmark_measures_every_configuration_side_by_side(tmp_path):
    overhead = load_benchmark("overhead")
    out = tmp_path / "overhead.json"
    args = ["--models", "cnn", "--repeats", "2", "--warmup", "1", "--batch-size-cnn", "8", "--device", "cpu"]
    results = overhead.main([*args, "--out", str(out)])
    cnn = json.loads(out.read_text())["models"]["cnn"]
    assert set(cnn["time"]) == set(overhead.CONFIGS) == set(cnn["memory"])
    assert cnn["time_ratio"]["plain"] == 1.0 and all(len(v) == 2 for v in cnn["time_samples"].values())
    # A regularised step does strictly more work than a plain one.
    assert cnn["time"]["reg steps=3, own clean forward"] > cnn["time"]["plain"]
    assert results["models"]["cnn"]["memory_ratio"]["plain"] == 1.0


@pytest.mark.parametrize(
    "dataset, extra, variant, weight",
    [
        ("fake", [], True, 1.0),
        ("digits", ["--method", "byol"], True, 0.05),  # each method's recommended weight by default
        ("digits", ["--robust-weight", "0"], False, 1.0),  # plain SSL
    ],
)
def test_pretrain_example_writes_a_checkpoint_the_evaluate_example_reads(
    tmp_path, capsys, dataset, extra, variant, weight
):
    spec = importlib.util.spec_from_file_location("pretrain_example", ROOT / "examples" / "pretrain.py")
    pretrain_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_example)
    checkpoint = tmp_path / "encoder.pt"
    pretrain_example.main(["--dataset", dataset, "--epochs", "1", "--steps", "1", "--out", str(checkpoint), *extra])
    record = torch.load(checkpoint, weights_only=True)
    assert record["dataset"] == dataset and record["config"]["robust"] == variant
    assert record["config"]["weight"] == weight
    args = ["evaluate", str(checkpoint), "--no-autoattack", "--pgd-steps", "2", "--test-samples", "64"]
    capsys.readouterr()
    code = cli([*args, "--no-progress", "--out", str(tmp_path)])
    evaluation = json.loads((tmp_path / "encoder_evaluation.json").read_text())
    assert code == (0 if evaluation["robustness"]["passed"] else 3)
    header = capsys.readouterr().out.splitlines()[0]
    assert "no AutoAttack or Square (--no-autoattack)" in header  # the header promises only what runs


def test_demo_evaluates_three_label_sets_each_with_its_own_probe(demo_dir):
    evaluations = json.loads((demo_dir / "demo.json").read_text())["evaluations"]
    for evaluation in evaluations.values():
        tasks = evaluation["tasks"]
        assert {k: t["num_classes"] for k, t in tasks.items()} == {"digit": 10, "parity": 2, "digit>=5": 2}
        for task in tasks.values():
            assert all(0.0 <= v <= task["clean_accuracy"] for v in task["robust_accuracy"].values())


def test_compare_merges_runs_of_other_seeds_into_one_table(tmp_path):
    compare = load_compare()
    for seed in (0, 1):
        args = [
            "--quick",
            "--no-progress",
            "--methods",
            "simclr",
            "--seeds",
            str(seed),
            "--out",
            str(tmp_path / f"s{seed}"),
        ]
        compare.main(args)
    merged = compare.main(["--render", str(tmp_path / "s0" / "results.json"), str(tmp_path / "s1" / "results.json")])
    assert merged["seeds"] == [0, 1] and [r["seed"] for r in merged["runs"]] == [0, 1]
    assert merged["summary"][0]["seeds"] == 2
    assert "seeds [0, 1]" in (tmp_path / "s0" / "results.md").read_text()


def test_a_table_whose_rows_have_different_seed_counts_names_each_rows_count(tmp_path):
    compare = load_compare()
    report = compare.main(["--quick", "--no-progress", "--methods", "simclr", "--seeds", "0", "--out", str(tmp_path)])
    (run,) = report["runs"]
    other_seed, other_method = copy.deepcopy(run), copy.deepcopy(run)
    other_seed["seed"], other_method["method"] = 1, "simclr[steps=2]"
    equal = compare.markdown(compare.summarise([run, other_seed], [0.1], "PGD-20"), [0.1], "t", "PGD-20")
    mixed = compare.markdown(compare.summarise([run, other_seed, other_method], [0.1], "PGD-20"), [0.1], "t", "PGD-20")
    assert "| simclr |" in equal and "seeds)" not in equal
    assert "| simclr (2 seeds) |" in mixed and "| simclr[steps=2] (1 seed) |" in mixed


def test_compare_candidate_names_set_pretrain_config_fields():
    compare = load_compare()
    names = compare.split_methods("simclr,simclr+robust-reg[steps=2,step=0.05],byol-acl-lite[eps=0.15]")
    assert names == ["simclr", "simclr+robust-reg[steps=2,step=0.05]", "byol-acl-lite[eps=0.15]"]
    assert compare.parse_method(names[1]) == ("simclr", "robust", {"steps": 2, "step_size": 0.05})
    assert compare.parse_method("byol+robust-reg[clean_view_loss=true,weight=0.5]") == (
        "byol",
        "robust",
        {"clean_view_loss": True, "robust_weight": 0.5},
    )


@pytest.mark.parametrize(
    "full_eval, says",
    [
        (True, "Scored with the full evaluation of the table above."),
        (False, "Scored with PGD only"),
        (["simclr-acl-lite"], "(AutoAttack too): simclr-acl-lite; the others with PGD only."),
    ],
)
def test_the_budget_note_says_how_the_retrained_runs_were_scored(full_eval, says):
    note = load_compare()._budget_note({"simclr+robust-reg": {"0": 300.0}}, 30, full_eval)
    assert says in note and "300 s (seed 0)" in note


@pytest.mark.parametrize("name", ["simclr-foo", "simclr[seed=1]", "simclr[no_such_field=1]", "simclr[steps=2"])
def test_compare_rejects_an_unknown_candidate_name(name):
    compare = load_compare()
    with pytest.raises(ValueError, match="simclr"):
        compare.parse_method(name)


def _tiny_simclr():
    """SimCLR on a linear backbone over 4x4 one-channel images: fast enough for one step per test."""
    from harness import build_model

    return build_model("simclr", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8)), (1, 4, 4))


def test_robust_step_with_the_clean_view_loss_averages_the_two_losses():
    from robust_reg.demo.training import SimCLR

    model = _tiny_simclr()
    assert isinstance(model, SimCLR)
    views = (torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4))
    z0, z0_adv, z1 = model(views[0]), model(views[0] + 0.05), model(views[1])
    both = model.loss_from_embeddings(views, ((z0, z0_adv), z1))
    expected = 0.5 * (model.loss_from_embeddings(views, (z0, z1)) + model.loss_from_embeddings(views, (z0_adv, z1)))
    torch.testing.assert_close(both, expected)


def test_late_start_trains_plain_epochs_before_the_robust_term():
    from harness import PretrainConfig, pretrain

    from robust_reg.demo.data import load_dataset

    data = load_dataset("digits").subset(train=128, test=50)
    config = PretrainConfig(variant="robust", epochs=4, robust_start=0.5)
    history = pretrain(data, config, progress_bar=False).history
    assert [h["reg"] == 0.0 for h in history] == [True, True, False, False]


def test_epsilon_ramp_grows_the_training_eps_to_its_value():
    from harness import PretrainConfig, scheduled

    config = PretrainConfig(variant="robust", epochs=10, epsilon=0.1, epsilon_ramp=0.3)
    eps = [scheduled(config, epoch).epsilon for epoch in range(10)]
    assert eps[:3] == pytest.approx([0.025, 0.05, 0.075]) and eps[3:] == [0.1] * 7


def test_epsilon_from_moves_the_training_eps_linearly_to_its_value_over_the_run():
    from harness import PretrainConfig, scheduled

    config = PretrainConfig(variant="robust", epochs=5, epsilon=0.1, epsilon_from=0.2)
    assert [scheduled(config, epoch).epsilon for epoch in range(5)] == pytest.approx([0.2, 0.175, 0.15, 0.125, 0.1])


@pytest.mark.parametrize(
    "fields",
    [{"epsilon_from": 0.0}, {"epsilon_from": 0.2, "epsilon_ramp": 0.3}, {"epsilon_from": 0.2, "variant": "plain"}],
)
def test_epsilon_from_that_is_not_a_positive_eps_of_a_robust_run_is_refused_by_name(fields):
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="epsilon_from"):
        PretrainConfig(**{"variant": "robust", **fields})


@pytest.mark.parametrize("field", ["robust_start", "epsilon_ramp"])
def test_schedule_fractions_outside_zero_one_are_refused(field):
    from harness import PretrainConfig

    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: 1.0})


def test_the_robust_step_without_random_start_runs_one_forward_fewer():
    from harness import PretrainConfig, regularizer_for, step_loss

    from robust_reg.attacks import ThreatModel

    forwards, calls = {}, []
    for random_start in (True, False):
        torch.manual_seed(0)
        model = _tiny_simclr()
        calls.clear()
        model.backbone.register_forward_hook(lambda *_: calls.append(1))
        config = PretrainConfig(variant="robust", random_start=random_start)
        loss, _ = step_loss(
            model, regularizer_for(config), ThreatModel(0.1), torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4), config
        )
        loss.backward()
        forwards[random_start] = len(calls)
    assert forwards == {True: 2 + 3 + 1, False: 1 + 3 + 1}


def _penalty_term(penalty: str, seed: int = 0):
    from harness import PretrainConfig, regularizer_for, step_loss

    from robust_reg.attacks import ThreatModel

    torch.manual_seed(seed)
    model = _tiny_simclr()
    x0, x1 = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    inputs = []
    handle = model.backbone.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    config = PretrainConfig(variant="robust", penalty=penalty)
    torch.manual_seed(seed + 1)
    _, term = step_loss(model, regularizer_for(config), ThreatModel(0.1), x0, x1, config)
    handle.remove()
    return model, x0, x1, inputs[-1], term


def test_the_backbone_penalty_is_the_relative_deviation_of_the_backbone_features_at_the_adversarial_view():
    model, x0, _, x_adv, term = _penalty_term("backbone")
    with torch.no_grad():
        h, h_adv = model.backbone(x0), model.backbone(x_adv)
    expected = (h_adv - h).pow(2).sum(dim=1).mean() / (h - h.mean(dim=0)).pow(2).sum(dim=1).mean()
    assert (x_adv - x0).abs().max() > 0
    assert term == pytest.approx(float(expected), rel=1e-5)


def test_both_penalties_add_the_embedding_and_the_backbone_terms_of_the_same_ascent():
    terms = {penalty: _penalty_term(penalty)[-1] for penalty in ("embedding", "backbone", "both")}
    assert terms["both"] == pytest.approx(terms["embedding"] + terms["backbone"], rel=1e-5)


@pytest.mark.parametrize(
    "settings",
    [dict(variant="reg"), dict(variant="robust", adversarial_views=2), dict(variant="robust", penalty="features")],
)
def test_a_penalty_the_step_cannot_measure_is_refused_by_name(settings):
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="penalty"):
        PretrainConfig(**{"penalty": "backbone", **settings})


def test_the_positive_anchor_penalty_runs_no_clean_pass_of_the_perturbed_view():
    from harness import PretrainConfig, regularizer_for, step_loss

    from robust_reg.attacks import ThreatModel

    torch.manual_seed(0)
    model = _tiny_simclr()
    x0, x1 = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    inputs = []
    model.backbone.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    config = PretrainConfig(variant="robust", penalty="positive")
    loss, term = step_loss(model, regularizer_for(config), ThreatModel(0.1), x0, x1, config)
    loss.backward()
    assert len(inputs) == 1 + 3 + 1  # view 1, the ascent, the adversarial view
    assert not any(torch.equal(x, x0) for x in inputs)
    with torch.no_grad():
        z_adv, z1 = (torch.nn.functional.normalize(model(x), dim=1) for x in (inputs[-1], x1))
    expected = (z_adv - z1).pow(2).sum(dim=1).mean() / (z1 - z1.mean(dim=0)).pow(2).sum(dim=1).mean()
    assert term == pytest.approx(float(expected), rel=1e-5)


def test_steps_from_grows_the_ascent_steps_over_equal_parts_of_the_epochs():
    from harness import PretrainConfig, scheduled

    config = PretrainConfig(variant="robust", epochs=6, steps=3, steps_from=1)
    assert [scheduled(config, epoch).steps for epoch in range(6)] == [1, 1, 2, 2, 3, 3]


def test_steps_from_above_steps_is_refused_by_name():
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="steps_from"):
        PretrainConfig(variant="robust", steps=3, steps_from=4)


def test_a_boolean_field_without_a_default_parses_as_a_boolean():
    compare = load_compare()
    _, _, overrides = compare.parse_method("simclr-dynacl[ema=false,authors_augment=false]")
    assert overrides == {"ema": False, "authors_augment": False}


def test_a_candidate_field_without_a_default_takes_its_annotated_type():
    compare = load_compare()
    assert compare.parse_method("simclr+robust-reg[steps_from=1,step=0.05]") == (
        "simclr",
        "robust",
        {"steps_from": 1, "step_size": 0.05},
    )


def test_the_kl_penalty_compares_the_clean_and_adversarial_softmax_over_the_other_views():
    model, x0, x1, x_adv, term = _penalty_term("kl")
    with torch.no_grad():
        z0, z1, z_adv = (torch.nn.functional.normalize(model(x), dim=1) for x in (x0, x1, x_adv))
    p, q = (torch.softmax(z @ z1.T / 0.5, dim=1) for z in (z0, z_adv))
    expected = (p * (p / q).log()).sum(dim=1).mean()
    assert term == pytest.approx(float(expected), rel=1e-4)


def test_the_kl_penalty_is_refused_for_byol_by_name():
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="penalty='kl'"):
        PretrainConfig(method="byol", variant="robust", penalty="kl")


@pytest.mark.parametrize("detach_anchor", [False, True])
@pytest.mark.parametrize("warp", [False, True])
def test_thewarm_start_steps_first_visit_is_the_recommended_step(detach_anchor, warp):
    from harness import PretrainConfig, regularizer_for, step_loss, warm_start_step

    from robust_reg import PerturbationMemory, crop_geometry
    from robust_reg.attacks import ThreatModel

    torch.manual_seed(0)
    model = _tiny_simclr()
    x0, x1 = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    config = PretrainConfig(variant="robust", detach_anchor=detach_anchor)
    reg = regularizer_for(config)
    torch.manual_seed(1)
    loss, term = step_loss(model, reg, ThreatModel(0.1), x0, x1, config)
    torch.manual_seed(1)
    memory, index = PerturbationMemory(), torch.arange(6)
    geometry = crop_geometry(torch.tensor([[0, 0, 3, 3]] * 6), (4, 4)) if warp else None
    warm_loss, warm_term = warm_start_step(model, reg, x0, x1, config, memory.at(index, geometry))
    assert warm_term == pytest.approx(term, rel=1e-5)
    torch.testing.assert_close(warm_loss, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    for warm, recommended in zip(torch.autograd.grad(warm_loss, params), torch.autograd.grad(loss, params)):
        torch.testing.assert_close(warm, recommended)
    assert memory.is_stored(index).all()


def _warm_starts(monkeypatch, **settings) -> tuple[list, list, list]:
    """A 2-epoch warm-start run on 128 digits (two batches per epoch). Per regulariser call: what the memory
    held for the batch before it (seen through the crops when warped), where the ascent ended, the keywords."""
    import harness as ssl

    from robust_reg import RobustnessRegularizer
    from robust_reg.demo.data import load_dataset

    held, ends, calls = [], [], []
    forward = RobustnessRegularizer.forward

    def spying(self, encoder, x, *args, **kwargs):
        warm = kwargs["start"]  # memory.at(index, geometry)
        held.append(warm.memory.read(warm.index, x, warm.geometry).clone())
        out = forward(self, encoder, x, *args, **kwargs)
        ends.append((out.adversarial_inputs - x).detach().clone())
        calls.append(kwargs)
        return out

    monkeypatch.setattr(RobustnessRegularizer, "forward", spying)
    data = load_dataset("digits").subset(train=128, test=50)
    config = ssl.PretrainConfig(variant="robust", epochs=2, steps=1, step_size=0.05, warm_start=True, **settings)
    ssl.pretrain(data, config, progress_bar=False)
    assert len(calls) == 4
    return held, ends, calls


def test_warm_start_starts_each_images_ascent_where_its_previous_epoch_ended(monkeypatch):
    held, _, _ = _warm_starts(monkeypatch)
    assert all(float(h.abs().max()) == 0 for h in held[:2])  # the first epoch finds the memory empty
    assert all(float(h.abs().mean()) > 0.01 for h in held[2:])


@pytest.mark.parametrize("warp", [True, False])
def test_without_the_warp_each_image_starts_exactly_where_its_view_ended(monkeypatch, warp):
    held, ends, _ = _warm_starts(monkeypatch, warm_warp=warp)
    ended = torch.cat(ends[:2]).flatten(start_dim=1)  # the first epoch's end points, one per image
    started = torch.cat(held[2:]).flatten(start_dim=1)
    # The batches are reshuffled each epoch; exact distances (the matrix-product form rounds off).
    distances = torch.cdist(started, ended, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = distances.min(dim=1).values
    if warp:  # through a new crop the start is the old perturbation moved, not the same tensor
        assert float(nearest.median()) > 1e-2
    else:
        assert float(nearest.max()) < 1e-6


@pytest.mark.parametrize("warp", [True, False])
def test_the_experiments_keep_the_warm_start_in_one_package_memory_with_the_crops_when_warped(monkeypatch, warp):
    _, _, calls = _warm_starts(monkeypatch, warm_warp=warp)
    starts = [call["start"] for call in calls]  # memory.at(index, geometry)
    memory = starts[0].memory
    assert all(start.memory is memory for start in starts)
    assert len(memory) == 128 and memory.is_stored(torch.arange(128)).all()
    assert all((start.geometry is not None) == warp for start in starts)
    if warp:
        assert all(start.geometry.shape == (64, 2, 3) for start in starts)


@pytest.mark.parametrize(
    "settings",
    [dict(variant="acl"), dict(variant="robust", penalty="kl"), dict(variant="robust", ascent="instance")],
)
def test_warm_start_where_the_step_cannot_carry_a_perturbation_is_refused_by_name(settings):
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="warm_start"):
        PretrainConfig(warm_start=True, **settings)


def test_warm_warp_without_warm_start_is_refused_by_name():
    from harness import PretrainConfig

    with pytest.raises(ValueError, match="warm_warp"):
        PretrainConfig(variant="robust", warm_warp=False)


def test_a_budget_reference_gives_its_methods_acl_rows_its_training_time_as_their_budget():
    compare = load_compare()
    candidate = "simclr+robust-reg[warm_start=true,steps=2]"
    names = [candidate, "simclr-acl-lite", "byol+robust-reg", "byol-acl-lite"]
    assert compare.budgets(names, [candidate]) == {
        "byol+robust-reg": ("byol-acl-lite",),
        candidate: compare.BUDGETS["simclr+robust-reg"],
    }


@pytest.mark.parametrize(
    "names, reference",
    [
        (["simclr-acl-lite"], "simclr+robust-reg[steps=2]"),  # not a row of the run
        (["simclr+reg", "simclr-acl-lite"], "simclr+reg"),  # not a robust-reg row
    ],
)
def test_a_budget_reference_that_cannot_set_a_budget_is_refused_by_name(names, reference):
    compare = load_compare()
    with pytest.raises(ValueError, match="--budget-reference"):
        compare.budgets(names, [reference])


def test_a_budget_reference_beside_the_recommended_configuration_gives_the_acl_rows_both_budgets():
    compare = load_compare()
    candidate = "simclr+robust-reg[warm_start=true,steps=2]"
    names = ["simclr+robust-reg", candidate, "simclr-acl-lite"]
    rivals = compare.BUDGETS["simclr+robust-reg"]
    assert compare.budgets(names, [candidate]) == {"simclr+robust-reg": rivals, candidate: rivals}


def _budget_run(run: dict, method: str, reference: str | None, epochs: int) -> dict:
    record = {**copy.deepcopy(run), "method": method, "epochs": epochs}
    if reference is not None:
        record["budget_reference"] = reference
    return record


def test_a_rival_retrained_for_two_references_is_one_row_per_reference_named_by_its_budget(tmp_path):
    compare = load_compare()
    report = compare.main(["--quick", "--no-progress", "--methods", "simclr", "--seeds", "0", "--out", str(tmp_path)])
    (run,) = report["runs"]
    candidate = "simclr+robust-reg[anneal_augment=true]"
    runs = [
        _budget_run(run, "simclr+robust-reg", "simclr+robust-reg", 30),
        _budget_run(run, "simclr-dynacl", "simclr+robust-reg", 12),
        _budget_run(run, candidate, candidate, 30),
        _budget_run(run, "simclr-dynacl", candidate, 13),
    ]
    rows = compare.summarise(runs, [8 / 255], "PGD-20")
    assert [(row["label"], row["epochs"]) for row in rows] == [
        ("simclr+robust-reg", "30"),
        ("simclr-dynacl (budget of simclr+robust-reg)", "12"),
        (candidate, "30"),
        (f"simclr-dynacl (budget of {candidate})", "13"),
    ]


def test_budget_runs_of_files_from_before_references_were_recorded_take_theirs_from_the_budget_times():
    compare = load_compare()
    candidate = "simclr+robust-reg[warm_start=true,steps=2]"
    report = {
        "budget_seconds": {candidate: {"0": 100.0}, "byol+robust-reg": {"0": 200.0}},
        "budget_runs": [
            {"method": candidate},
            {"method": "simclr-acl-lite"},
            {"method": "byol-acl-lite"},
            {"method": "simclr-dynacl", "budget_reference": "simclr+robust-reg"},  # recorded: kept
        ],
    }
    runs = compare.label_budget_runs(report)["budget_runs"]
    assert [r["budget_reference"] for r in runs] == [candidate, candidate, "byol+robust-reg", "simclr+robust-reg"]


def _budget_report(times: dict[str, float]) -> dict:
    """A report with one 30-epoch run per row on seed 0, each trained for ``times[row]`` seconds."""
    runs = [{"method": name, "seed": 0, "epochs": 30, "train_seconds": s} for name, s in times.items()]
    return {"runs": runs, "budget_runs": []}


def _fake_training(trained: list):
    def train(name, seed, epochs, seconds):
        trained.append((name, epochs))
        return {"method": name, "seed": seed, "epochs": epochs, "train_seconds": seconds}

    return train


def _two_budgets(candidate: str, candidate_seconds: float) -> tuple[dict, list]:
    """The default (300 s) and ``candidate`` each setting a budget for DynACL (900 s for 30 epochs), on seed 0."""
    report = _budget_report({"simclr+robust-reg": 300.0, candidate: candidate_seconds, "simclr-dynacl": 900.0})
    references = {"simclr+robust-reg": ("simclr-dynacl",), candidate: ("simclr-dynacl",)}
    trained = []
    names = [*references, "simclr-dynacl"]
    load_compare().run_budgets(report, references, names, [0], 30, _fake_training(trained), lambda: None)
    return report, trained


def test_each_reference_gets_its_own_budget_run_of_a_shared_rival():
    candidate = "simclr+robust-reg[steps=2]"
    report, trained = _two_budgets(candidate, 200.0)
    assert trained == [("simclr-dynacl", 10), ("simclr-dynacl", 7)]
    rivals = [(r["budget_reference"], r["epochs"]) for r in report["budget_runs"] if r["method"] == "simclr-dynacl"]
    assert rivals == [("simclr+robust-reg", 10), (candidate, 7)]


def test_a_rival_already_trained_for_the_same_epochs_under_another_reference_is_not_trained_again():
    candidate = "simclr+robust-reg[anneal_augment=true]"
    report, trained = _two_budgets(candidate, 302.0)
    assert trained == [("simclr-dynacl", 10)]
    (twin,) = [
        r for r in report["budget_runs"] if r.get("budget_reference") == candidate and r["method"] == "simclr-dynacl"
    ]
    assert twin["epochs"] == 10 and twin["reused"]


def test_a_resumed_budget_run_of_the_same_reference_is_kept():
    compare = load_compare()
    report = _budget_report({"simclr+robust-reg": 300.0, "simclr-dynacl": 900.0})
    done = {
        "method": "simclr-dynacl",
        "seed": 0,
        "epochs": 10,
        "train_seconds": 301.0,
        "budget_reference": "simclr+robust-reg",
    }
    report["budget_runs"].append(done)
    trained = []
    references = {"simclr+robust-reg": ("simclr-dynacl",)}
    compare.run_budgets(
        report, references, ["simclr+robust-reg", "simclr-dynacl"], [0], 30, _fake_training(trained), lambda: None
    )
    assert trained == [] and report["budget_runs"].count(done) == 1


def test_a_rival_timed_on_a_short_run_gets_the_epochs_its_epoch_time_fits_in_the_budget():
    compare = load_compare()
    report = _budget_report({"simclr+robust-reg": 300.0})
    # --rival-timing-epochs 3: DynACL's 3 unscored epochs took 90 s, so 10 epochs fit in the default's 300 s.
    report["timing_runs"] = [{"method": "simclr-dynacl", "seed": 0, "epochs": 3, "train_seconds": 90.0}]
    trained = []
    references = {"simclr+robust-reg": ("simclr-dynacl",)}
    compare.run_budgets(
        report, references, ["simclr+robust-reg", "simclr-dynacl"], [0], 30, _fake_training(trained), lambda: None
    )
    assert trained == [("simclr-dynacl", 10)]


def pretrained_on_random_npz(tmp_path, name: str, n_train: int, n_test: int):
    """An .npz of random RGB images with 3 classes, and a 1-epoch checkpoint trained on it by the example."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / f"{name}.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 16, 16, 3), dtype=np.uint8),
        y_train=np.arange(n_train) % 3,
        x_test=rng.integers(0, 256, (n_test, 16, 16, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % 3,
    )
    spec = importlib.util.spec_from_file_location("pretrain_example", ROOT / "examples" / "pretrain.py")
    pretrain_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_example)
    checkpoint = tmp_path / f"{name}.pt"
    argv = ["--dataset", "npz", "--data-path", str(path), "--epochs", "1", "--steps", "1", "--batch-size", "32"]
    pretrain_example.main([*argv, "--out", str(checkpoint)])
    return checkpoint, path


def test_arrays_the_user_has_train_and_evaluate_through_an_npz(tmp_path):
    checkpoint, path = pretrained_on_random_npz(tmp_path, "mine", 96, 32)
    assert torch.load(checkpoint, weights_only=True)["dataset"] == "npz"
    args = ["evaluate", str(checkpoint), "--data-path", str(path), "--no-autoattack", "--pgd-steps", "2"]
    code = cli([*args, "--no-progress", "--out", str(tmp_path)])
    evaluation = json.loads((tmp_path / "mine_evaluation.json").read_text())
    assert code == (0 if evaluation["robustness"]["passed"] else 3)
    assert evaluation["robustness"]["robust_accuracy"][-1]["epsilon"] == 8 / 255  # natural images: 8/255
    assert list(evaluation["tasks"]) == ["class"]


@pytest.fixture
def tiny_npz_checkpoint(tmp_path):
    """A 1-epoch encoder trained on a tiny random RGB .npz, and the file."""
    return pretrained_on_random_npz(tmp_path, "tiny", 64, 24)


def test_evaluate_scores_slf_alf_and_aff_in_one_table(tiny_npz_checkpoint, tmp_path, capsys):
    checkpoint, path = tiny_npz_checkpoint
    args = ["evaluate", str(checkpoint), "--data-path", str(path), "--no-autoattack", "--pgd-steps", "2"]
    args += ["--protocol", "slf,alf,aff", "--finetune-epochs", "1", "--no-progress", "--out", str(tmp_path)]
    code = cli(args)
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "tiny_evaluation.json").read_text())
    assert code in (0, 3)
    table = printed[printed.index("Fine-tuning modes") :]
    assert [line.split()[0] for line in table.splitlines()[4:7]] == ["slf", "alf", "aff"]
    assert list(record["protocols"]) == ["slf", "alf", "aff"]
    for mode in record["protocols"].values():
        assert mode["seconds"] >= 0 and mode["robustness"]["robust_accuracy"]
        assert 0 <= mode["corruptions"]["mean_accuracy"] <= 1
    embedding = record["embedding_attack"]
    assert embedding["mean_relative_deviation"] >= embedding["random_mean_relative_deviation"]
    assert 0 <= embedding["knn_changed"] <= 1


def test_evaluate_states_the_cost_of_each_protocol_in_its_help(capsys):
    with pytest.raises(SystemExit):
        cli(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ALF" in text and "AFF" in text and "2 CPU cores" in text


def test_an_unknown_protocol_is_refused_by_name(tiny_npz_checkpoint, capsys):
    checkpoint, path = tiny_npz_checkpoint
    with pytest.raises(SystemExit) as exit:
        cli(["evaluate", str(checkpoint), "--data-path", str(path), "--protocol", "slf,xyz"])
    assert exit.value.code == 2 and "--protocol" in capsys.readouterr().err


@pytest.mark.parametrize("full", [False, True])
def test_the_budget_runs_evaluation_is_built_from_the_loaded_data(full):
    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.pipeline import EvalConfig

    compare = load_compare()
    data = load_dataset("digits")
    config = EvalConfig.for_data(data)
    args = compare.parse_args(["--dataset", "digits", *(["--budget-full-eval"] if full else [])])
    budget = compare.budget_evaluation(args, data, config)
    assert (budget is config) == full
    assert full or (budget.autoattack is False and not budget.corruptions and budget.epsilons == config.epsilons)


def test_a_post_processing_stage_is_a_fixed_cost_in_the_equal_budget_epochs():
    compare = load_compare()
    plain = {"train_seconds": 300.0}
    post = {"train_seconds": 300.0, "post_seconds": 100.0}
    assert compare.epochs_in_budget(plain, 150.0, 30) == 15
    assert compare.epochs_in_budget(post, 150.0, 30) == 8  # (150 - 100) s at 200 / 30 s per epoch
    assert compare.epochs_in_budget(post, 50.0, 30) == 1


def test_dynacl_plus_plus_is_dynacl_with_its_post_processing():
    compare = load_compare()
    assert compare.parse_method("simclr-dynacl++") == ("simclr", "dynacl", {"lp_aft": True})
    assert compare.parse_method("simclr-acl") == ("simclr", "acl", {})  # the reduced row's old name still reads
    assert compare.split_methods("simclr-acl,byol-acl[eps=0.1]") == ["simclr-acl-lite", "byol-acl-lite[eps=0.1]"]


def test_the_headline_table_shows_our_rows_and_every_peer_at_the_equal_budget(tmp_path):
    compare = load_compare()
    report = compare.main(["--quick", "--no-progress", "--methods", "simclr", "--seeds", "0", "--out", str(tmp_path)])
    (run,) = report["runs"]
    rival = {**copy.deepcopy(run), "method": "simclr-dynacl", "epochs": 12}
    reference = {**copy.deepcopy(run), "method": "simclr+robust-reg"}
    candidate = {**copy.deepcopy(run), "method": "simclr+robust-reg[anneal_augment=true]"}
    same = {**copy.deepcopy(run), "method": "simclr-dynacl"}
    rows = compare.summarise([run, reference, candidate, same], [4 / 255, 8 / 255], "PGD-20")
    budget = compare.summarise([reference, rival], [4 / 255, 8 / 255], "PGD-20")
    table = compare.headline_markdown(rows, budget, 8 / 255, "PGD-20").splitlines()
    assert "**robust** @8/255 (%)" in table[0]
    names = [line.split(" | ")[0][2:] for line in table[2:]]
    assert names == ["simclr", "simclr+robust-reg", "simclr+robust-reg[anneal_augment=true]", "simclr-dynacl"]
    assert table[-1].split(" | ")[1] == "12"  # the peer at its equal-budget epochs, not its 30-epoch run


# The fair-peers protocol: settings chosen on a validation split, comparisons with their uncertainty.


def test_the_validation_split_holds_out_a_fixed_class_balanced_share_of_the_training_images():
    from robust_reg.demo.data import ImageData

    compare = load_compare()
    y = torch.arange(4660) % 10
    x = torch.arange(4660, dtype=torch.float32).view(-1, 1, 1, 1)  # each image names its index
    data = ImageData("subset", x, y, torch.zeros(846, 1, 1, 1), torch.zeros(846, dtype=torch.long), 10, "cifar10")
    split = compare.validation_split(data)
    assert (split.x_train.shape[0], split.x_test.shape[0]) == (4000, 660)
    assert torch.bincount(split.y_test, minlength=10).tolist() == [66] * 10
    held, kept = set(split.x_test.flatten().tolist()), set(split.x_train.flatten().tolist())
    assert not held & kept and len(held | kept) == 4660  # no test image used, no training image scored
    again = compare.validation_split(data)
    assert torch.equal(again.x_test, split.x_test)  # the same images every run, whatever the seed


def test_a_screen_never_scores_on_the_test_split():
    compare = load_compare()
    with pytest.raises(SystemExit, match="--split test scores on the test images: a screen"):
        compare.main(["--split", "test", "--light-eval", "--methods", "simclr", "--out", "unused"])


def test_the_results_say_which_split_scored_them():
    compare = load_compare()
    assert "validation split: 660 training images held out" in compare.split_note(
        {"split": "validation", "validation_images": 660}
    )
    assert "a record run" in compare.split_note({"split": "test"})
    assert "before the validation split existed" in compare.split_note({})


def fake_run(method: str, seed: int, robust: float, clean: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "robustness": {"clean_accuracy": clean, "robust_accuracy": [{"epsilon": 0.1, "accuracy": robust}]},
    }


def test_paired_differences_call_a_row_above_or_below_only_when_the_interval_excludes_zero():
    compare = load_compare()
    runs = [fake_run("simclr+robust-reg", s, r, 0.4) for s, r in enumerate([0.070, 0.080, 0.075])]
    runs += [fake_run("simclr-dynacl", s, r, 0.41) for s, r in enumerate([0.060, 0.069, 0.066])]  # below each seed
    runs += [fake_run("simclr-acl-ds", s, r, 0.40) for s, r in enumerate([0.090, 0.060, 0.080])]  # mixed
    rows = {r["method"]: r for r in compare.paired_differences(runs, 0.1)}
    assert rows["simclr-dynacl"]["reference"] == "simclr+robust-reg"
    assert rows["simclr-dynacl"]["robust"]["per_seed"] == pytest.approx([-0.010, -0.011, -0.009])
    assert rows["simclr-dynacl"]["robust"]["verdict"] == "below"
    assert rows["simclr-acl-ds"]["robust"]["verdict"] == "level"
    assert rows["simclr-acl-ds"]["robust"]["low"] < 0 < rows["simclr-acl-ds"]["robust"]["high"]
    table = compare.paired_markdown(runs, 0.1)
    assert "paired differences against simclr+robust-reg" in table and "| below |" in table


def test_paired_differences_pair_runs_by_seed_not_by_order():
    compare = load_compare()
    runs = [fake_run("simclr+robust-reg", 0, 0.10, 0.4), fake_run("simclr+robust-reg", 1, 0.20, 0.4)]
    runs += [fake_run("simclr", 1, 0.25, 0.4), fake_run("simclr", 0, 0.15, 0.4)]
    (row,) = compare.paired_differences(runs, 0.1)
    assert row["seeds"] == [1, 0] and row["robust"]["per_seed"] == pytest.approx([0.05, 0.05])


def test_posthoc_benchmark_smoke_scores_every_stage_from_the_same_plain_encoder(tmp_path):
    posthoc = load_benchmark("posthoc")
    report = posthoc.main(["--dataset", "digits", "--quick", "--out", str(tmp_path)])
    methods = [r["method"] for r in report["runs"]]
    stages = [f"simclr+{name}[1B]" for name in ("harden", "deacl", "fare")]
    assert methods[:2] == ["simclr", "simclr+robust-reg"] and methods[2:5] == stages
    plain = report["runs"][0]["train_seconds"]
    assert all(r["train_seconds"] == pytest.approx(plain + r["post_seconds"]) for r in report["runs"][2:5])
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.json").is_file()


def test_posthoc_targets_pair_harden_with_each_peer_and_the_scratch_default_at_each_budget():
    posthoc = load_benchmark("posthoc")
    runs = []
    for seed in range(3):
        runs += [
            fake_run("simclr+robust-reg", seed, 0.07, 0.42),
            fake_run("simclr+robust-reg[scratch 0.5B]", seed, 0.05, 0.43),
        ]
        runs += [fake_run(f"simclr+harden[{k}B]", seed, 0.09 + 0.001 * seed, 0.44) for k in ("0.5", "1")]
        runs += [fake_run(f"simclr+deacl[lr=4.0][{k}B]", seed, 0.10, 0.44) for k in ("0.5", "1")]
        runs += [fake_run(f"simclr+fare[{k}B]", seed, 0.05, 0.46) for k in ("0.5", "1")]
        runs += [fake_run("simclr+harden[weight=2][1B]", seed, 0.12, 0.44)]  # a variant: its own rows
    rows = [
        line.split(" | ")
        for line in posthoc.targets_markdown(runs, 0.1).splitlines()
        if line.startswith("| 0") or line.startswith("| 1")
    ]
    table = {(r[0].strip("| "), r[1].strip("`"), r[2]): (float(r[4]), r[6]) for r in rows}
    assert len(table) == 9
    assert table["0.5B", "harden", "DeACL"] == (pytest.approx(-0.9), "below")  # harden 9.0-9.2 against DeACL's 10
    assert table["1B", "harden", "FARE"] == (pytest.approx(4.1), "above")
    assert table["1B", "harden", "the default from scratch, same total time"][0] == pytest.approx(2.1)  # its row
    assert table["0.5B", "harden", "the default from scratch, same total time"][0] == pytest.approx(4.1)
    assert table["1B", "harden[weight=2]", "DeACL"][0] == pytest.approx(2.0)


def test_posthoc_benchmark_resume_adds_stages_from_the_saved_plain_encoder(tmp_path):
    posthoc = load_benchmark("posthoc")
    first = posthoc.main(["--dataset", "digits", "--quick", "--methods", "fare", "--out", str(tmp_path)])
    budget = first["stage_budgets"]["0"]
    argv = ["--dataset", "digits", "--quick", "--methods", "harden[lr=0.05]", "--resume", "--out", str(tmp_path)]
    report = posthoc.main(argv)
    methods = [r["method"] for r in report["runs"]]
    assert methods.count("simclr") == 1 and methods.count("simclr+fare[1B]") == 1  # nothing retrained
    assert "simclr+harden[lr=0.05][1B]" in methods and report["stage_budgets"]["0"] == budget


def test_posthoc_stage_variants_name_what_each_stage_takes():
    posthoc = load_benchmark("posthoc")
    assert posthoc.parse_stage("harden[lr=2,decay=true,weight=2]") == (
        "harden",
        {"lr": 2.0, "decay": True, "weight": 2.0},
    )
    with pytest.raises(SystemExit, match=r"deacl's variants are \[lr=\.\.\.\]"):
        posthoc.parse_stage("deacl[decay=true]")
    with pytest.raises(SystemExit, match="harden's variants are"):
        posthoc.parse_stage("harden[steps=2]")


def test_lean_eval_keeps_only_the_headline_attack_at_the_largest_eps():
    compare = load_compare()
    from robust_reg.demo.pipeline import EvalConfig

    full = EvalConfig.for_dataset("cifar10")
    lean = compare.lean_eval(full)
    assert lean.epsilons == (8 / 255,) and lean.label_sets == ("class",)
    assert lean.autoattack_samples == full.autoattack_samples and lean.check_steps == lean.pgd_steps
    assert not lean.corruptions and not lean.embedding_attack and full.corruptions  # the original untouched


def test_frontier_benchmark_smoke_trains_each_method_for_each_budget_in_the_order_given(tmp_path):
    frontier = load_benchmark("frontier")
    argv = ["--dataset", "digits", "--quick", "--methods", "simclr+robust-reg,simclr-dynacl", "--timing-epochs", "1"]
    report = frontier.main([*argv, "--budgets", "1,0.5", "--out", str(tmp_path)])
    assert [r["method"] for r in report["runs"]] == [  # budgets outer: a stopped run has every method at 1R
        "simclr+robust-reg @1R",
        "simclr-dynacl @1R",
        "simclr+robust-reg @0.5R",
        "simclr-dynacl @0.5R",
    ]
    assert report["runs"][0]["epochs"] == 2 and report["runs"][2]["epochs"] == 1  # the default's epochs scale
    assert (tmp_path / "frontier.png").is_file() and (tmp_path / "results.json").is_file()


def test_frontier_record_from_adds_rows_at_the_earlier_runs_budgets_without_training_the_default(tmp_path):
    frontier = load_benchmark("frontier")
    argv = ["--dataset", "digits", "--quick", "--timing-epochs", "1", "--budgets", "1"]
    first = frontier.main([*argv, "--methods", "simclr+robust-reg", "--out", str(tmp_path / "first")])
    prior = str(tmp_path / "first" / "results.json")
    more = frontier.main([*argv, "--methods", "simclr", "--record-from", prior, "--out", str(tmp_path)])
    assert [r["method"] for r in more["runs"]] == ["simclr @1R"]
    assert more["budgets"] == first["budgets"]


def test_frontier_record_from_refuses_an_earlier_run_scored_on_other_images(tmp_path):
    frontier = load_benchmark("frontier")
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"benchmark": "frontier", "dataset": "digits", "split": "test", "budgets": {}}))
    argv = ["--dataset", "digits", "--quick", "--methods", "simclr", "--record-from", str(prior)]
    with pytest.raises(SystemExit, match="its split differs"):
        frontier.main([*argv, "--out", str(tmp_path)])


def test_frontier_record_from_refuses_an_earlier_run_on_another_processor_unless_told(tmp_path):
    frontier = load_benchmark("frontier")
    argv = ["--dataset", "digits", "--quick", "--timing-epochs", "1", "--budgets", "1"]
    frontier.main([*argv, "--methods", "simclr+robust-reg", "--out", str(tmp_path / "first")])
    prior = tmp_path / "first" / "results.json"
    earlier = json.loads(prior.read_text())
    prior.write_text(json.dumps({**earlier, "device": "another processor"}))
    more = [*argv, "--methods", "simclr", "--record-from", str(prior)]
    with pytest.raises(SystemExit, match="ran on 'another processor'.*--other-device"):
        frontier.main([*more, "--out", str(tmp_path / "refused")])
    report = frontier.main([*more, "--other-device", "--out", str(tmp_path / "accepted")])
    assert report["record_device"] == "another processor" and report["budgets"] == earlier["budgets"]


def test_frontier_plot_versus_pairs_every_row_with_the_named_row_at_the_budgets_where_it_ran(tmp_path):
    frontier = load_benchmark("frontier")
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "frontier-cifar10-subset"
    reports = [str(results / f"seed{n}{more}" / "results.json") for n in range(3) for more in ("", "-more2")]
    pair = "simclr+robust-reg[inner=n-fgsm,anneal_augment=true]"  # run at 0.5R and R, not at 0.25R
    frontier.main(["--plot", *reports, "--versus", pair, "--out", str(tmp_path)])
    table = (tmp_path / "frontier.md").read_text().split(f"#### Paired with {pair}")[1]
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ")[2] for line in table.splitlines() if line.startswith("| ")}
    assert {budget for budget, _ in rows} - {"| budget", "|---|---|---|---:|---|"} == {"| 0.5R", "| 1R"}
    assert rows["| 1R", "simclr+robust-reg"].startswith("-2.1") and (pair not in {row for _, row in rows})


def test_frontier_plot_versus_says_whether_each_row_trained_in_the_references_batch(tmp_path):
    frontier = load_benchmark("frontier")
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "frontier-cifar10-subset"
    reports = [str(results / f"seed{n}{more}" / "results.json") for n in range(3) for more in ("", "-more2")]

    def batch_cell(reference: str, row: str) -> str:
        frontier.main(["--plot", *reports, "--versus", reference, "--out", str(tmp_path)])
        table = (tmp_path / "frontier.md").read_text().split(f"#### Paired with {reference}")[1]
        cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| 1R | ")]
        return next(c[-1].rstrip(" |") for c in cells if c[1] == row)

    pair = "simclr+robust-reg[inner=n-fgsm,anneal_augment=true]"  # the second batch's only row
    assert batch_cell(pair, "simclr+robust-reg") == "**other**: seed? vs seed?-more2"
    assert batch_cell("simclr+robust-reg[inner=n-fgsm]", "simclr+robust-reg") == "same"


def test_frontier_plot_puts_each_posthoc_stage_beside_the_default_from_scratch_at_its_total_time(tmp_path):
    frontier = load_benchmark("frontier")
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    seeds = [str(results / "frontier-cifar10-subset" / f"seed{n}" / "results.json") for n in range(3)]
    posthoc = [str(results / "posthoc-cifar10-subset" / f"seed{n}" / "results.json") for n in range(3)]
    frontier.main(["--plot", *seeds, "--posthoc", *posthoc, "--out", str(tmp_path)])
    table = (tmp_path / "frontier.md").read_text().split("The pretrained-backbone route")[1]
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| SimCLR → deacl")]
    assert rows == [["| SimCLR → deacl", "0.5B"], ["| SimCLR → deacl", "1B"]]
    assert "vs the default from scratch, same total time" in table and (tmp_path / "frontier.png").is_file()


def test_the_collapse_monitor_logs_each_epoch_without_changing_the_training():
    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.training import TrainConfig, collapse_monitor, pretrain

    data = load_dataset("digits").subset(train=128, test=50)
    config = TrainConfig(epochs=2, batch_size=32)
    lines: list[str] = []
    watched = pretrain(data, config, progress_bar=False, log=lines.append, monitor=collapse_monitor(config, data))
    alone = pretrain(data, config, progress_bar=False)
    for mine, other in zip(watched.model.state_dict().values(), alone.model.state_dict().values(), strict=True):
        assert torch.equal(mine, other)
    assert [h["epoch"] for h in watched.history] == [0, 1]
    assert all(h["monitor_strong_attack"] > 0 and h["monitor_training_attack"] > 0 for h in watched.history)
    assert all("found by the training attack" in line for line in lines)
    assert watched.monitor_seconds > 0 and alone.monitor_seconds == 0


def test_plain_ssl_has_no_collapse_monitor():
    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.training import TrainConfig, collapse_monitor

    assert collapse_monitor(TrainConfig(robust=False), load_dataset("digits")) is None


@pytest.mark.parametrize("replays", [0, 1.5, True])
def test_pretrain_names_a_bad_replays(replays):
    from robust_reg.demo.data import load_dataset
    from robust_reg.demo.training import TrainConfig, pretrain

    with pytest.raises(ValueError, match="replays must be a positive int"):
        pretrain(load_dataset("digits").subset(train=32, test=8), TrainConfig(epochs=1), replays=replays)
