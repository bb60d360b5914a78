"""Sweeps over tasks and seeds, the paper's per-task hyper-parameter search, and the
results tables (Markdown, CSV, plot) built from the runs' workdirs.

  python -m mlae_jax.sweeps.runner --benchmark=vtab --tasks=all --seeds=0,1,2 --root=runs
  python -m mlae_jax.sweeps.grid_search --task=svhn --root=runs/search
  python -m mlae_jax.sweeps.results --root=runs --out=runs/report
"""
