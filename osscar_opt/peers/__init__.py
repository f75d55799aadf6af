"""Peers: outside pruning methods, run in our harness on the same models and budgets as our pipeline.

A peer prunes a model in place with another project's own criterion and machinery, to the same
shapes as :func:`osscar_opt.pipeline.prune` gives at the same budgets, so that benchmarks compare
the choice of what to remove (and our re-fit) rather than the amount removed. Each peer lives in
its own module and imports its outside package only when called:

* :mod:`osscar_opt.peers.torch_pruning`: Torch-Pruning's group magnitude / Taylor importance on
  LLaMA-family causal LMs (``prune_with_torch_pruning``).
"""
