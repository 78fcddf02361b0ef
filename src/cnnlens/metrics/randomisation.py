"""Sanity check: cascading model-parameter randomisation (Adebayo et al.), on a copy of the model.

``cascading_randomisation`` is long only by its docstring (paper, similarity formulas, example).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from cnnlens.capture import LayerSpec, resolve_layer
from cnnlens.execution import Execution
from cnnlens.explain import default_layer, explain
from cnnlens.explanation import Explanation
from cnnlens.maps import upsample
from cnnlens.metrics._common import MetricError, ModelLike, module_of
from cnnlens.metrics.similarity import spearman, ssim
from cnnlens.outputs import OutputSelector
from cnnlens.targets import TargetSpec

__all__ = ["RandomisationResult", "cascade_layers", "cascading_randomisation", "randomise_module"]


def _keras_support(module: object) -> ModuleType | None:
    """:mod:`cnnlens.models.keras.randomise` when ``module`` is a Keras model wrapper (never imports Keras itself)."""
    wrapper = sys.modules.get("cnnlens.models.keras.module")
    if wrapper is None or not isinstance(module, wrapper.KerasModule):
        return None
    from cnnlens.models.keras import randomise

    return randomise


def _is_keras_layer(module: object) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(module, keras.layers.Layer)


def cascade_layers(model: ModelLike) -> list[str]:
    """The modules a cascading randomisation re-initialises, in order: top (logits) first.

    Every module that owns parameters directly (``parameters(recurse=False)``), in *reversed definition
    order* (``named_modules()``). For the usual networks, whose heads are defined last, this runs from the
    logits towards the input. Where definition order differs from execution order (e.g. torchvision
    Inception's ``AuxLogits`` is defined between ``Mixed_6e`` and ``Mixed_7a``), pass your own ``cascade=``
    to :func:`cascading_randomisation`.

    Example:
        >>> cascade_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        ['1', '0']
    """
    module = module_of(model)
    keras_support = _keras_support(module)
    if keras_support is not None:
        found: list[str] = keras_support.keras_cascade_layers(module)
        return found
    names = [name for name, m in module.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    if any(True for _ in module.parameters(recurse=False)):
        names.insert(0, "")
    return names[::-1]


def randomise_module(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and its children) in place, reproducibly.

    Modules with ``reset_parameters()`` use it (PyTorch's own initialisation, as Quantus' MPRT does; for
    BatchNorm this also resets the running statistics). Parameters of modules without it are drawn from a
    normal distribution with the parameter's own mean and standard deviation (std 0.01 when it has a single
    element or is constant). The global RNG state is saved and restored (``torch.random.fork_rng``).

    A Keras layer is re-initialised from its Keras initializers, re-seeded
    (:func:`cnnlens.models.keras.randomise.randomise_keras_layer`).
    """
    if _is_keras_layer(module):
        from cnnlens.models.keras.randomise import randomise_keras_layer

        randomise_keras_layer(module, seed)
        return
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    covered: set[int] = set()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            reset = getattr(sub, "reset_parameters", None)
            if own and callable(reset):
                reset()
                covered.update(id(p) for p in own)
        with torch.no_grad():
            for p in module.parameters():
                if id(p) in covered:
                    continue
                flat = p.detach().double().flatten()
                std = float(flat.std()) if flat.numel() > 1 else 0.0
                mean = float(flat.mean()) if flat.numel() else 0.0
                p.normal_(mean, std if std > 0 else 0.01)


@dataclass(frozen=True)
class RandomisationResult:
    """Similarity between the original maps and the maps after each cascade step.

    Attributes:
        method: The method id.
        layer: The explained layer.
        cascade: The modules randomised, in order; step ``l`` has ``cascade[: l + 1]`` randomised.
        spearman: ``(L, B)`` Spearman rank correlation of the signed raw maps (upsampled, before ReLU).
        spearman_abs: ``(L, B)`` Spearman rank correlation of their absolute values.
        ssim: ``(L, B)`` SSIM of the normalised [0, 1] maps.
        undefined: ``(L, B)`` bool: a Spearman value is 0 because a map was constant.
        degenerate: ``(L, B)`` bool: the randomised normalised map is degenerate (all zero or constant).
        original_degenerate: ``(B,)`` bool: the original normalised map is degenerate.
        target_classes: ``(B,)`` the classes explained (the original model's; fixed for every step).
        original: The original model's :class:`Explanation`.
        randomised_maps: ``(L, B, H, W)`` normalised maps per step when ``keep_maps=True``, else None.
        seed: The randomisation seed.
    """

    method: str
    layer: str
    cascade: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    ssim: torch.Tensor
    undefined: torch.Tensor
    degenerate: torch.Tensor
    original_degenerate: torch.Tensor
    target_classes: torch.Tensor
    original: Explanation
    randomised_maps: torch.Tensor | None = None
    seed: int = 0

    def table(self) -> list[dict[str, float | str | int]]:
        """One row per cascade step: the module and the mean similarities over images."""
        return [
            {
                "step": step,
                "randomised": name,
                "spearman": float(self.spearman[step].mean()),
                "spearman_abs": float(self.spearman_abs[step].mean()),
                "ssim": float(self.ssim[step].mean()),
                "degenerate": float(self.degenerate[step].double().mean()),
            }
            for step, name in enumerate(self.cascade)
        ]


def _signed(exp: Explanation, size: tuple[int, int]) -> torch.Tensor:
    return upsample(exp.raw[:, 0].double(), size)


def _check_cascade(module: nn.Module, names: Sequence[str]) -> None:
    known = dict(module.named_modules())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MetricError(f"cascade names {unknown} are not modules of {type(module).__name__}; see cascade_layers().")
    if not names:
        raise MetricError(f"{type(module).__name__} has no module with parameters to randomise.")


@contextmanager
def _randomisable(module: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """The model to randomise: a deep copy, or a Keras model itself with every variable restored on exit."""
    keras_support = _keras_support(module)
    if keras_support is not None:
        _check_cascade(module, names)
        with keras_support.keras_variables_restored(module):
            yield module
        return
    twin = _twin(module, names)
    try:
        yield twin
    finally:
        del twin


def _twin(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of ``module`` to randomise, after checking that every cascade name is one of its modules."""
    _check_cascade(module, names)
    try:
        return copy.deepcopy(module)
    except Exception as exc:  # deepcopy failures come in many types; report them as one clear error
        raise MetricError(
            f"cannot copy {type(module).__name__} with copy.deepcopy ({type(exc).__name__}: {exc}); the "
            "randomisation test never modifies the user's model, so it needs a copy."
        ) from exc


def cascading_randomisation(
    model: ModelLike,
    inputs: torch.Tensor,
    *,
    method: str = "gradcam",
    layer: LayerSpec | None = None,
    targets: TargetSpec = None,
    options: Mapping[str, Any] | None = None,
    cascade: Sequence[str] | None = None,
    seed: int = 0,
    keep_maps: bool = False,
    output_selector: OutputSelector | None = None,
    execution: Execution | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation test, cascading from the logits towards the input.

    Paper: Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018
    (arXiv 1810.03292), §3 (cascading randomisation) and §3.1 (similarity metrics).

    Formula: let ``M_0`` be the method's map on the model and ``M_l`` its map after re-initialising the
    first ``l + 1`` modules of the cascade (:func:`cascade_layers`, top-down, cumulative; each step re-draws
    one more module with :func:`randomise_module`, seeded by ``seed + l``). Per image and step::

        spearman[l]     = ρ_s(M_0, M_l)               (signed raw maps, upsampled, before ReLU)
        spearman_abs[l] = ρ_s(|M_0|, |M_l|)
        ssim[l]         = SSIM(norm(M_0), norm(M_l))  (the normalised [0, 1] maps; Gaussian window 11, σ 1.5)

    A method that passes the check shows similarities falling towards 0 as more layers are randomised (the
    paper: gradients and Grad-CAM pass; guided backprop and guided Grad-CAM do not). Spearman values are 0 with
    ``undefined`` set where a map is constant; nothing is ever NaN.

    The randomisation runs on ``copy.deepcopy`` of the model: the user's model, its weights, buffers,
    training flags and the global RNG state are unchanged afterwards. A Keras model
    (:class:`~cnnlens.models.keras.KerasModule`) is randomised in place instead, its Keras layers re-initialised
    from their Keras initializers, and every Keras variable is assigned its saved value back afterwards (after an
    error too), so its outputs are bit-identical to before. Each step explains the classes the
    *original* model explained (a fixed class per image), at the same layer, with the same options.

    Args:
        model: The network (``nn.Module`` or LoadedModel).
        inputs: ``(B, C, H, W)`` preprocessed images.
        method: A registered method id (``"gradcam"``, ``"gradcampp"``, ``"saliency"``...).
        layer: The explained layer (default: :func:`cnnlens.explain.default_layer`).
        targets: What to explain on the original model (default: its top class).
        options: The method's options (``{"relu": False}``...).
        cascade: Module names to randomise in order (default: :func:`cascade_layers`); each step also keeps
            the earlier ones randomised. Use a prefix (``cascade_layers(model)[:10]``) to stop early.
        seed: Randomisation seed.
        keep_maps: Keep the randomised normalised maps (``(L, B, H, W)``, memory!).
        output_selector: Picks the logits from unusual model outputs.
        execution: How every explain() call runs (:class:`cnnlens.Execution`; None: the default).

    Returns:
        A :class:`RandomisationResult` (``.table()`` for one row per step).

    Raises:
        MetricError: An unknown cascade module, or a model that cannot be copied.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 3))
        >>> r = cascading_randomisation(net, torch.rand(1, 3, 16, 16), layer="1")
        >>> r.cascade, tuple(r.spearman.shape)
        (['4', '0'], (2, 1))
    """
    module = module_of(model)
    layer_name = resolve_layer(module, layer if layer is not None else default_layer(model)).key
    opts = {method: dict(options)} if options else None

    def explained(net: ModelLike, what: TargetSpec) -> Explanation:
        return explain(
            net,
            inputs,
            methods=[method],
            layers=[layer_name],
            targets=what,
            options=opts,
            output_selector=output_selector,
            execution=execution,
        )[0]

    original = explained(model, targets)
    classes = original.target_classes[:, 0]
    fixed: TargetSpec = targets if bool((classes < 0).any()) else classes.clone()
    names = list(cascade) if cascade is not None else cascade_layers(module)
    size = (int(original.maps.shape[-2]), int(original.maps.shape[-1]))
    base_signed = _signed(original, size)
    base_maps = original.maps[:, 0].double()
    rows_s, rows_a, rows_ssim, rows_u, rows_d, kept = [], [], [], [], [], []
    with _randomisable(module, names) as twin:
        twin_modules = dict(twin.named_modules())
        for step, name in enumerate(names):
            randomise_module(twin_modules[name], seed + step)
            exp = explained(twin, fixed)
            signed = _signed(exp, size)
            plain = spearman(base_signed, signed)
            absolute = spearman(base_signed, signed, absolute=True)
            maps = exp.maps[:, 0].double()
            rows_s.append(plain.value)
            rows_a.append(absolute.value)
            rows_u.append(plain.undefined | absolute.undefined)
            rows_ssim.append(ssim(base_maps, maps, data_range=1.0))
            rows_d.append(exp.degenerate[:, 0].clone())
            if keep_maps:
                kept.append(exp.maps[:, 0].clone())
    return RandomisationResult(
        method=method,
        layer=layer_name,
        cascade=names,
        spearman=torch.stack(rows_s),
        spearman_abs=torch.stack(rows_a),
        ssim=torch.stack(rows_ssim),
        undefined=torch.stack(rows_u),
        degenerate=torch.stack(rows_d),
        original_degenerate=original.degenerate[:, 0].clone(),
        target_classes=classes.clone(),
        original=original,
        randomised_maps=torch.stack(kept) if keep_maps else None,
        seed=seed,
    )
