"""Typed method options (``get_method(id).bind(...)``), OptionError for every bad option, error types."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.nets import GapHead, seeded

import cnnlens
from cnnlens.errors import CnnlensError, CnnlensWarning, MethodError, ModelTypeError, OptionError
from cnnlens.methods import get_method
from cnnlens.methods.registry import BoundMethod


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return seeded(GapHead(), seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_bind_is_frozen_and_checked_at_bind_time() -> None:
    bound = get_method("gradcampp").bind(alpha_normalize=True)
    assert isinstance(bound, BoundMethod) and bound.id == "gradcampp"
    assert bound.variant() == {"alpha_normalize": True, "relu": True}
    with pytest.raises(dataclasses.FrozenInstanceError):
        bound.options = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        bound.options["alpha_normalize"] = False  # type: ignore[index]
    with pytest.raises(OptionError, match="no option 'alpha_normalise'"):
        get_method("gradcampp").bind(alpha_normalise=True)
    with pytest.raises(OptionError, match="must be True or False"):
        get_method("gradcampp").bind(alpha_normalize="yes")
    with pytest.raises(OptionError, match="must be an integer"):
        get_method("integrated_gradients").bind(steps=2.5)
    with pytest.raises(OptionError, match="display must be one of"):
        get_method("saliency").bind(display="loud")


def test_bound_method_equals_string_options(net: torch.nn.Module, x: torch.Tensor) -> None:
    bound = get_method("gradcampp").bind(alpha_normalize=True)
    a = cnnlens.explain(net, x, methods=[bound], layers=["body.4"])["gradcampp", "body.4"]
    b = cnnlens.explain(
        net, x, methods=["gradcampp"], layers=["body.4"], options={"gradcampp": {"alpha_normalize": True}}
    )["gradcampp", "body.4"]
    c = cnnlens.explain(net, x, methods=["gradcampp"], layers=["body.4"])["gradcampp", "body.4"]
    assert a.variant == b.variant == {"alpha_normalize": True, "relu": True}
    torch.testing.assert_close(a.raw, b.raw, rtol=0, atol=0)
    assert not torch.equal(a.raw, c.raw)  # the option changes the map: the comparison above can fail


def test_every_bad_option_is_an_option_error(net: torch.nn.Module, x: torch.Tensor) -> None:
    cases = [
        ({"methods": ["gradcam"], "options": {"gradcampp": {"alpha_normalize": True}}}, "not requested"),
        ({"methods": ["gradcam"], "options": {"gradcam": {"nope": 1}}}, "has no option 'nope'"),
        ({"methods": ["smoothgrad"], "options": {"smoothgrad": {"n": 0}}}, "n must be an integer >= 1"),
        ({"methods": ["smoothgrad"], "options": {"smoothgrad": {"sigma": -1.0}}}, "sigma must be a number >= 0"),
        ({"methods": ["integrated_gradients"], "options": {"integrated_gradients": {"rule": "simpson"}}}, "rule"),
        ({"methods": ["saliency"], "options": {"saliency": {"reduce": "median"}}}, "reduce must be one of"),
        (
            {
                "methods": [get_method("gradcampp").bind(alpha_normalize=True)],
                "options": {"gradcampp": {"alpha_normalize": False}},
            },
            "both bound",
        ),
        (
            {"methods": [get_method("gradcampp").bind(alpha_normalize=True), get_method("gradcampp").bind()]},
            "bound twice",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(OptionError, match=match):
            cnnlens.explain(net, x, layers=["body.4"], **kwargs)  # type: ignore[arg-type]


def test_error_types_match_their_cause(x: torch.Tensor) -> None:
    with pytest.raises(ModelTypeError, match=r"torch\.nn\.Module") as info:
        cnnlens.explain("resnet", x)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, CnnlensError)
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, CnnlensError)
    with pytest.raises(MethodError, match="methods= takes"):
        cnnlens.explain(torch.nn.Identity(), x, methods=[3])  # type: ignore[list-item]


def test_cnnlens_warning_lives_in_errors() -> None:
    import cnnlens.methods
    import cnnlens.methods.cam

    assert cnnlens.methods.CnnlensWarning is CnnlensWarning is cnnlens.methods.cam.CnnlensWarning
    assert cnnlens.CnnlensWarning is CnnlensWarning


def test_cam_classes_bind_with_typed_keywords() -> None:
    from cnnlens.methods.cam import GradCAM, GradCAMPlusPlus

    typed = GradCAMPlusPlus.bind(alpha_normalize=True)
    assert typed.id == "gradcampp"
    assert typed.variant() == get_method("gradcampp").bind(alpha_normalize=True).variant()
    assert GradCAM.bind(relu=False).variant() == {"relu": False}
    with pytest.raises(TypeError):
        GradCAMPlusPlus.bind(alpha_normalise=True)  # type: ignore[call-arg]


def test_a_cam_without_weights_or_combine_is_refused_when_defined() -> None:
    from cnnlens.methods.cam import CamMethod

    with pytest.raises(TypeError, match="neither weights"):

        class Nothing(CamMethod):  # defines no weighting at all
            id = "toy_nothing"

    class Weighted(CamMethod):
        id = "toy_weighted"

        def weights(self, activation: torch.Tensor, gradient: torch.Tensor, **options: object) -> torch.Tensor:
            return gradient.mean(dim=(2, 3))

    assert Weighted().weights(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1)).shape == (1, 2)
