"""HTML reports (jinja2). Reports link only to files that exist next to them and open from disk.

One jinja environment (:func:`cnnlens.report._env.environment`) renders every report:

* :func:`render_explain_report`: the index of an explain folder (``cnnlens explain``, ``ExplanationSet.save``);
* :func:`render_run_report`: the error-analysis report of a dataset run (``cnnlens report``);
* :mod:`cnnlens.report.study`: the layer and model study report (``cnnlens study``);
* :mod:`cnnlens.report.demo`: the demo report (``cnnlens demo``).
"""

from __future__ import annotations

from cnnlens.report._env import colorbar_html, environment, result_caption
from cnnlens.report.explain import render_explain_report
from cnnlens.report.run import confusion, render_run_report

__all__ = ["colorbar_html", "confusion", "environment", "render_explain_report", "render_run_report", "result_caption"]
