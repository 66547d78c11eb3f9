"""The planner, in layers that import only downward (``tests/test_import_graph.py`` holds them so):

1. :mod:`~vramplan.planner.checks` -- what a configuration needs from a card (``check_card``),
   ``resolve_gpu``, and the assumption text every estimate states;
2. :mod:`~vramplan.planner.estimating` -- ``estimate``, ``estimate_config``, ``per_gpu_peak``;
3. :mod:`~vramplan.planner.limits` -- device totals over batch/sequence grids, the largest
   micro-batch and the longest sequence that fit (one implementation each);
4. :mod:`~vramplan.planner.search` -- the settings search (``search``, ``what_would_fit``,
   ``other_setups``);
5. :mod:`~vramplan.planner.techniques` -- ``recommend_techniques``;
6. :mod:`~vramplan.planner.fitting` -- ``fit`` and ``fit_cards``;

and above them :mod:`vramplan.matrix` (every model x method x card at once). Below the planner
are the numpy models (memory, overheads, distributed, throughput) and the catalogues. The public
entry points stay ``vramplan.plan``, ``vramplan.recommend`` and ``vramplan.matrix``, which
re-export these names. This package imports nothing on its own: each layer loads on use.
"""
