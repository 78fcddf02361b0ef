"""Memory of Keras forwards, and so the chunk sizes of cnnlens's batched metric forwards (issue 12, speed).

Two things made every metric forward of a Keras model run one image at a time (``compare-models`` on the four
``keras.applications`` models took hours on two cores):

* cnnlens's footprint measurement (:func:`cnnlens.batching.measured_call`) counted a view of a pre-existing
  tensor as a new storage; a Keras layer reads its kernel through such views (HWIO -> OIHW), so a VGG16 forward
  "allocated" its 411 MB fc1 kernel;
* Keras's ``Functional.call`` keeps every layer output until the call returns; the wrapper runs the same graph
  releasing each output after its last reader (:class:`cnnlens.models.keras.module._GraphRunner`), with
  bit-identical outputs.

A 32x32 model: Keras import about 10 s, the tests about 2 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from cnnlens.batching import measure_peak_bytes, measured_call, plan_chunk
from cnnlens.capture import record
from cnnlens.execution import DEFAULT

MIB = 2**20


def test_views_of_existing_tensors_are_not_counted() -> None:
    weight = torch.ones(1 << 20)  # 4 MiB that exist before the call

    def work() -> torch.Tensor:
        view = weight.view(1024, 1024).t()  # no allocation: a view of the weight
        return view.sum()

    assert measure_peak_bytes(work) < 64 * 1024
    made = measure_peak_bytes(lambda: (weight.view(1024, 1024).t() * 2).sum())  # a real 4 MiB result
    assert 4 * MIB <= made < 5 * MIB


pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")


@pytest.fixture(scope="module")
def deep() -> Any:
    """Twelve 32-channel convs on 32x32 with a branch and a merge, then a softmax head: many live outputs."""
    from cnnlens.models.keras import import_keras

    keras = import_keras()
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(inp)
    for i in range(10):
        x = layers.Conv2D(32, 3, padding="same", activation="relu", name=f"conv{i}")(x)
    side = layers.Conv2D(32, 1, name="side")(x)
    x = layers.Add(name="merge")([x, side])
    out = layers.Dense(5, activation="softmax", name="head")(layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inp, out, name="deep")


def test_the_graph_runner_gives_keras_outputs_bit_for_bit(deep: Any) -> None:
    from cnnlens.models.keras import wrap_keras
    from cnnlens.models.keras.module import _GraphRunner

    net = wrap_keras(deep)
    assert isinstance(net._body, _GraphRunner)
    keras_body = net._body.functional  # the pre-softmax sub-model, called the way Keras calls it
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        mine = net._body(x.permute(0, 2, 3, 1))
        theirs = torch.as_tensor(keras_body(x.permute(0, 2, 3, 1), training=False))
        assert torch.equal(mine, theirs)
    # hooks fire as under Keras's own call: the same activation and gradient at an inner layer
    rec = record(net, x, "conv4", gradients=True)
    object.__setattr__(net, "_body", keras_body)
    try:
        ref = record(net, x, "conv4", gradients=True)
    finally:
        object.__setattr__(net, "_body", _GraphRunner.of(keras_body))
    assert torch.equal(rec.activations["conv4"], ref.activations["conv4"])
    assert torch.equal(rec.gradients["conv4"], ref.gradients["conv4"])


def test_keras_forwards_are_batched_by_the_metrics(deep: Any) -> None:
    from cnnlens.models.keras import wrap_keras

    net = wrap_keras(deep)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        _, mine = measured_call(lambda: net(x))
        runner = net._body
        object.__setattr__(net, "_body", runner.functional)
        try:
            _, kept = measured_call(lambda: net(x))  # Keras's call keeps the 13 conv outputs alive
        finally:
            object.__setattr__(net, "_body", runner)
    per_output = 32 * 32 * 32 * 4
    assert kept >= 12 * per_output
    assert mine <= 6 * per_output  # a few outputs (and Keras's layout copies) at a time
    assert plan_chunk(mine, DEFAULT, torch.device("cpu")) > 3 * plan_chunk(kept, DEFAULT, torch.device("cpu"))
