"""Eigen-CAM and EigenGrad-CAM: the first principal component of a layer's (gradient-weighted) activations.

Neither needs a backward pass for Eigen-CAM, and both run a thin SVD in torch on the layer's device with no
autograd graph. The sign of a principal component is arbitrary; cnnlens fixes it by a documented rule.
Both run on images ``(B, C, h, w)`` and volumes ``(B, C, d, h, w)``: the positions are all spatial
positions (``h*w`` pixels or ``d*h*w`` voxels).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cnnlens.maps import precise_dtype
from cnnlens.methods.cam import CamMethod, register_cam

__all__ = ["EigenCAM", "EigenGradCAM", "eigencam", "eigengradcam", "principal_projection"]


def principal_projection(features: torch.Tensor) -> torch.Tensor:
    """Project each sample's centred ``(C, *spatial)`` features on their first right singular vector.

    For one sample, ``M`` is the ``(P, C)`` matrix of positions by channels (``P = h*w``, or ``d*h*w`` for a
    volume), centred over positions (``M - mean_p M``, as pytorch-grad-cam does). With ``M = U S V^T`` the map
    is ``M v_1 = s_1 u_1`` reshaped to ``(h, w)`` (``(d, h, w)``).

    Sign rule: the sign of ``v_1`` is arbitrary, so the map is flipped when it correlates negatively with
    the channel sum of the uncentred features, ``sum_c F_c`` (i.e. when ``<map, sum_c F_c - mean> < 0``).
    The map therefore points the way the features point; a zero correlation keeps the SVD's sign.

    Args:
        features: ``(B, C, h, w)`` or ``(B, C, d, h, w)``.

    Returns:
        ``(B, h, w)`` (``(B, d, h, w)``) projections in float64 (float32 on MPS).

    Example:
        >>> f = torch.zeros(1, 2, 1, 3); f[0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
        >>> principal_projection(f).round(decimals=4).tolist()
        [[[-1.0, 0.0, 1.0]]]
    """
    dtype = precise_dtype(features)
    batch, channels, *spatial = features.shape
    positions = math.prod(spatial)
    with torch.no_grad():
        m = features.detach().to(dtype).reshape(batch, channels, positions).transpose(1, 2)  # (B, P, C)
        m = m - m.mean(dim=1, keepdim=True)
        # Thin SVD; only the first right singular vector is used.
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        v1 = vh[:, 0, :]  # (B, C)
        proj = torch.einsum("bpc,bc->bp", m, v1)
        total = features.detach().to(dtype).reshape(batch, channels, positions).sum(dim=1)
        total = total - total.mean(dim=1, keepdim=True)
        sign = torch.sign((proj * total).sum(dim=1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (proj * sign[:, None]).reshape(batch, *spatial)


@register_cam
class EigenCAM(CamMethod):
    """Eigen-CAM (Bany Muhammad & Yeasin, IJCNN 2020).

    Formula: with ``M`` the activations as an ``(h*w, C)`` matrix (``(d*h*w, C)`` for a volume) centred over
    positions and ``v_1`` its first right singular vector, ``L = ReLU(M v_1)``. Not class-specific: every
    target gets the same map. The sign is fixed as in :func:`principal_projection`.

    Example:
        >>> from cnnlens.methods.registry import LayerView
        >>> a = torch.zeros(1, 2, 1, 3); a[0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
        >>> v = LayerView("x", a, None, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> eigencam(v).round(decimals=4).tolist()
        [[[-1.0, 0.0, 1.0]]]
    """

    id = "eigencam"
    title = "Eigen-CAM"
    needs_gradient = False
    paper = (
        "Bany Muhammad & Yeasin, Eigen-CAM: Class Activation Map using Principal Components, IJCNN 2020 "
        "(arXiv:2008.00299)"
    )
    formula = "L = ReLU(M v_1), M = centred (h*w, C) activations, v_1 its first right singular vector"
    summary = "First principal component of the activations (not class-specific; no backward pass)."

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """The activations' principal projection (``gradient`` is unused)."""
        return principal_projection(activation)


@register_cam
class EigenGradCAM(CamMethod):
    """EigenGrad-CAM: Eigen-CAM on ``g ⊙ A`` (class-specific through the gradient).

    Formula: ``L = ReLU(M v_1)`` with ``M`` the centred ``(h*w, C)`` matrix of ``g ⊙ A``. The sign is fixed so
    the map correlates positively with ``sum_c g_c ⊙ A_c`` (see :func:`principal_projection`).

    Example:
        >>> from cnnlens.methods.registry import LayerView
        >>> a = torch.zeros(1, 2, 1, 3); a[0, 0, 0] = torch.tensor([0.0, 1.0, 2.0]); g = torch.ones_like(a)
        >>> v = LayerView("x", a, g, a, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        >>> eigengradcam(v).round(decimals=4).tolist()
        [[[-1.0, 0.0, 1.0]]]
    """

    id = "eigengradcam"
    title = "EigenGrad-CAM"
    paper = (
        "Eigen-CAM (Bany Muhammad & Yeasin, 2020) applied to gradient-weighted activations, as in "
        "pytorch-grad-cam's EigenGradCAM"
    )
    formula = "L = ReLU(M v_1), M = centred (h*w, C) matrix of g ⊙ A, v_1 its first right singular vector"
    summary = "First principal component of the gradient-weighted activations (class-specific)."

    def combine(self, activation: torch.Tensor, gradient: torch.Tensor, **options: Any) -> torch.Tensor:
        """The principal projection of ``g ⊙ A`` in float64 (float32 on MPS)."""
        dtype = precise_dtype(gradient)
        return principal_projection(gradient.to(dtype) * activation.to(dtype))


eigencam = EigenCAM()
eigengradcam = EigenGradCAM()
