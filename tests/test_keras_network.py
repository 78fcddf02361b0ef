"""Network-wide methods on Keras models (issue 12): FullGrad and the cascading randomisation sanity check.

Both read every layer's weights, which a Keras model keeps as Keras variables (torch parameters under each
layer's ``_torch_params``), with activations fused into Conv2D/Dense. The oracle is the same network built in
torch with the same weights (kernels HWIO -> OIHW, depthwise ``(kh, kw, C, 1)`` -> ``(C, 1, kh, kw)``, Dense
kernels transposed, BatchNormalization's moving statistics as BatchNorm2d's running ones), as in
``tests/test_keras_exact.py``: FullGrad maps must agree to float32 rounding. Layers FullGrad cannot use exactly
(a fused ``swish``, a ``LayerNormalization``) are refused by name. The randomisation re-initialises Keras
layers top-down and must leave the model bit-identical afterwards, after an error too.

A 16x16 model: Keras import about 10 s, the tests together about 3 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import cnnlens
from cnnlens.errors import MethodError
from cnnlens.methods.fullgrad import fullgrad_decomposition

if importlib.util.find_spec("keras") is None:
    pytest.skip("Keras models need keras 3 (pip install 'cnnlens[keras]')", allow_module_level=True)

from cnnlens.metrics import randomisation
from cnnlens.metrics.randomisation import cascade_layers, cascading_randomisation
from cnnlens.models.keras import import_keras, wrap_keras


def _t(variable: Any) -> torch.Tensor:
    return torch.as_tensor(variable.value).detach().clone()


@pytest.fixture(scope="module")
def keras() -> Any:
    return import_keras()


def _keras_net(keras: Any, seed: int = 0) -> Any:
    """Conv2D(relu) -> BN -> DepthwiseConv2D -> ReLU -> MaxPool -> Conv2D(relu) -> Dense(relu) on 4-D -> GAP ->
    Dense(softmax), every weight (BN statistics too) random so every bias term carries signal."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = layers.ReLU(name="r")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(5, 3, padding="same", activation="relu", name="c2")(x)
    x = layers.Dense(7, activation="relu", name="pointwise")(x)  # a Dense on (B, h, w, C): a 1x1 conv
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(4, activation="softmax", name="head")(x)
    model = keras.Model(inp, out, name="small")
    gen = torch.Generator().manual_seed(seed + 1)
    for variable in model.weights:
        values = torch.randn(tuple(variable.shape), generator=gen) * 0.5
        if variable.name == "moving_variance":
            values = values.abs() + 0.5
        variable.assign(values)
    return model


def _torch_twin(model: Any) -> nn.Module:
    """The same network in torch, with the Keras model's weights."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6, eps=1e-3),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 7, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 4),
    ).eval()  # fmt: skip
    get = model.get_layer
    with torch.no_grad():
        for index, name in ((0, "c1"), (6, "c2")):
            net[index].weight.copy_(_t(get(name).kernel).permute(3, 2, 0, 1))
            net[index].bias.copy_(_t(get(name).bias))
        bn = get("bn")
        net[2].weight.copy_(_t(bn.gamma))
        net[2].bias.copy_(_t(bn.beta))
        net[2].running_mean.copy_(_t(bn.moving_mean))
        net[2].running_var.copy_(_t(bn.moving_variance))
        net[3].weight.copy_(_t(get("dw").kernel).permute(2, 3, 0, 1).reshape(6, 1, 3, 3))
        net[3].bias.copy_(_t(get("dw").bias))
        net[8].weight.copy_(_t(get("pointwise").kernel).T[:, :, None, None])
        net[8].bias.copy_(_t(get("pointwise").bias))
        net[12].weight.copy_(_t(get("head").kernel).T)
        net[12].bias.copy_(_t(get("head").bias))
    return net


@pytest.fixture(scope="module")
def pair(keras: Any) -> SimpleNamespace:
    model = _keras_net(keras)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return SimpleNamespace(model=model, net=wrap_keras(model), tv=_torch_twin(model), x=x)


def test_the_torch_twin_is_the_same_network(pair: SimpleNamespace) -> None:
    with torch.no_grad():
        assert torch.allclose(pair.net(pair.x), pair.tv(pair.x), rtol=0, atol=1e-5)


def test_fullgrad_on_keras_equals_fullgrad_on_the_same_torch_network(pair: SimpleNamespace) -> None:
    ek = cnnlens.explain(pair.net, pair.x, methods=["fullgrad"], layers=["c2"], targets=[1, 3])
    et = cnnlens.explain(pair.tv, pair.x, methods=["fullgrad"], layers=["7"], targets=[1, 3])
    keras_map, torch_map = ek["fullgrad", None].raw, et["fullgrad", None].raw
    assert keras_map.shape == torch_map.shape == (2, 1, 16, 16)
    scale = float(torch_map.abs().max())
    assert scale > 1.0  # the input term and four spatial bias terms, each min-max normalised
    assert float((keras_map - torch_map).abs().max()) <= 1e-5 * scale
    assert float((ek["fullgrad", None].maps - et["fullgrad", None].maps).abs().max()) <= 1e-5


def _decomposition(model: nn.Module, x: torch.Tensor, layer: str, target: int) -> tuple[Any, Any, dict[str, Any]]:
    """``(view, input term, bias terms)`` that FullGrad computed inside explain()."""
    import cnnlens.methods.fullgrad as fg

    captured: list[Any] = []

    def spy(view: Any) -> Any:
        out = fullgrad_decomposition(view)
        captured.append((view, *out))
        return out

    fg.fullgrad_decomposition = spy
    try:
        cnnlens.explain(model, x, methods=["fullgrad"], layers=[layer], targets=target)
    finally:
        fg.fullgrad_decomposition = fullgrad_decomposition
    return captured[0]  # type: ignore[no-any-return]


def test_fullgrad_terms_are_the_keras_biases_before_their_fused_relu(pair: SimpleNamespace) -> None:
    """Each layer's bias term equals the torch term (a wrong ReLU mask, bias or channel axis would not)."""
    from cnnlens.methods.fullgrad import bias_modules

    assert bias_modules(pair.net) == ["c1", "bn", "dw", "c2", "pointwise"]  # the softmax head never runs
    _, k_input, k_terms = _decomposition(pair.net, pair.x, "c2", 2)
    _, t_input, t_terms = _decomposition(pair.tv, pair.x, "7", 2)
    assert torch.allclose(k_input, t_input, rtol=1e-5, atol=1e-6)
    for keras_name, torch_name in (("c1", "0"), ("bn", "2"), ("dw", "3"), ("c2", "6"), ("pointwise", "8")):
        k, t = k_terms[keras_name], t_terms[torch_name]
        assert k.shape == t.shape and float(t.abs().max()) > 1e-3, keras_name
        assert torch.allclose(k, t, rtol=1e-5, atol=1e-6 * float(t.abs().max())), keras_name


