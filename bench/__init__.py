"""Speed and memory comparisons of dcal against the seeds' naive code and PyTorch (DESIGN 9).

``python -m bench [--quick] [names...]`` runs them; :mod:`bench.common` is the shared runner.
"""
