"""The public API's shape: one threat object taken by everything that attacks or bounds; 0.2's spellings warn."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch import nn

from robust_reg import (
    BackboneRobustnessRegularizer,
    RobustnessRegularizer,
    ThreatModel,
    estimate_bound,
    robustness_curve,
)
from robust_reg.embedding_attack import embedding_attack
from robust_reg.evaluation import PGD, evaluate_robustness
from robust_reg.finetune import FinetuneSchedule, adversarial_finetune, fit_adversarial_linear_probe

PUBLIC_MODULES = (
    "robust_reg",
    "robust_reg.evaluation",
    "robust_reg.finetune",
    "robust_reg.embedding_attack",
    "robust_reg.bound",
    "robust_reg.corruptions",
    "robust_reg.probe",
    "robust_reg.attacks",
)
ATTACKS_OR_BOUNDS = (
    RobustnessRegularizer,
    evaluate_robustness,
    estimate_bound,
    embedding_attack,
    fit_adversarial_linear_probe,
    adversarial_finetune,
)


def public_callables():
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if callable(obj):
                yield f"{name}.{attr}", obj


def test_no_public_signature_repeats_mean_std_and_bounds():
    repeated = [
        name
        for name, obj in public_callables()
        if {"mean", "std", "bounds"} <= set(inspect.signature(obj).parameters) and obj is not ThreatModel
    ]
    assert not repeated, f"these spell the threat out again: {repeated}"


@pytest.mark.parametrize("function", ATTACKS_OR_BOUNDS, ids=lambda f: f.__name__)
def test_everything_that_attacks_or_bounds_takes_threat_and_the_epsilon_shorthand(function):
    parameters = inspect.signature(function).parameters
    assert "threat" in parameters and ("epsilon" in parameters or "epsilons" in parameters)


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 4, 4, generator=g), torch.arange(16) % 2


OLD = dict(mean=(0.5,), std=(0.25,))


def normalised():
    x, y = data()
    return (x - 0.5) / 0.25, y


def cases():
    schedule = FinetuneSchedule(epochs=1, lr=0.01, steps=1, batch_size=16)
    return {
        "RobustnessRegularizer": lambda **kw: BackboneRobustnessRegularizer(**kw).threat,
        "evaluate_robustness": lambda **kw: (
            evaluate_robustness(linear(), *normalised(), attacks=[PGD(1)], check_steps=2, **kw).clean_accuracy
        ),
        "estimate_bound": lambda **kw: estimate_bound(nn.Flatten(), nn.Linear(16, 2), [normalised()], steps=1, **kw),
        "embedding_attack": lambda **kw: embedding_attack(linear()[:2], normalised()[0], steps=1, **kw).mean,
        "fit_adversarial_linear_probe": lambda **kw: (
            fit_adversarial_linear_probe(nn.Flatten(), [normalised()], 2, schedule=schedule, **kw).weight.shape
        ),
        "adversarial_finetune": lambda **kw: type(
            adversarial_finetune(linear()[:2], [normalised()], 2, schedule=schedule, **kw)
        ),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_the_0_2_spelling_still_works_and_warns_naming_threat(name):
    call = cases()[name]
    epsilon = {"epsilons": [0.05]} if name == "evaluate_robustness" else {"epsilon": 0.05}
    with pytest.warns(DeprecationWarning, match=r"deprecated since 0\.3\.0 .* threat=ThreatModel\(epsilon, mean=..."):
        call(**epsilon, **OLD)
    new = call(threat=ThreatModel(0.05, **OLD))
    assert new is not None


def test_robustness_curve_takes_a_threat_and_replaces_its_radius():
    x, y = normalised()
    curve = robustness_curve(nn.Flatten(), nn.Linear(16, 2), [(x, y)], [0.0, 0.05], threat=ThreatModel(0.1, **OLD))
    assert curve.epsilons == [0.0, 0.05]


def test_evaluate_robustness_with_a_threat_alone_reports_its_radius():
    ev = evaluate_robustness(linear(), *normalised(), threat=ThreatModel(0.05, **OLD), attacks=[PGD(1)], check_steps=2)
    assert ev.epsilons == (0.05,)


def test_unknown_keywords_are_still_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument.*colour"):
        estimate_bound(nn.Flatten(), nn.Linear(16, 2), [data()], epsilon=0.05, colour="red")


def named_parameters(function) -> list[str]:
    """The parameters a user names (``self`` and the catch-all of 0.2's deprecated spellings left out)."""
    return [
        name
        for name, p in inspect.signature(function).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def test_the_regularizer_takes_at_most_9_constructor_and_5_forward_arguments():
    constructor = named_parameters(RobustnessRegularizer.__init__)
    forward = named_parameters(RobustnessRegularizer.forward)
    assert len(constructor) <= 9, constructor
    assert forward == ["encoder", "x", "features", "positive", "start"]


def test_the_regularizer_signature_says_positive_is_required():
    positive = inspect.signature(RobustnessRegularizer.forward).parameters["positive"]
    assert positive.default is inspect.Parameter.empty and positive.kind is inspect.Parameter.KEYWORD_ONLY
    assert "positive" not in inspect.signature(BackboneRobustnessRegularizer.forward).parameters


def test_a_call_without_positive_is_a_type_error_naming_it():
    model, x = embedding_model(), torch.rand(8, 1, 8, 8)
    with pytest.raises(TypeError, match="'positive'"):
        RobustnessRegularizer(0.1)(model, x)


def test_the_backbone_form_has_the_same_constructor():
    assert named_parameters(BackboneRobustnessRegularizer.__init__) == named_parameters(RobustnessRegularizer.__init__)


def test_form_backbone_still_works_warns_and_builds_the_backbone_class():
    with pytest.warns(DeprecationWarning, match=r"use BackboneRobustnessRegularizer\(\.\.\.\)"):
        reg = RobustnessRegularizer(0.1, steps=2, form="backbone")
    assert type(reg) is BackboneRobustnessRegularizer and reg.steps == 2
    model = embedding_model()
    assert reg(model, torch.rand(8, 1, 8, 8)).loss.requires_grad


def test_the_backbone_form_refuses_a_positive():
    model, x = embedding_model(), torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match="positive= is not taken by BackboneRobustnessRegularizer"):
        BackboneRobustnessRegularizer(0.1)(model, x, positive=model(x).detach())


def embedding_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8))


