"""Re-initialising Keras layers for the cascading randomisation test, and restoring them exactly afterwards.

A Keras layer's weights are Keras variables (torch parameters inside its ``_torch_params``), so torch's
``parameters(recurse=False)`` of the layer is empty and torch's ``reset_parameters()`` does not exist. Here a
layer is re-initialised the way Keras would build it afresh: each of its own variables is drawn again from the
layer's initializer for it (``kernel_initializer`` for ``kernel``, ``bias_initializer`` for ``bias``,
``depthwise_initializer`` for ``depthwise_kernel``, ``moving_variance_initializer``...), as a new initializer
of the same class and configuration seeded by cnnlens (an unseeded Keras initializer keeps the seed it drew
when the model was built, so calling it again would give the very same weights back). A variable with no
initializer found is drawn from a normal distribution with its own mean and standard deviation (0.01 when
constant), as :func:`cnnlens.metrics.randomisation.randomise_module` does for torch parameters.

The Keras model is randomised in place (a Keras model is not reliably deep-copyable) inside
:func:`keras_variables_restored`, which saves every variable of the model first and assigns the saved values
back afterwards, after an error too: the model's outputs are then bit-identical to before.

Example:
    >>> with keras_variables_restored(net):  # doctest: +SKIP
    ...     randomise_keras_layer(net.keras_model.get_layer("predictions"), seed=0)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cnnlens.errors import ModelConfigError
from cnnlens.models.keras.module import KerasModule

__all__ = ["keras_cascade_layers", "keras_variables_restored", "own_variables", "randomise_keras_layer"]


def own_variables(layer: Any) -> list[Any]:
    """The Keras variables a layer holds itself (not its sublayers'), in creation order."""
    return [*getattr(layer, "_trainable_variables", []), *getattr(layer, "_non_trainable_variables", [])]


def keras_cascade_layers(module: KerasModule) -> list[str]:
    """The Keras layers a cascading randomisation re-initialises, top (logits) first.

    Every layer that holds variables itself (a nested model is not one: its layers are), in reversed Keras
    layer order (``model.layers``, a topological order of the graph): the head first, the first convolution
    last.

    Example:
        >>> keras_cascade_layers(wrap_keras(keras.applications.VGG16(weights=None)))[:2]  # doctest: +SKIP
        ['predictions', 'fc2']
    """
    keras = sys.modules["keras"]
    names = [
        path for path, layer in module.keras_layer_paths if not isinstance(layer, keras.Model) and own_variables(layer)
    ]
    return names[::-1]


def _initializer(layer: Any, variable_name: str) -> Any:
    """The layer's initializer for one of its variables, or None."""
    base = variable_name.removesuffix("_kernel") if variable_name != "kernel" else variable_name
    for attr in (f"{variable_name}_initializer", f"{base}_initializer"):
        found = getattr(layer, attr, None)
        if found is not None and callable(found):
            return found
    return None


def _reseeded(initializer: Any, seed: int) -> Any:
    """A copy of a Keras initializer drawing from ``seed``; a constant initializer as it is."""
    get_config = getattr(initializer, "get_config", None)
    if not callable(get_config):
        return initializer
    config = dict(get_config())
    if "seed" not in config:  # Zeros, Ones, Constant, Identity...: no randomness to draw
        return initializer
    config["seed"] = seed
    try:
        return type(initializer).from_config(config)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(
            f"cannot re-seed the Keras initializer {type(initializer).__name__} ({exc}); pass cascade= without "
            "the layers that use it."
        ) from exc


def randomise_keras_layer(layer: Any, seed: int) -> None:
    """Re-initialise the variables a Keras layer holds itself, in place, reproducibly (see the module docstring).

    Args:
        layer: a Keras layer.
        seed: the seed; variable ``i`` of the layer draws from ``seed * 1000 + i``.
    """
    variables = own_variables(layer)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i, variable in enumerate(variables):
            shape = tuple(int(d) for d in variable.shape)
            current = torch.as_tensor(variable.value)
            sub_seed = (seed * 1000 + i) % (2**31 - 1)
            init = _initializer(layer, str(variable.name))
            if init is not None:
                values = torch.as_tensor(_reseeded(init, sub_seed)(shape, dtype=variable.dtype))
            else:
                flat = current.detach().double().flatten()
                std = float(flat.std()) if flat.numel() > 1 else 0.0
                mean = float(flat.mean()) if flat.numel() else 0.0
                gen = torch.Generator(device="cpu").manual_seed(sub_seed)
                values = torch.randn(shape, generator=gen, dtype=torch.float64) * (std if std > 0 else 0.01) + mean
            variable.assign(values.to(device=current.device, dtype=current.dtype))


@contextmanager
def keras_variables_restored(module: KerasModule) -> Iterator[None]:
    """Save every variable of the wrapped Keras model, and assign the saved values back on exit (after errors too).

    Example:
        >>> with keras_variables_restored(net):  # doctest: +SKIP
        ...     randomise_keras_layer(layer, 0)
    """
    saved = [(v, torch.as_tensor(v.value).detach().clone()) for v in module.keras_model.variables]
    try:
        yield
    finally:
        with torch.no_grad():
            for variable, value in saved:
                variable.assign(value)