def test_fullgrad_decomposition_is_complete_on_keras(pair: SimpleNamespace) -> None:
    """Completeness (Srinivas & Fleuret, Eq. 2) on this piecewise-linear Keras network: the terms add up to the
    logit minus the head's bias (the wrapper computes the pre-softmax head itself: that bias is not recorded)."""
    view, input_term, bias_terms = _decomposition(pair.net, pair.x, "c2", 0)
    total = input_term.flatten(1).sum(1) + sum(t.flatten(1).sum(1) for t in bias_terms.values())
    head_bias = float(_t(pair.model.get_layer("head").bias)[0])
    assert torch.allclose(total, view.score.double() - head_bias, rtol=1e-5, atol=1e-5)


def test_fullgrad_refuses_layers_it_cannot_use_exactly(keras: Any) -> None:
    layers = keras.layers
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="swish", name="swishy")(inp)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.Conv2D(4, 3, activation="relu", name="fine")(x)
    out = layers.Dense(2)(layers.GlobalAveragePooling2D()(x))
    net = wrap_keras(keras.Model(inp, out))
    with pytest.raises(MethodError) as info:
        cnnlens.explain(net, torch.rand(1, 3, 8, 8), methods=["fullgrad"], layers=["fine"])
    message = str(info.value)
    assert "swishy (Conv2D with the fused activation 'silu')" in message  # Keras's name for swish
    assert "ln (LayerNormalization)" in message and "fine" not in message.split(".")[0]


def _variables(model: Any) -> list[torch.Tensor]:
    return [_t(v) for v in model.variables]


def test_cascade_runs_top_down_over_keras_layers(pair: SimpleNamespace) -> None:
    assert cascade_layers(pair.net) == ["head", "pointwise", "c2", "dw", "bn", "c1"]


def test_cascading_randomisation_on_keras_restores_the_model_bit_for_bit(pair: SimpleNamespace) -> None:
    with torch.no_grad():
        before = pair.net(pair.x).clone()
    weights = _variables(pair.model)
    result = cascading_randomisation(pair.net, pair.x, method="gradcam", layer="c2", seed=4, keep_maps=True)
    assert result.cascade == ["head", "pointwise", "c2", "dw", "bn", "c1"]
    assert result.randomised_maps is not None
    # randomising changed the maps (the head alone already changes which features matter)
    assert not torch.allclose(result.randomised_maps[0], result.original.maps[:, 0])
    assert float(result.spearman[-1].abs().max()) < 0.9
    with torch.no_grad():
        after = pair.net(pair.x)
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(weights, _variables(pair.model), strict=True))
    again = cascading_randomisation(pair.net, pair.x, method="gradcam", layer="c2", seed=4)
    assert torch.equal(again.spearman, result.spearman)  # reproducible from the seed


def test_keras_layers_are_drawn_afresh_not_from_the_build_seed(keras: Any, pair: SimpleNamespace) -> None:
    """An unseeded Keras initializer keeps the seed it drew at build time; the randomisation must not reuse it."""
    from cnnlens.models.keras.randomise import keras_variables_restored, randomise_keras_layer

    fresh = _keras_net(keras, seed=7)  # Keras's own init kept: built, then re-initialised by keras below
    layer = fresh.get_layer("c1")
    layer.kernel.assign(layer.kernel_initializer(tuple(layer.kernel.shape)))
    built = _t(layer.kernel)
    net = wrap_keras(fresh)
    with keras_variables_restored(net):
        randomise_keras_layer(layer, seed=0)
        first = _t(layer.kernel)
        randomise_keras_layer(layer, seed=0)
        assert torch.equal(first, _t(layer.kernel))
        assert not torch.equal(first, built)
        assert float(first.std()) > 0.05  # glorot-uniform scale, not a constant
        assert torch.equal(_t(layer.bias), torch.zeros(6))  # Keras's bias initializer: zeros
    assert torch.equal(_t(layer.kernel), built)


def test_keras_model_restored_after_an_error(pair: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _variables(pair.model)
    calls = {"n": 0}
    real = randomisation.explain

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(randomisation, "explain", failing)
    with pytest.raises(RuntimeError, match="boom"):
        cascading_randomisation(pair.net, pair.x, layer="c2")
    assert all(torch.equal(a, b) for a, b in zip(weights, _variables(pair.model), strict=True))
