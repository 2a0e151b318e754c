"""``curves.png`` of a run folder: training loss, learning rate, validation accuracy and peak
memory against the optimiser step, from ``steps.jsonl`` and ``metrics.jsonl``.

The training loop calls :func:`start` at every evaluation: the picture is drawn by a separate
process (``python -m dcal.train.curves DIR``), so importing matplotlib and rendering (about 30 MiB)
never count against the training process's memory budget, and training goes on meanwhile;
:func:`finish` waits for the last drawing. Drawing needs matplotlib (the ``bench`` extra); without
it the plot is skipped with one warning per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional

_warned = False


def _rows(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash: the rest still plots
                    continue
    return out


def write_curves(out_dir: str, path: Optional[str] = None) -> Optional[str]:
    """Draw ``out_dir/curves.png`` (or ``path``); returns its path, or None when matplotlib is
    missing (one warning) or there is nothing to draw yet. Written atomically (temporary file,
    then rename), so a reader never sees half a picture."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            warnings.warn("curves.png is not drawn: matplotlib is not installed (pip install matplotlib)", stacklevel=2)
            _warned = True
        return None
    steps = _rows(os.path.join(out_dir, "steps.jsonl"))
    evals = _rows(os.path.join(out_dir, "metrics.jsonl"))
    if not steps and not evals:
        return None
    path = path or os.path.join(out_dir, "curves.png")
    fig = Figure(figsize=(10, 6.5), dpi=90)
    axes = fig.subplots(2, 2)
    s = [r["step"] for r in steps]

    def plot(ax, x, y, title, ylabel, **kw):
        pts = [(a, b) for a, b in zip(x, y) if b is not None]
        if pts:
            ax.plot(*zip(*pts), **kw)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    plot(axes[0, 0], s, [r.get("loss") for r in steps], "training loss", "loss", lw=0.8, color="tab:blue")
    if evals:
        plot(
            axes[0, 0],
            [r["step"] for r in evals],
            [r.get("train_loss") for r in evals],
            "training loss",
            "loss",
            marker="o",
            color="tab:orange",
            label="epoch mean",
        )
        axes[0, 0].legend(fontsize=8)
    plot(axes[0, 1], s, [r.get("lr") for r in steps], "learning rate", "lr", color="tab:green")
    plot(
        axes[1, 0],
        [r["step"] for r in evals],
        [r.get("val_acc") for r in evals],
        "validation accuracy",
        "accuracy",
        marker="o",
        color="tab:red",
    )
    measure = next((r.get("memory_measure") for r in reversed(evals) if r.get("memory_measure")), None)
    label = {"peak_rss": "process peak RSS", "max_memory_allocated": "max_memory_allocated"}.get(measure, "peak")
    plot(axes[1, 1], s, [r.get("peak_mem_mb") for r in steps], f"peak memory ({label})", "MiB", color="tab:purple")
    budget = next((r.get("budget_mb") for r in reversed(evals) if r.get("budget_mb")), None)
    if budget:
        axes[1, 1].axhline(budget, color="black", ls="--", lw=0.8, label=f"budget {budget:.0f} MiB")
        axes[1, 1].legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.abspath(out_dir)), fontsize=11)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _have_matplotlib() -> bool:
    global _warned
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found and not _warned:
        warnings.warn("curves.png is not drawn: matplotlib is not installed (pip install matplotlib)", stacklevel=3)
        _warned = True
    return found


def start(out_dir: str, previous: Optional[subprocess.Popen] = None) -> Optional[subprocess.Popen]:
    """Redraw ``out_dir/curves.png`` in a child process (after ``previous``, the last one,
    finished). Returns the child, or None when matplotlib is missing (one warning)."""
    finish(previous)
    if not _have_matplotlib():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.Popen(
        [sys.executable, "-m", "dcal.train.curves", out_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: Optional[subprocess.Popen]) -> Optional[str]:
    """Wait for a drawing started by :func:`start`; a failure is returned as one line (the
    picture is a convenience: training does not stop for it)."""
    if proc is None:
        return None
    _, err = proc.communicate()
    if proc.returncode != 0:
        lines = (err or "").strip().splitlines()
        return f"curves.png not drawn: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}"
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m dcal.train.curves RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if write_curves(sys.argv[1]) or True else 1)
