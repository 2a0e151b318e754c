"""Speed and memory comparisons of dcal against the naive code, PyTorch and its peers (docs/performance.md).

``python -m bench [--quick | --full] [names...]`` runs them (bounded by a time budget per case),
``python -m bench.report`` writes the results table (docs/results.md) from their CSVs,
``python -m bench.kernel_report [--roofline]`` is the static GPU kernel report. :mod:`bench.common`
re-exports the shared machinery (:mod:`bench.spec`, :mod:`bench.measure`, :mod:`bench.runner`,
:mod:`bench.tables`, :mod:`bench.plots`, :mod:`bench.cli`).
"""
