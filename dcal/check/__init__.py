"""``python -m dcal.check``: prove and measure every backend of dcal on the current device.

    python -m dcal.check [--quick] [--device cpu|cuda] [--out DIR] [--no-bench] [--sanitize]
                         [--ops FAMILY|OP ...] [--only TEXT ...] [--backends B ...] [--dtypes D ...]
    make check            # the same with --quick --out dcal-check on the default device

Run it first on any GPU. It writes ``DIR/report.md`` (tables a person reads) and
``DIR/report.json`` (``env``, ``run``, ``cases``, ``bench``) and exits 1 when any case fails or
errors. It fails closed: a filter that selects nothing (``--ops nonsense``, ``--dtypes float8``,
an ``--only`` text no case has) exits 2 with one line naming the valid choices, before running
anything, and a run in which no case passed (all skipped) is headed ``NOTHING CHECKED``, never
``PASSED``, and exits 2. ``--ops`` takes families (attention, neighborhood, rollout), op names
and ``pwca`` for ``pwca_attention``. Every part runs in a subprocess (a device fault kills a CUDA context): the environment
probe, one worker per op family (restarted past a run that kills it, which is recorded as an
``error``), the benchmark groups.

What it checks (:mod:`dcal.check.grid` holds the table of cases, one line each):

* every op x every backend of its chain that claims the device (``triton``, ``cpp``, ``sdpa``) x
  every dtype of the device (CUDA fp32/fp16/bf16, CPU fp32/fp64/bf16) x the grid's shapes: the
  forward, the logsumexp and every gradient (q, each k/v segment, rpb), against the ``reference``
  backend in fp64 on the same device, with every output NaN-filled before the call;
* the judging rule (flash-attention's) of :mod:`dcal.testing.judging`: ``max|kernel - truth| <=
  factor * max|reference in the case's dtype - truth| + atol + rtol * max|truth|``, factor 2
  forward / 3 gradients, floors (atol, rtol) per dtype in ``dcal.testing.judging.FLOORS``;
* bit-determinism of two runs where a backend promises it (``grid.DETERMINISTIC``);
* ``torch.compile(fullgraph=True)`` of each op once per backend, without a recompile;
* ``--sanitize``: the tiny GPU subset under ``compute-sanitizer --tool memcheck`` / ``racecheck``.

Benchmarks (unless ``--no-bench``, :mod:`dcal.check.bench`): PWCA vs SDPA over ``torch.cat`` (the
SDPA kernel PyTorch picked is named), FlexAttention and naive; neighborhood attention vs
``F.unfold``, FlexAttention with a neighborhood block mask and NATTEN; rollout vs dense; the DCAL
ViT-B/16 448 px training step, fused vs materialising. Time (median of interleaved rounds, CUDA
events), peak memory, TFLOP/s and its share of a matmul peak measured in the same run.

On CPU the C++ and sdpa backends run the TINY (``--quick``) or SMALL cases, and Triton runs in
the interpreter (``TRITON_INTERPRET=1`` is set for the workers) on TINY cases in fp32 (Triton
3.8's interpreter computes bf16 ``tl.dot`` wrongly, so bf16 Triton is a skip with that reason).
``--quick --device cpu`` needs about 70 s of CPU time (2-5 minutes wall on a shared 2-core machine).

Expected GPU duration, computed by :func:`dcal.check.grid.estimate_gpu_seconds` from the case
count with the per-item costs stated there (no GPU has run it yet): ``--quick`` 26 cases, 46
runs (bf16), 15 Triton specialisations, 3 compile checks, benchmarks: about 3.2 minutes; the
full run 34 cases, 169 runs (fp32/fp16/bf16), 52 specialisations, 5 compile checks: about 9.7
minutes (targets: 3 and 10 minutes on one H100-class GPU). The report prints the estimate next
to the measured wall time; ``tests/test_check.py`` keeps the grid inside the targets.

Testing the checker: ``--inject FILE`` runs a Python file in every worker before its cases (for
example to patch a backend so that it returns a wrong value or raises); the report states that a
hook was active. ``DCAL_CHECK_COMPILE_BACKEND`` (default ``inductor``) sets the torch.compile
backend of the compile checks. ``tests/test_check.py`` uses both.
"""
