"""Eigen-CAM and EigenGrad-CAM against an explicit SVD and against pytorch-grad-cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from tests.nets import GapHead, seeded

import cnnlens
from cnnlens.methods.eigen import principal_projection


def _explicit(features: np.ndarray) -> np.ndarray:
    """numpy full SVD, the definition, with the documented sign rule."""
    out = []
    for f in features:
        c, h, w = f.shape
        m = f.reshape(c, -1).T
        m = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(m, full_matrices=True)
        proj = m @ vt[0]
        total = f.reshape(c, -1).sum(0)
        total = total - total.mean()
        if (proj * total).sum() < 0:
            proj = -proj
        out.append(proj.reshape(h, w))
    return np.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_equals_explicit_svd(seed: int) -> None:
    f = torch.randn(3, 16, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).relu()
    np.testing.assert_allclose(principal_projection(f).numpy(), _explicit(f.numpy()), rtol=1e-9, atol=1e-10)


def test_sign_rule_follows_the_features() -> None:
    f = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    f[0, :, 1, 2] = 5.0  # one strong blob
    proj = principal_projection(f)[0]
    assert proj[1, 2] == proj.max()  # the blob is the maximum, not the minimum
    assert principal_projection(-f)[0][1, 2] == principal_projection(-f)[0].min()


def test_eigencam_needs_no_backward_and_is_class_agnostic() -> None:
    net = seeded(GapHead(), dtype=torch.float32)
    x = torch.randn(2, 3, 16, 16)
    res = cnnlens.explain(net, x, methods=["eigencam", "eigengradcam"], layers=["body.4"], top_k=2)
    e = res["eigencam", "body.4"]
    torch.testing.assert_close(e.raw[:, 0], e.raw[:, 1])
    g = res["eigengradcam", "body.4"]
    assert not torch.allclose(g.raw[:, 0], g.raw[:, 1])


pgc = pytest.importorskip("pytorch_grad_cam")


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_matches_pytorch_grad_cam_up_to_sign(method: str) -> None:
    from pytorch_grad_cam import EigenCAM, EigenGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from tests.test_peers import pgc_postprocess

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    peer = {"eigencam": EigenCAM, "eigengradcam": EigenGradCAM}[method]
    with peer(model=net, target_layers=[net.layer4]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in (1, 2)])
    ours = cnnlens.explain(net, x, methods=[method], layers=["layer4"], targets=[1, 2])[method, "layer4"].raw[:, 0]
    for b in range(2):
        candidates = [pgc_postprocess(s * ours[b : b + 1].numpy(), (128, 128)) for s in (1.0, -1.0)]
        assert min(np.abs(c - theirs[b : b + 1]).max() for c in candidates) <= 1e-4
