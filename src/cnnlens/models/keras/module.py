""":class:`KerasModule`: a Keras 3 model (torch backend) seen by cnnlens as an ordinary ``nn.Module``.

With ``KERAS_BACKEND=torch`` every Keras layer is a ``torch.nn.Module``: forward hooks fire during an ordinary
call and ``torch.autograd`` differentiates through it, so cnnlens's capture serves Keras models unchanged. What
the wrapper adds:

- **NCHW in, logits out.** It takes the NCHW float input every cnnlens model takes (so saliency, integrated
  gradients, display and preprocessing are unchanged; 'caffe' preprocessing already gives BGR channels),
  permutes it to NHWC, calls the Keras model with ``training=False`` (Keras ignores ``.eval()``) and
  returns logits: when the model ends in a softmax (a ``Dense(activation="softmax")`` or a softmax
  ``Activation``/``Softmax`` layer), the logits are the final Dense's pre-activation ``h @ kernel + bias``, with
  ``h`` from a Functional sub-model that shares the model's layers up to that Dense's input: nothing is copied
  or mutated. When the model ends in a nested model that ends in a softmax (a classifier built as its own
  ``keras.Model`` and called last), the logits are that nested model's pre-softmax, the same way (the outer
  graph up to the nested model, then the nested model up to its final Dense's input).
- **Every layer by its Keras path.** A functional model does not register its layers as torch submodules, so
  :meth:`KerasModule.named_modules` lists every Keras layer under its path (``block5_conv3``, and
  ``vgg16/block5_conv3`` inside a nested model); :attr:`KerasModule.cnnlens_layer_aliases` maps a bare name
  to its path when it is unique, :attr:`KerasModule.cnnlens_layer_ambiguous` lists the paths of a bare name
  that ends several (refused with those paths).
- **Layouts.** :attr:`KerasModule.cnnlens_layout` (``"nhwc"`` for ``channels_last``) tells
  :mod:`cnnlens.capture.geometry` that every 4-D layer output is channels-last: no heuristic.
- **Devices.** The call runs in ``keras.device(<the weights' device>)``: Keras moves inputs to its current
  device (CUDA by default when available), so the weights' device decides.
- **Frozen bases.** With ``trainable=False`` Keras variables do not require grad; the wrapper makes its
  input require grad (a detached alias, the caller's tensor is untouched) so gradients reach the layers.

Example:
    >>> import keras  # doctest: +SKIP
    >>> net = wrap_keras(keras.applications.VGG16(weights=None))  # doctest: +SKIP
    >>> net(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([1, 1000])
    >>> net.cnnlens_layer_aliases.get("block5_conv3", "block5_conv3")  # doctest: +SKIP
    'block5_conv3'
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from cnnlens.errors import InputShapeError, ModelConfigError, ModelTypeError
from cnnlens.models.keras.backend import import_keras
from cnnlens.models.preprocessing import Preprocessing

__all__ = ["KerasModule", "is_keras_model", "keras_layers", "kernel_oihw", "wrap_keras"]

_log = logging.getLogger(__name__)


def is_keras_model(obj: object) -> bool:
    """Whether ``obj`` is a Keras 3 model, without importing Keras (False when it was never imported).

    Example:
        >>> is_keras_model(torch.nn.Linear(2, 2))
        False
    """
    keras = sys.modules.get("keras")
    model_cls = getattr(keras, "Model", None) if keras is not None else None
    return isinstance(model_cls, type) and isinstance(obj, model_cls)


def _sublayers(layer: Any) -> list[Any]:
    """A layer's own layers: a model's ``layers``; a custom layer's tracked sublayers (Keras's ``_layers``)."""
    if isinstance(layer, sys.modules["keras"].Model):
        return list(layer.layers)
    found = getattr(layer, "_layers", None)  # Keras 3 tracks sublayers set as attributes here
    return list(found) if isinstance(found, (list, tuple)) else []


def _walk(model: Any, prefix: str, out: list[tuple[str, Any]], seen: set[int] | None = None) -> None:
    keras = sys.modules["keras"]
    seen = set() if seen is None else seen
    for layer in _sublayers(model):
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in seen:
            continue
        seen.add(id(layer))
        path = f"{prefix}{layer.name}"
        out.append((path, layer))
        _walk(layer, f"{path}/", out, seen)


def keras_layers(module: nn.Module | Any) -> list[tuple[str, Any]]:
    """Every Keras layer of a model, ``(path, layer)`` in the model's layer order, nested models recursed.

    A nested model (or a custom layer with sublayers) is listed itself (``vgg16``) and then its layers
    (``vgg16/block5_conv3``); input layers are left out (they never run); a layer shared by several parents is
    listed once, under its first path.

    Args:
        module: a :class:`KerasModule` or a Keras model.

    Returns:
        the ``(path, layer)`` pairs.

    Raises:
        ModelTypeError: ``module`` is neither.

    Example:
        >>> [p for p, _ in keras_layers(net)][:2]  # doctest: +SKIP
        ['block1_conv1', 'block1_conv2']
    """
    if isinstance(module, KerasModule):
        return list(module.keras_layer_paths)
    if not is_keras_model(module):
        raise ModelTypeError(f"keras_layers takes a KerasModule or a Keras model; received {type(module).__name__}.")
    out: list[tuple[str, Any]] = []
    _walk(module, "", out)
    return out


def kernel_oihw(layer: Any) -> torch.Tensor | None:
    """A Keras convolution's kernel in torch's ``(out, in/groups, kh, kw)`` order (a detached copy), or None.

    Keras stores ``Conv2D`` kernels as HWIO ``(kh, kw, in, out)`` (torch: ``kernel.permute(3, 2, 0, 1)``) and
    ``DepthwiseConv2D`` kernels as ``(kh, kw, in, multiplier)`` (torch: ``(in * multiplier, 1, kh, kw)``); for a
    ``SeparableConv2D`` the depthwise kernel is returned. Other layers: None.

    Example:
        >>> kernel_oihw(net.keras_model.get_layer("block1_conv1")).shape  # doctest: +SKIP
        torch.Size([64, 3, 3, 3])
    """
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    layers = keras.layers
    if isinstance(layer, (layers.DepthwiseConv2D, layers.SeparableConv2D)):
        kernel = getattr(layer, "depthwise_kernel", None)
        if kernel is None:
            kernel = getattr(layer, "kernel", None)
        if kernel is None:
            return None
        k = torch.as_tensor(kernel.value).detach()
        kh, kw, cin, mult = k.shape
        return k.permute(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw).clone()
    if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose):
        k = torch.as_tensor(layer.kernel.value).detach()
        return k.permute(3, 2, 0, 1).clone()
    return None


def _producer(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history is not None else None


def _split_softmax(keras: Any, model: Any) -> tuple[Any, Any, str]:
    """``(body, head Dense or None, how logits are taken)`` for a model, without copying or mutating it."""
    outputs = getattr(model, "outputs", None)
    inputs = getattr(model, "inputs", None)
    if not outputs or not inputs:  # a subclassed model: no graph to cut
        return model, None, "the model's outputs (a subclassed model: no graph to take logits from)"
    if len(outputs) != 1 or len(inputs) != 1:
        raise ModelConfigError(
            f"the Keras model {model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs; cnnlens explains "
            "models with one image input and one class-score output. Wrap the part to explain in "
            "keras.Model(inputs=image_input, outputs=class_scores)."
        )
    last = _producer(outputs[0])
    softmax = keras.activations.softmax
    if isinstance(last, keras.layers.Dense) and last.activation is softmax:
        return keras.Model(inputs, last.input), last, f"pre-softmax of the final Dense {last.name!r}"
    if isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and last.activation is softmax
    ):
        return keras.Model(inputs, last.input), None, f"input of the final softmax layer {last.name!r}"
    if (
        isinstance(last, keras.Model)
        and getattr(last, "outputs", None)
        and len(getattr(last, "inputs", None) or ()) == 1
    ):
        inner_body, inner_head, inner_how = _split_softmax(keras, last)
        if inner_how.startswith(("pre-softmax", "input of the final softmax")):
            node_inputs = _node_inputs(model, last)
            if node_inputs is None:
                _log.warning(
                    "the Keras model %r ends in the nested model %r whose last layer is a softmax, and that model "
                    "is called more than once (or on several inputs): cnnlens explains its probabilities, not logits",
                    model.name,
                    last.name,
                )
                how = f"the model's outputs (probabilities: the softmax is inside the nested model {last.name!r})"
                return model, None, how
            prefix = None if node_inputs is inputs[0] else keras.Model(inputs, node_inputs)
            return _Chain(prefix, inner_body), inner_head, f"{inner_how} inside the nested model {last.name!r}"
    return model, None, "the model's outputs (it does not end in a softmax)"


def _node_inputs(model: Any, nested: Any) -> Any:
    """The one symbolic tensor ``model`` feeds ``nested`` (its last layer), or None when that is not one call."""
    nodes = [node for node in getattr(nested, "_inbound_nodes", []) if getattr(node, "operation", nested) is nested]
    mine = [node for node in nodes if any(t is model.outputs[0] for t in getattr(node, "outputs", ()))]
    if len(mine) != 1:
        return None
    args = list(getattr(mine[0], "input_tensors", ()) or ())
    return args[0] if len(args) == 1 else None


class _GraphRunner:
    """Runs a functional Keras model's graph as Keras does, dropping each layer output after its last use.

    Keras's own ``Functional.call`` keeps every intermediate output until the call returns, so one forward holds
    the sum of all its layers' outputs (about 530 MB per 299x299 image for InceptionResNetV2, 590 MB per 224x224
    one for VGG16), and cnnlens's memory-bounded metrics then run one image per forward. This runner visits the
    same nodes in the same order (Keras's ``_nodes_by_depth``, deepest first) and calls the same layers with the
    same arguments and ``training`` flag, so outputs are bit-identical and hooks fire alike, but it releases a
    tensor once no later node reads it. :meth:`of` returns None when the model is not a plain functional graph this
    runner understands (then the model's own call is used).
    """

    def __init__(self, functional: Any, steps: list[tuple[Any, Any, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.functional = functional
        self.steps = steps
        self.input_id = id(functional.inputs[0])
        self.output_id = id(functional.outputs[0])

    @classmethod
    def of(cls, functional: Any) -> _GraphRunner | None:
        """A runner for a one-input, one-output functional model (float32), or None."""
        by_depth = getattr(functional, "_nodes_by_depth", None)
        inputs, outputs = getattr(functional, "inputs", None), getattr(functional, "outputs", None)
        policy = getattr(getattr(functional, "dtype_policy", None), "name", "float32")
        if not isinstance(by_depth, dict) or not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
            return None
        if policy != "float32" or not hasattr(functional, "_get_operation_for_node"):
            return None
        try:
            order = [
                node
                for depth in sorted(by_depth, reverse=True)
                for node in by_depth[depth]
                if node.operation and not node.is_input
            ]
            reads = [tuple(id(t) for t in node.input_tensors) for node in order]
            last: dict[int, int] = {}
            for i, ids in enumerate(reads):
                for tid in ids:
                    last[tid] = i
            keep = id(outputs[0])
            steps = [
                (
                    node,
                    functional._get_operation_for_node(node),
                    ids,
                    tuple(t for t in dict.fromkeys(ids) if last[t] == i and t != keep),
                )
                for i, (node, ids) in enumerate(zip(order, reads, strict=True))
            ]
        except (AttributeError, TypeError):  # another Keras version's graph: use the model's own call
            return None
        return cls(functional, steps)

    def __call__(self, x: Any, training: bool = False) -> Any:
        tree = sys.modules["keras"].tree
        values: dict[int, Any] = {self.input_id: x}
        for node, operation, reads, frees in self.steps:
            if any(tid not in values for tid in reads):
                continue  # not computable from this input (as Keras skips it)
            args, kwargs = node.arguments.fill_in(values)
            if "training" in getattr(operation, "_call_context_args", ()):
                kwargs["training"] = training
            outputs = operation(*args, **kwargs)
            for ref, value in zip(node.outputs, tree.flatten(outputs), strict=False):
                values[id(ref)] = value
            for tid in frees:
                values.pop(tid, None)
        if self.output_id not in values:
            return self.functional(x, training=training)  # not connected as expected: Keras's own call says why
        return values[self.output_id]


def _runner(model: Any) -> Any:
    """A :class:`_GraphRunner` for a functional model, else the model itself (called as Keras calls it)."""
    return _GraphRunner.of(model) or model


class _Chain:
    """``body(prefix(x))``: the outer graph up to a nested last model, then that model's pre-softmax sub-model.

    Both share the model's layers (built on its existing symbolic tensors: no layer is called, copied or
    changed); ``prefix`` None when the nested model takes the outer input itself.
    """

    def __init__(self, prefix: Any, body: Any) -> None:
        self.prefix = prefix
        self.body = body

    def __call__(self, x: Any, training: bool = False) -> Any:
        h = x if self.prefix is None else self.prefix(x, training=training)
        return self.body(h, training=training)


class KerasModule(nn.Module):
    """A Keras 3 model (torch backend) as a cnnlens model: NCHW input, logits output, layers by Keras path.

    Use :func:`wrap_keras` to build one. The Keras model is held, not copied: its weights and ``trainable``
    flags are never changed by cnnlens.

    Attributes:
        keras_model: the wrapped Keras model.
        preprocessing: the cnnlens preprocessing of its inputs, when known.
        class_names: one name per output, when known.
        logits_from: how the logits are taken, human-readable.
        cnnlens_layout: ``"nhwc"`` (Keras ``channels_last``) or ``"nchw"``: the layout of every 4-D layer output.
    """

    keras_model: Any
    _body: Any
    _head: Any

    def __init__(
        self,
        keras_model: Any,
        *,
        preprocessing: Preprocessing | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        keras = import_keras()
        if not isinstance(keras_model, keras.Model):
            raise ModelTypeError(
                f"wrap_keras takes a Keras 3 model (keras.Model); received {type(keras_model).__name__}."
            )
        if not keras_model.built:
            raise ModelConfigError(
                f"the Keras model {keras_model.name!r} is not built (its weights do not exist yet); call it once on "
                "an input batch or model.build((None, H, W, 3)) before wrapping it."
            )
        super().__init__()
        self.keras_model = keras_model
        self.preprocessing = preprocessing
        self.class_names = list(class_names) if class_names is not None else None
        channels_last = keras.config.image_data_format() == "channels_last"
        self.cnnlens_layout: Literal["nhwc", "nchw"] = "nhwc" if channels_last else "nchw"
        body, head, how = _split_softmax(keras, keras_model)
        if isinstance(body, _Chain):
            body = _Chain(body.prefix and _runner(body.prefix), _runner(body.body))
        else:
            body = _runner(body)
        object.__setattr__(self, "_body", body)  # shares the model's layers; not a registered submodule
        object.__setattr__(self, "_head", head)
        self.logits_from = how
        paths: list[tuple[str, Any]] = []
        _walk(keras_model, "", paths)
        self.keras_layer_paths: tuple[tuple[str, Any], ...] = tuple(paths)
        bare: dict[str, list[str]] = {}
        for path, _ in paths:
            bare.setdefault(path.rsplit("/", 1)[-1], []).append(path)
        full = {path for path, _ in paths}
        self.cnnlens_layer_aliases: dict[str, str] = {
            name: found[0] for name, found in bare.items() if len(found) == 1 and name not in full
        }
        self.cnnlens_layer_ambiguous: dict[str, list[str]] = {
            name: found for name, found in bare.items() if len(found) > 1 and name not in full
        }

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """The wrapper (``""``) and every Keras layer under its Keras path (``vgg16/block5_conv3``).

        Keras internals (each layer's ``_torch_params``) are not listed; :meth:`named_parameters` still
        yields every weight.
        """
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for path, layer in self.keras_layer_paths:
            if remove_duplicate:
                if layer in memo:
                    continue
                memo.add(layer)
            yield (f"{prefix}.{path}" if prefix else path), layer

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The Keras model's weights (as torch parameters), named ``keras_model._torch_params.<var path>``."""
        sub = f"{prefix}.keras_model" if prefix else "keras_model"
        if not recurse:
            return iter(())
        return self.keras_model.named_parameters(prefix=sub, recurse=True, remove_duplicate=remove_duplicate)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an NCHW float batch (see the module docstring)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(
                f"a Keras model wrapped by cnnlens takes an NCHW float tensor (B, C, H, W); received {shape}. "
                "Pass images through the model's preprocessing (it makes NCHW tensors)."
            )
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # frozen (trainable=False) layers: gradients still flow
        h = x.permute(0, 2, 3, 1) if self.cnnlens_layout == "nhwc" else x
        param = next(self.keras_model.parameters(), None)
        device = str(param.device) if param is not None else str(x.device)
        with sys.modules["keras"].device(device):  # Keras moves inputs to its scope's device: the weights' one
            out = self._body(h, training=False)
        if not isinstance(out, torch.Tensor):
            raise ModelConfigError(
                f"the Keras model {self.keras_model.name!r} returned {type(out).__name__}, not one tensor; cnnlens "
                "explains models with one class-score output."
            )
        head = self._head
        if head is not None:
            out = torch.matmul(out, torch.as_tensor(head.kernel.value))
            if head.use_bias:
                out = out + torch.as_tensor(head.bias.value)
        return out

    def extra_repr(self) -> str:
        """The Keras model's name, layer count and how logits are taken."""
        return f"keras_model={self.keras_model.name!r}, layers={len(self.keras_layer_paths)}, logits={self.logits_from}"


def wrap_keras(
    keras_model: Any,
    *,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> KerasModule:
    """Wrap a built Keras 3 model (torch backend) as a :class:`KerasModule`.

    Args:
        keras_model: a Sequential, functional, nested or subclassed ``keras.Model`` (built).
        preprocessing: how images become its inputs (cnnlens :class:`Preprocessing`), when known.
        class_names: one name per output, when known.

    Returns:
        the wrapper; the Keras model is shared, not copied.

    Raises:
        KerasBackendError: Keras runs on another backend in this process.
        ModelTypeError: ``keras_model`` is not a Keras model.
        ModelConfigError: it is not built, or it has several inputs or outputs.

    Example:
        >>> net = wrap_keras(keras.applications.VGG16(weights=None))  # doctest: +SKIP
        >>> net.logits_from  # doctest: +SKIP
        "pre-softmax of the final Dense 'predictions'"
    """
    return KerasModule(keras_model, preprocessing=preprocessing, class_names=class_names)
