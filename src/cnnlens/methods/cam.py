"""Class-activation-map methods that weight a layer's channels by its gradients.

Each method returns the raw, signed map ``sum_k w_k A_k`` at layer resolution; the ReLU (CAM convention),
upsampling and normalisation are applied afterwards by :func:`cnnlens.explain.explain`, so the raw map is
always available.

Every method here runs on images and on volumes alike: a layer view is ``(B, C, *spatial)`` with two spatial
dimensions ``(h, w)`` or three ``(d, h, w)`` (``Conv3d`` video/medical networks), the sums and means of the
formulas run over all spatial dimensions (:func:`spatial_dims`), and the raw map is ``(B, *spatial)``.

Arithmetic over whole feature maps runs in float64 for float64 models and in float32
otherwise (float16/bfloat16 upcast first, so nothing underflows; see :func:`map_dtype`); Grad-CAM++'s powers
of the gradient, used only for signed activations, run in float64 (float32 on MPS).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch

from cnnlens.errors import CnnlensWarning
from cnnlens.maps import precise_dtype
from cnnlens.methods.registry import BoundMethod, LayerView, get_method, register

__all__ = [
    "CamMethod",
    "CnnlensWarning",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "map_dtype",
    "register_cam",
    "spatial_dims",
    "weighted_sum",
    "xgradcam",
]


def map_dtype(activation: torch.Tensor) -> torch.dtype:
    """The dtype of full-size map arithmetic: float64 for float64 activations, float32 otherwise.

    Per-channel quantities (weights, alphas) are computed in :func:`cnnlens.maps.precise_dtype`; sums over
    whole feature maps run in the activation's own precision, upcast from float16/bfloat16 to float32. A
    float64 copy of every activation would cost more than the CAM itself on large early layers (an 800k
    element conversion per layer) and changes no float32 result beyond rounding.
    """
    return torch.float64 if activation.dtype == torch.float64 else torch.float32


def spatial_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The spatial dimensions of a ``(B, C, *spatial)`` view: ``(2, 3)`` for images, ``(2, 3, 4)`` for volumes.

    Example:
        >>> spatial_dims(torch.zeros(1, 2, 3, 4)), spatial_dims(torch.zeros(1, 2, 3, 4, 5))
        ((2, 3), (2, 3, 4))
    """
    return tuple(range(2, tensor.ndim))


def weighted_sum(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k``: channel weights ``(B, C)`` times activations ``(B, C, *spatial)`` -> ``(B, *spatial)``.

    Computed in :func:`map_dtype` of the activation (float64 for float64 models, float32 otherwise). Images
    ``(B, C, h, w)`` and volumes ``(B, C, d, h, w)`` alike.

    Example:
        >>> weighted_sum(torch.tensor([[2.0, -1.0]]), torch.ones(1, 2, 1, 2, 2)).shape
        torch.Size([1, 1, 2, 2])
    """
    dtype = map_dtype(activation)
    equation = "bc,bchw->bhw" if activation.ndim == 4 else "bc,bc...->b..."
    return torch.einsum(equation, weights.to(dtype), activation.to(dtype))


class CamMethod:
    """Base of the class-activation-map family: a subclass declares its channel weights, the base does the rest.

    A subclass sets the registry metadata as class attributes (``id``, ``title``, ``paper``, ``formula``,
    ``summary``, optionally ``defaults`` and ``needs_gradient``) and implements
    ``weights(activation, gradient, **options) -> (B, C)``. Calling an instance with a :class:`LayerView`
    checks the view is a ``(B, C, h, w)`` feature map or a ``(B, C, d, h, w)`` volume and (when
    ``needs_gradient``) that its gradient was captured, both errors naming the method's own ``id``, then
    returns ``sum_k w_k A_k`` (:func:`weighted_sum`). Methods that are not a channel weighting (HiResCAM,
    LayerCAM...) override :meth:`combine` instead. :func:`register_cam` registers the class under its ``id``.

    Volumes: a CAM is declared to run on volumes by default (``volumes = True``), so its ``weights`` and
    ``combine`` reduce over :func:`spatial_dims` (every spatial dimension), never a literal ``(2, 3)``; a CAM
    that cannot sets ``volumes = False`` and is refused on volumes with a :class:`cnnlens.errors.MethodError`.

    Example:
        >>> class Mean(CamMethod):
        ...     id = "toy_mean"
        ...     title = "Toy"
        ...     def weights(self, activation, gradient):
        ...         return gradient.mean(dim=(2, 3))
        >>> a = torch.ones(1, 1, 2, 2); g = torch.full((1, 1, 2, 2), 0.5)
        >>> Mean()(LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))).tolist()
        [[[0.5, 0.5], [0.5, 0.5]]]
    """

    id: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    needs_gradient: ClassVar[bool] = True
    volumes: ClassVar[bool] = True

    @classmethod
    def bind(cls, *, relu: bool = True) -> BoundMethod:
        """This method with typed options (checked by mypy/IDEs), e.g. ``GradCAM.bind(relu=False)``.

        Subclasses with options override it with their own keyword arguments (``GradCAMPlusPlus.bind``).
        """
        return get_method(cls.id).bind(relu=relu)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, a CAM that defines neither :meth:`weights` nor :meth:`combine`."""
        super().__init_subclass__(**kwargs)
        if cls.weights is CamMethod.weights and cls.combine is CamMethod.combine:
            raise TypeError(
                f"{cls.__name__} defines neither weights(activation, gradient) -> (B, C) nor "
                "combine(activation, gradient) -> (B, *spatial); a CamMethod needs one of them."
            )

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """Channel weights ``(B, C)`` from the layer's activation and gradient ``(B, C, *spatial)``.

        The base class has no weighting of its own (a subclass defines this or :meth:`combine`, checked when the
        subclass is defined); calling it on a bare ``CamMethod`` is a :class:`TypeError`.
        """
        raise TypeError(f"{type(self).__name__} has no channel weights: define weights() or combine().")

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """The raw map ``(B, *spatial)``: ``sum_k w_k A_k`` by default."""
        return weighted_sum(self.weights(activation, gradient, **options), activation)

    def check(self, view: LayerView) -> None:
        """Extra checks or warnings on a view before the map is computed (none by default)."""

    def __call__(self, view: LayerView, **options: Any) -> torch.Tensor:
        """Check the view (feature map, gradient) with this method's id and return its raw map."""
        activation = view.require_feature_map(self.id)
        gradient = view.require_gradient(self.id) if self.needs_gradient else activation
        self.check(view)
        return self.combine(activation, gradient, **options)


