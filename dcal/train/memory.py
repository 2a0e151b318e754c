"""Memory measurement of this process: peak resident set (reset and read) on CPU, heap release.

The training loop reads the step's peak with :func:`cpu_peak_rss` after :func:`reset_cpu_peak`;
:mod:`dcal.train.autobatch` measures real CPU steps with the same functions. They are the ones
the benchmarks use (:mod:`dcal._memory`), under the names the training code has always used.
"""

from __future__ import annotations

from dcal._memory import peak_rss as cpu_peak_rss
from dcal._memory import release_free_heap
from dcal._memory import reset_peak_rss as reset_cpu_peak
from dcal._memory import rss as cpu_rss

__all__ = ["cpu_peak_rss", "cpu_rss", "release_free_heap", "reset_cpu_peak"]
