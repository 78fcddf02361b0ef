"""The model of a run: :func:`cnnlens.models.load_model`, the one loader, under its runs name.

``--model`` accepts zoo names, torchvision/timm architecture names with ``--num-classes`` and ``--weights``,
``package.module:factory`` and ``path/to/file.py:factory`` (see :mod:`cnnlens.models.custom`), and
``--input-size``/``--resize``/``--mean``/``--std`` override any model's preprocessing.

Example:
    >>> lm = load_run_model("mypkg.nets:small_cnn", weights="ckpt.pt", input_size=(32, 32),
    ...                     mean=(0.5,) * 3, std=(0.5,) * 3, class_names="classes.txt")  # doctest: +SKIP
"""

from __future__ import annotations

from cnnlens.models.custom import is_entry_point
from cnnlens.models.loader import load_model
from cnnlens.models.preprocessing import override_preprocessing

__all__ = ["is_entry_point", "load_run_model", "override_preprocessing"]

load_run_model = load_model
"""The one loader, :func:`cnnlens.models.load_model` (factories and preprocessing overrides included)."""