def test_the_common_call_is_unchanged():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    z0, z1 = model(x0), model(x1)
    out = RobustnessRegularizer(8 / 255)(model, x1, features=z1, positive=z0)
    assert out.loss.requires_grad and out.adversarial_features.shape == z1.shape


def test_return_adversarial_false_still_returns_the_value_and_warns():
    model, x0, x1 = embedding_model(), torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    with pytest.warns(DeprecationWarning, match="use out.loss"):
        value = RobustnessRegularizer(0.1)(model, x1, positive=model(x0).detach(), return_adversarial=False)
    assert isinstance(value, torch.Tensor) and value.dim() == 0


def test_memory_and_index_still_work_warn_and_match_start_memory_at():
    from robust_reg import PerturbationMemory

    model, x0, x1 = embedding_model(), torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    positive, index = model(x0).detach(), torch.arange(8)
    old, new = PerturbationMemory(), PerturbationMemory()
    torch.manual_seed(3)
    with pytest.warns(DeprecationWarning, match=r"pass start=memory.at\(index, geometry\)"):
        a = RobustnessRegularizer(0.1, steps=3)(model, x1, positive=positive, memory=old, index=index)
    torch.manual_seed(3)
    b = RobustnessRegularizer(0.1, steps=3)(model, x1, positive=positive, start=new.at(index))
    assert torch.equal(a.adversarial_inputs, b.adversarial_inputs)
    assert torch.equal(old.read(index, x1), new.read(index, x1))


@pytest.mark.parametrize(
    "option, says",
    [
        (dict(random_start=False), "the random start is the measured default"),
        (dict(batch_norm="running"), "batch statistics are the measured default"),
        (dict(ascent="deviation"), "the class sets it"),
    ],
)
def test_an_option_that_lost_its_measurements_still_works_and_warns_what_to_do_instead(option, says):
    with pytest.warns(DeprecationWarning, match=says):
        reg = RobustnessRegularizer(0.1, **option)
    ((name, value),) = option.items()
    assert getattr(reg, name) == value


def _imports_of(path) -> list[tuple[str, str]]:
    """``(module, name)`` for each name a module imports from this package (relative imports resolved)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # robust_reg/demo/x.py: level 1 is robust_reg.demo, level 2 robust_reg
                module = ".".join(["robust_reg", "demo"][: 3 - node.level] + ([module] if module else []))
            if module.startswith("robust_reg") and not module.startswith("robust_reg.demo"):
                found += [(module, alias.name) for alias in node.names]
    return found


def test_the_demo_recipe_is_written_on_the_public_api_only():
    from pathlib import Path

    import robust_reg

    demo = Path(robust_reg.__file__).parent / "demo"
    private = [
        f"{path.name}: from {module} import {name}"
        for path in sorted(demo.glob("*.py"))
        for module, name in _imports_of(path)
        if name.startswith("_") or any(part.startswith("_") for part in module.split("."))
    ]
    assert not private, private
