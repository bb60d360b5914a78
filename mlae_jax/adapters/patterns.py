"""Per-layer masking patterns of the MLAE paper (appendix A.5), by name.

The paper defines each pattern over the 12 blocks of ViT-B. Fixed patterns give the
number of experts kept per block (mean 8, the same budget as 8 experts everywhere);
stochastic patterns give the expert-level dropout probability per block. For models
of another depth a pattern is stretched: layer l takes the value of paper block
floor(l * 12 / depth).
"""

from __future__ import annotations

import numpy as np

PAPER_DEPTH = 12
PAPER_RANK = 8

FIXED_PATTERNS: dict[str, tuple[int, ...]] = {
    'incremental': (2, 2, 2, 6, 6, 6, 10, 10, 10, 14, 14, 14),
    'decremental': (14, 14, 14, 10, 10, 10, 6, 6, 6, 2, 2, 2),
    'hourglass': (14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14),
    # The paper prints 11 values; the twelfth (a middle 14) is its evident intent.
    'protruding': (2, 2, 2, 14, 14, 14, 14, 14, 14, 2, 2, 2),
}

STOCHASTIC_PATTERNS: dict[str, tuple[float, ...]] = {
    'incremental': (0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0),
    'decremental': (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8),
    'hourglass': (0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.8, 0.6, 0.5, 0.3, 0.1, 0.0),
    'protruding': (0.8, 0.6, 0.5, 0.3, 0.1, 0.0, 0.0, 0.1, 0.3, 0.5, 0.6, 0.8),
}

PATTERN_NAMES = ('uniform', 'incremental', 'decremental', 'hourglass', 'protruding', 'random')


def stretch(values: tuple, depth: int) -> tuple:
  """Maps a 12-block pattern onto `depth` layers by nearest paper block."""
  return tuple(values[(layer * PAPER_DEPTH) // depth] for layer in range(depth))


def random_expert_counts(depth: int, mean: int, seed: int) -> tuple[int, ...]:
  """Integer expert counts in [1, 2 * mean - 2] whose mean is exactly `mean`.

  For mean 8 this is the paper's 'random' fixed pattern (1..14, mean 8). The draw
  is a pure function of `seed`, so a run can be repeated.
  """
  low, high = 1, max(2 * mean - 2, mean)
  rng = np.random.default_rng(seed)
  counts = rng.integers(low, high + 1, size=depth)
  excess = int(counts.sum()) - mean * depth
  while excess != 0:
    step = 1 if excess < 0 else -1
    movable = np.flatnonzero((counts + step >= low) & (counts + step <= high))
    counts[rng.choice(movable)] += step
    excess += step
  return tuple(int(c) for c in counts)
