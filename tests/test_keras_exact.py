"""Exactness of the Keras route (issue 12): Keras VGG16 and torchvision's ``vgg16`` with the same weights agree.

A random Keras ``VGG16`` (He-scaled weights, small random biases, so every layer carries signal) is ported into
torchvision's ``vgg16``: conv kernels HWIO -> OIHW, ``fc1``'s rows reordered from Keras's ``(7, 7, 512)``
flatten order to torch's ``(512, 7, 7)``, ``fc2`` and ``predictions`` transposed. Both models get the same
input, a real photo through cnnlens's Keras 'caffe' preprocessing (BGR, mean subtracted), and must agree:

* Keras ``block5_conv3`` (its ReLU is part of the Conv2D layer) equals torchvision ``features.29`` (the ReLU
  after the conv ``features.28``), not ``features.28`` itself;
* the :class:`~cnnlens.models.keras.KerasModule` logits (the pre-softmax of Keras's final Dense) equal
  torchvision's logits, and Keras's own softmax output is their softmax;
* Grad-CAM, Grad-CAM++ and guided backprop maps agree to float32 rounding.

Measured on this machine (float32, CPU; ``pytest -s`` prints them): block5_conv3 activations 1.0e-3 on a
scale of 348 (relative 2.9e-6; torchvision's own float32 error against float64 is the same size); logits
relative 3.4e-6; Grad-CAM maps 5.4e-6, Grad-CAM++ maps 3.0e-6, guided backprop maps 7.2e-7 (maps in [0, 1]).
Guided backprop is a product of ReLU masks, so a unit whose pre-activation lies within float32 rounding of zero
can switch sides in one framework and not the other: with another input (the photo resized differently) one
unit of block1_conv1 did (1,628,993 zeros in Keras, 1,628,992 in torchvision and in float64) and moved the map
by up to 2.5e-3 in an 11-row band. The guided-backprop bounds leave room for that; the CAM bounds do not need it.

Preprocessing: cnnlens's 'caffe' and 'tf' modes equal ``keras.applications.vgg16.preprocess_input`` and
``inception_v3.preprocess_input`` bit for bit (Keras is given a copy: it modifies float numpy input in place
and, in caffe mode, returns a negative-stride view).

The 224x224 models are built once per module (Keras import about 10 s, both builds and the two explain calls
about 20 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import cnnlens
from cnnlens.capture import record
from cnnlens.models.preprocessing import KERAS_CAFFE_224, KERAS_TF_299, Preprocessing

needs_keras = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None, reason="keras is not installed (pip install 'cnnlens[keras]')"
)

METHODS = ("gradcam", "gradcampp", "guided_backprop")


def _photo(size: int) -> np.ndarray:
    """A real photo (scikit-image's cat, shipped in its wheel), center-cropped square and resized."""
    from skimage import data

    img = data.chelsea()
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    t = torch.from_numpy(img[top : top + side, left : left + side].copy()).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _he_weights(keras: Any, model: Any, seed: int) -> None:
    """He-scaled conv kernels (Keras's glorot init fades with depth) and small random biases everywhere.

    Dense kernels keep Keras's own random init (drawing 120M new numbers would only cost time).
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            shape = tuple(layer.kernel.shape)
            layer.kernel.assign(torch.randn(shape, generator=gen) * math.sqrt(2.0 / math.prod(shape[:-1])))
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            layer.bias.assign(torch.randn(tuple(layer.bias.shape), generator=gen) * 0.05)


def port_vgg16(keras: Any, keras_model: Any, tv: torch.nn.Module) -> None:
    """Copy a Keras VGG16's weights into torchvision's vgg16 (HWIO -> OIHW, fc1 rows to the (512, 7, 7) order)."""
    convs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    kconvs = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Conv2D)]
    with torch.no_grad():
        for conv, layer in zip(convs, kconvs, strict=True):
            conv.weight.copy_(torch.as_tensor(layer.kernel.value).permute(3, 2, 0, 1))
            conv.bias.copy_(torch.as_tensor(layer.bias.value))
        # Keras flattens (h, w, c): row h*7*512 + w*512 + c; torch flattens (c, h, w): column c*49 + h*7 + w
        fc1 = torch.as_tensor(keras_model.get_layer("fc1").kernel.value)
        tv.classifier[0].weight.copy_(fc1.reshape(7, 7, 512, 4096).permute(2, 0, 1, 3).reshape(25088, 4096).T)
        tv.classifier[0].bias.copy_(torch.as_tensor(keras_model.get_layer("fc1").bias.value))
        for index, name in ((3, "fc2"), (6, "predictions")):
            tv.classifier[index].weight.copy_(torch.as_tensor(keras_model.get_layer(name).kernel.value).T)
            tv.classifier[index].bias.copy_(torch.as_tensor(keras_model.get_layer(name).bias.value))


@pytest.fixture(scope="module")
def pair() -> SimpleNamespace:
    torchvision = pytest.importorskip("torchvision")
    from cnnlens.models.keras import import_keras, wrap_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)  # Keras's own initialisers (the Dense kernels) are seeded by it
    km = keras.applications.VGG16(weights=None)  # ends in a softmax: the wrapper takes the pre-softmax logits
    _he_weights(keras, km, seed=0)
    with torch.device("meta"):  # no init: every weight is overwritten by the port
        tv = torchvision.models.vgg16(weights=None)
    tv = tv.to_empty(device="cpu").eval()
    port_vgg16(keras, km, tv)
    kmod = wrap_keras(km)
    x = KERAS_CAFFE_224.to_tensor(_photo(224))[None]  # BGR, caffe-normalised: what both models take
    rec_k = record(kmod, x, "block5_conv3", gradients=False)
    rec_t = record(tv, x, ["features.28", "features.29"], gradients=False)
    with torch.no_grad():
        keras_probs = torch.as_tensor(km(x.permute(0, 2, 3, 1), training=False))
    cls = int(rec_t.logits.argmax())
    ek = cnnlens.explain(kmod, x, methods=list(METHODS), layers=["block5_conv3"], targets=cls)
    et = cnnlens.explain(tv, x, methods=list(METHODS), layers=["features.29"], targets=cls)
    return SimpleNamespace(
        keras=keras, km=km, tv=tv, x=x, rec_k=rec_k, rec_t=rec_t, probs=keras_probs, cls=cls, ek=ek, et=et
    )


def _report(what: str, diff: float, scale: float) -> None:
    print(f"{what}: max |keras - torchvision| = {diff:.3g} (scale {scale:.3g}, relative {diff / scale:.2g})")


@needs_keras
def test_ported_kernels_are_the_keras_kernels_in_torch_order(pair: SimpleNamespace) -> None:
    from cnnlens.models.keras import kernel_oihw

    first = pair.km.get_layer("block1_conv1")
    oihw = kernel_oihw(first)
    assert oihw is not None and oihw.shape == (64, 3, 3, 3)
    assert torch.equal(oihw, pair.tv.features[0].weight.detach())
    # HWIO (kh, kw, in, out): element [i, j, c, o] is torch's [o, c, i, j]
    hwio = torch.as_tensor(first.kernel.value).detach()
    assert float(hwio[2, 0, 1, 5]) == float(pair.tv.features[0].weight.detach()[5, 1, 2, 0])


@needs_keras
def test_block5_conv3_equals_features_29_after_the_relu(pair: SimpleNamespace) -> None:
    a = pair.rec_k.activations["block5_conv3"]  # NHWC output, seen as (B, C, h, w)
    relu = pair.rec_t.activations["features.29"]
    conv = pair.rec_t.activations["features.28"]
    assert a.shape == relu.shape == (1, 512, 14, 14)
    scale = float(relu.abs().max())
    diff = float((a - relu).abs().max())
    _report("block5_conv3 vs features.29", diff, scale)
    assert diff <= 2e-5 * scale
    # Keras's Conv2D includes its ReLU: features.28 (before the ReLU) is negative where Keras is 0
    assert float(conv.min()) < -0.1 * scale
    assert float(a.min()) >= 0.0
    assert float((a - conv).abs().max()) > 0.1 * scale


@needs_keras
def test_logits_agree_and_are_the_pre_softmax(pair: SimpleNamespace) -> None:
    lk, lt = pair.rec_k.logits, pair.rec_t.logits
    assert lk.shape == lt.shape == (1, 1000)
    scale = float(lt.abs().max())
    diff = float((lk - lt).abs().max())
    _report("logits", diff, scale)
    assert diff <= 2e-5 * scale
    assert int(lk.argmax()) == pair.cls
    # the Keras model itself ends in a softmax; the wrapper's logits are its input
    torch.testing.assert_close(torch.softmax(lk, dim=1), pair.probs, rtol=1e-5, atol=1e-6)


@needs_keras
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_maps_agree_to_float32_rounding(pair: SimpleNamespace, method: str) -> None:
    a = pair.ek[method, "block5_conv3"]
    b = pair.et[method, "features.29"]
    assert a.raw.shape == b.raw.shape == (1, 1, 14, 14)
    assert a.maps.shape == b.maps.shape == (1, 1, 224, 224)
    assert not bool(a.degenerate.any()) and not bool(b.degenerate.any())
    assert a.target_classes.tolist() == b.target_classes.tolist() == [[pair.cls]]
    raw_scale = float(b.raw.abs().max())
    raw_diff = float((a.raw - b.raw).abs().max())
    _report(f"{method} raw", raw_diff, raw_scale)
    assert raw_diff <= 2e-5 * raw_scale
    map_diff = float((a.maps - b.maps).abs().max())
    _report(f"{method} maps", map_diff, 1.0)
    assert map_diff <= 2e-5
    torch.testing.assert_close(a.scores, b.scores, rtol=2e-5, atol=0.0)


@needs_keras
def test_guided_backprop_agrees_but_for_relu_masks_at_rounding_level(pair: SimpleNamespace) -> None:
    a = pair.ek["guided_backprop", "block5_conv3"]
    b = pair.et["guided_backprop", "features.29"]
    assert a.maps.shape == b.maps.shape == (1, 1, 224, 224)
    diff = (a.maps - b.maps).abs()
    _report("guided backprop maps", float(diff.max()), 1.0)
    far = float((diff > 1e-4).double().mean())
    print(f"guided backprop: mean difference {float(diff.mean()):.3g}; {far:.2%} of pixels differ by more than 1e-4")
    flat_a, flat_b = a.maps.flatten().double(), b.maps.flatten().double()
    cosine = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    print(f"guided backprop: cosine similarity 1 - {1 - cosine:.3g}")
    # Measured (AMD EPYC, 2026-12-06): avx512 and avx2 kernels max 7.2e-7, mean 3.9e-8; ATEN_CPU_CAPABILITY=default
    # with ONEDNN_MAX_CPU_ISA=SSE41: max 1.8e-2, mean 2.0e-6, 0.06 % of pixels above 1e-4, cosine 1 - 4e-7. A ReLU
    # mask flipped by rounding (a pre-activation within float32 rounding of zero) moves a narrow band by up to a few
    # 1e-2 on some kernels (module docstring); a wrong port moves the whole map, which the mean, the share of
    # differing pixels and the cosine catch.
    assert float(diff.max()) <= 5e-2
    assert far <= 5e-3
    assert float(diff.mean()) <= 2e-5
    assert cosine >= 1 - 1e-4


# -- preprocessing --------------------------------------------------------------------------------------------------


@needs_keras
@pytest.mark.parametrize(
    ("prep", "module"),
    [(KERAS_CAFFE_224, "vgg16"), (KERAS_TF_299, "inception_v3")],
    ids=["caffe-vgg16", "tf-inception_v3"],
)
def test_preprocessing_equals_keras_preprocess_input(prep: Preprocessing, module: str) -> None:
    from cnnlens.models.keras import import_keras

    keras = import_keras()
    preprocess_input = getattr(keras.applications, module).preprocess_input
    image = _photo(331)[:, 17:]  # not square: the resize and center crop are cnnlens's own geometry
    ours = prep.to_tensor(image)
    shown = prep.display_image(image)  # the geometry alone, uint8 (H, W, 3) RGB
    given = shown.astype(np.float32)
    theirs = np.asarray(preprocess_input(given.copy()))  # Keras modifies float input in place: give it a copy
    assert theirs.shape == (*prep.input_size, 3)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)).permute(2, 0, 1))
    # and cnnlens undoes it: back to the RGB pixels
    back = (prep.denormalize(ours) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, shown)


@needs_keras
def test_keras_preprocess_input_modifies_its_input_which_cnnlens_never_does() -> None:
    from cnnlens.models.keras import import_keras

    keras = import_keras()
    given = _photo(32).astype(np.float32)
    kept = given.copy()
    out = keras.applications.vgg16.preprocess_input(given)
    assert not np.array_equal(given, kept)  # Keras subtracted the mean from the caller's array
    assert any(s < 0 for s in out.strides)  # and returned a reversed (negative-stride) view
    image = kept.astype(np.uint8)
    copy = image.copy()
    Preprocessing((32, 32), 32, KERAS_CAFFE_224.mean, KERAS_CAFFE_224.std, mode="caffe").to_tensor(image)
    assert np.array_equal(image, copy)


def test_caffe_mode_is_bgr_and_display_images_shows_rgb() -> None:
    from cnnlens.explain import display_images
    from cnnlens.models.spec import LoadedModel, ModelSpec

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    image[..., 2] = 10  # a little blue
    prep = Preprocessing((4, 4), 4, KERAS_CAFFE_224.mean, KERAS_CAFFE_224.std, mode="caffe")
    x = prep.to_tensor(image)
    # channel 0 is blue minus the blue mean, channel 2 red minus the red mean (Keras's numbers, no scaling)
    assert torch.allclose(x[0], torch.full((4, 4), 10 - 103.939))
    assert torch.allclose(x[1], torch.full((4, 4), 0 - 116.779))
    assert torch.allclose(x[2], torch.full((4, 4), 200 - 123.68))
    assert prep.as_dict()["mode"] == "caffe"
    assert "mode" not in Preprocessing((4, 4), 4, (0.5,) * 3, (0.5,) * 3).as_dict()  # manifests of torch models
    spec = ModelSpec("toy", "toy", "test", prep, 3, "0", {}, "identity")
    loaded = LoadedModel(torch.nn.Identity(), spec, ["a", "b", "c"], "none", True)
    assert np.array_equal(display_images(x[None], loaded)[0].numpy(), image)


def test_preprocessing_mode_is_validated() -> None:
    from cnnlens.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match="mode must be one of"):
        Preprocessing((4, 4), 4, (0.5,) * 3, (0.5,) * 3, mode="bgr")
