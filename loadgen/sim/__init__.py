"""Lull's cluster simulator: replays agent traces against the same pure policy code
the live controller runs, with engine and link times taken from a first-principles
cost model.

- ``hardware``: model shapes and GPU specs (public figures, cited), in named registries.
- ``cost_model``: a ``Profile`` (one GPU kind x one model x tensor parallelism) and a
  ``CostModel`` that turns it into engine step, prefill, recompute and transfer times.
- ``policies``: the interface and registry (``POLICIES``) of simulated policies.
- ``driven``: every policy the core defines (``lull``, ``mori``, ``lru-offload``,
  ``vllm-lru``), run through the core's own driver and definitions.
- ``lru``, ``continuum``, ``thunderagent``: the LRU engine model, and models of the
  baselines the core does not run (``infinite-hbm``, ``continuum``, ``thunderagent``,
  ``ta-offload``).

The cost model carries no per-policy constants: every policy in a comparison is timed
by the same formulas, and ``CostModel.describe()`` prints them into every report.
"""

# The baselines register themselves on import; the package imports them so that
# ``POLICIES`` is complete whichever module is imported first.
from loadgen.sim import continuum, driven, lru, thunderagent  # noqa: E402,F401