_C = TypeVar("_C", bound=type[CamMethod])


def register_cam(cls: _C) -> _C:
    """Register a :class:`CamMethod` subclass under its ``id`` (class decorator)."""
    needs = {"activations", "gradients"} if cls.needs_gradient else {"activations"}
    register(
        cls.id,
        title=cls.title,
        needs=needs,  # type: ignore[arg-type]
        defaults=cls.defaults,
        paper=cls.paper,
        formula=cls.formula,
        summary=cls.summary,
        volumes=cls.volumes,
    )(cls())
    return cls


@register_cam
class GradCAM(CamMethod):
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    Formula: ``w_k = (1/Z) sum_ij dS/dA_k,ij`` and ``L = ReLU(sum_k w_k A_k)`` with ``Z = h*w`` (for a volume
    the sum runs over ``d*h*w`` voxels and ``Z = d*h*w``). The method
    returns the signed ``sum_k w_k A_k``; the ReLU is applied when the map is rendered (``relu=False`` keeps
    the sign). With a GAP + linear head, the raw map equals ``CAM / Z`` exactly. Raw maps are float64 for
    float64 models and float32 otherwise.

    Example:
        >>> a = torch.ones(1, 1, 2, 2); g = torch.full((1, 1, 2, 2), 0.5)
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> gradcam(v).tolist()
        [[[0.5, 0.5], [0.5, 0.5]]]
    """

    id = "gradcam"
    title = "Grad-CAM"
    paper = (
        "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
        "Localization, ICCV 2017 (arXiv:1610.02391)"
    )
    formula = "w_k = mean_ij dS/dA_k,ij ;  L = ReLU(sum_k w_k A_k)"
    summary = "Channels weighted by their spatially averaged gradient."

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """``w_k = mean_ij g_k,ij`` (pairwise summation: accurate in float32 too)."""
        return gradient.to(map_dtype(gradient)).mean(dim=spatial_dims(gradient))


@register_cam
class GradCAMPlusPlus(CamMethod):
    """Grad-CAM++ in closed form (Chattopadhay et al., WACV 2018).

    With the score taken as ``Y = exp(S)`` (S the logit) and a piecewise-linear network, the paper's second
    and third derivatives reduce to powers of the first, ``g = dS/dA``:

    ``alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab(A_ab) g_ij^3)``, ``alpha = 0`` where ``g = 0`` or the
    denominator vanishes, and ``w_k = sum_ij alpha_ij relu(g_ij)``. The common factor ``exp(S)`` cancels and is
    never computed (it overflows). No epsilon is added to the denominator (pytorch-grad-cam adds 1e-6,
    which biases alpha when ``|g|`` is below about 1e-3). For non-negative activations (post-ReLU layers, the
    usual case) the same value is computed as ``alpha_ij relu(g_ij) = relu(g_ij) / (2 + sum_ab(A_ab) relu(g_ij))``,
    which has no pole and no powers of ``g`` that could underflow.

    Variant ``alpha_normalize=True`` reproduces the authors' TF code: alpha is divided, per channel, by its
    sum over the positions where ``g > 0`` (a step not in the paper's equations). The default ``False`` is the
    paper's formula (also pytorch-grad-cam's). The two differ by a per-channel factor.

    Signed activations (``min A < 0``) move the pole of alpha at ``g = -2 / sum(A)`` onto positive
    gradients and can explode the weights: a :class:`CnnlensWarning` is raised; prefer post-ReLU layers.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]); g = torch.full((1, 1, 2, 2), 1.0)
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> gradcampp(v).tolist()  # alpha = 1 / (2 + 2) per pixel, w = 4 * 0.25 = 1
        [[[1.0, 0.0], [0.0, 1.0]]]
    """

    id = "gradcampp"
    title = "Grad-CAM++"
    defaults: ClassVar[Mapping[str, Any]] = {"alpha_normalize": False}
    paper = (
        "Chattopadhay et al., Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep "
        "Convolutional Networks, WACV 2018 (arXiv:1710.11063)"
    )
    formula = "alpha = g^2 / (2 g^2 + sum_ab(A_k) g^3) ;  w_k = sum_ij alpha_ij relu(g_ij) ;  L = ReLU(sum_k w_k A_k)"
    summary = "Grad-CAM with per-pixel weights (closed form under the exponential-output assumption)."

    @classmethod
    def bind(cls, *, alpha_normalize: bool = False, relu: bool = True) -> BoundMethod:
        """Grad-CAM++ with typed options: ``GradCAMPlusPlus.bind(alpha_normalize=True)``.

        Example:
            >>> GradCAMPlusPlus.bind(alpha_normalize=True).variant()
            {'alpha_normalize': True, 'relu': True}
        """
        return get_method(cls.id).bind(alpha_normalize=alpha_normalize, relu=relu)

    def check(self, view: LayerView) -> None:
        """Warn when the activations take negative values (the pole of alpha then falls on positive g)."""
        if not bool(view.activation.amin() >= 0):
            warnings.warn(
                f"Grad-CAM++ on layer {view.layer!r} whose activations take negative values: alpha has a pole "
                "at g = -2/sum(A), which then falls on positive gradients and can blow up the weights. Prefer a "
                "post-ReLU layer (e.g. the block output after its activation).",
                CnnlensWarning,
                stacklevel=4,
            )

    def weights(
        self, activation: torch.Tensor, gradient: torch.Tensor, alpha_normalize: bool = False, **options: Any
    ) -> torch.Tensor:
        """``w_k = sum_ij alpha_ij relu(g_ij)``, without powers of g for non-negative activations."""
        dims = spatial_dims(gradient)
        if bool(activation.amin() >= 0):
            # sum(A) >= 0: where g > 0, alpha = g^2 / (g^2 (2 + sum(A) g)) = 1 / (2 + sum(A) g) exactly, and
            # the denominator is at least 2. No powers of g (nothing underflows), no pole: float32 is safe.
            dtype = map_dtype(gradient)
            positive = torch.relu(gradient.to(dtype))
            sum_a = activation.to(dtype).sum(dim=dims, keepdim=True)
            alpha = (sum_a * positive).add_(2).reciprocal_()
            if alpha_normalize:
                norm = (alpha * (positive > 0)).sum(dim=dims, keepdim=True)
                alpha = alpha / torch.where(norm != 0, norm, torch.ones_like(norm))
            return (alpha * positive).sum(dim=dims)
        dtype = precise_dtype(gradient)  # the powers of g below underflow early in float32
        g = gradient.to(dtype)
        sum_a = activation.to(dtype).sum(dim=dims, keepdim=True)
        positive = torch.relu(g)
        g2 = g * g
        g3 = g2 * g
        denom = 2 * g2 + sum_a * g3
        ok = (g != 0) & (denom.abs() > torch.finfo(dtype).tiny)
        alpha = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))
        if alpha_normalize:
            norm = (alpha * (g > 0)).sum(dim=dims, keepdim=True)
            alpha = alpha / torch.where(norm != 0, norm, torch.ones_like(norm))
        return (alpha * positive).sum(dim=dims)


@register_cam
class XGradCAM(CamMethod):
    """XGrad-CAM (Fu et al., BMVC 2020).

    Formula: ``w_k = sum_xy (A_k,xy / sum_ab A_k,ab) * g_k,xy`` and ``L = ReLU(sum_k w_k A_k)``. A channel
    whose activations sum to zero gets weight 0 (pytorch-grad-cam adds 1e-7 to the sum instead; the two
    agree whenever the sum is not tiny).

    Example:
        >>> a = torch.tensor([[[[1.0, 3.0]]]]); g = torch.tensor([[[[2.0, 4.0]]]])
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> xgradcam(v).tolist()  # w = (1*2 + 3*4) / 4 = 3.5
        [[[3.5, 10.5]]]
    """

    id = "xgradcam"
    title = "XGrad-CAM"
    paper = (
        "Fu et al., Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs, "
        "BMVC 2020 (arXiv:2008.02312)"
    )
    formula = "w_k = sum_xy (A_k,xy / sum_ab A_k,ab) dS/dA_k,xy ;  L = ReLU(sum_k w_k A_k)"
    summary = "Channel weights from the activation-weighted gradient (satisfies sensitivity and conservation)."

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """``w_k = sum_xy A_k,xy g_k,xy / sum_ab A_k,ab``, 0 for a channel summing to 0."""
        dtype = map_dtype(gradient)
        act = activation.to(dtype)
        dims = spatial_dims(act)
        total = act.sum(dim=dims)
        numer = (act * gradient.to(dtype)).sum(dim=dims)
        return torch.where(
            total != 0, numer / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(total)
        )


@register_cam
class HiResCAM(CamMethod):
    """HiResCAM (Draelos & Carin, 2020).

    Formula: ``L = ReLU(sum_k g_k ⊙ A_k)``. With a GAP + linear head it equals Grad-CAM; with a head without
    global pooling only HiResCAM is guaranteed to show the locations the score used.

    Example:
        >>> a = torch.tensor([[[[1.0, 3.0]]]]); g = torch.tensor([[[[2.0, -4.0]]]])
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> hirescam(v).tolist()
        [[[2.0, -12.0]]]
    """

    id = "hirescam"
    title = "HiResCAM"
    paper = (
        "Draelos & Carin, Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional "
        "neural networks, arXiv:2011.08891"
    )
    formula = "L = ReLU(sum_k g_k ⊙ A_k)"
    summary = "Element-wise gradient times activation summed over channels (no spatial averaging)."

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """``sum_k g_k ⊙ A_k``."""
        dtype = map_dtype(gradient)
        return (gradient.to(dtype) * activation.to(dtype)).sum(dim=1)


@register_cam
class GradCAMElementWise(CamMethod):
    """Grad-CAM element-wise: ``L = sum_k ReLU(g_k ⊙ A_k)``.

    The raw map is already non-negative (the ReLU is inside the sum); the outer ReLU is then a no-op.

    Example:
        >>> a = torch.tensor([[[[1.0, 3.0]], [[1.0, 1.0]]]]); g = torch.tensor([[[[2.0, -4.0]], [[1.0, 1.0]]]])
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> gradcam_elementwise(v).tolist()
        [[[3.0, 1.0]]]
    """

    id = "gradcam_elementwise"
    title = "Grad-CAM element-wise"
    paper = "pytorch-grad-cam's GradCAMElementWise (Gildenblat et al.), a HiResCAM variant with a per-element ReLU"
    formula = "L = sum_k ReLU(g_k ⊙ A_k)"
    summary = "HiResCAM with the ReLU applied to each channel's product before summing."

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """``sum_k ReLU(g_k ⊙ A_k)``."""
        dtype = map_dtype(gradient)
        return torch.relu(gradient.to(dtype) * activation.to(dtype)).sum(dim=1)


@register_cam
class LayerCAM(CamMethod):
    """LayerCAM (Jiang et al., TIP 2021).

    Formula: ``L = ReLU(sum_k ReLU(g_k) ⊙ A_k)``. Normalisation is per sample in cnnlens; the authors' code
    normalises over the whole batch tensor, which makes a map depend on the other images of its batch.

    Example:
        >>> a = torch.tensor([[[[1.0, 3.0]]]]); g = torch.tensor([[[[2.0, -4.0]]]])
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> layercam(v).tolist()
        [[[2.0, 0.0]]]
    """

    id = "layercam"
    title = "LayerCAM"
    paper = "Jiang et al., LayerCAM: Exploring Hierarchical Class Activation Maps for Localization, IEEE TIP 2021"
    formula = "L = ReLU(sum_k ReLU(g_k) ⊙ A_k)"
    summary = "Activations weighted by their positive gradients, per position (works at shallow layers)."

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """``sum_k ReLU(g_k) ⊙ A_k``."""
        dtype = map_dtype(gradient)
        return (torch.relu(gradient.to(dtype)) * activation.to(dtype)).sum(dim=1)


gradcam = GradCAM()
gradcampp = GradCAMPlusPlus()
xgradcam = XGradCAM()
hirescam = HiResCAM()
gradcam_elementwise = GradCAMElementWise()
layercam = LayerCAM()
