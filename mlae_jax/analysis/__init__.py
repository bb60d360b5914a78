"""Analyses of trained adapters: the paper's expert cosine similarity (appendix A.4)."""

from mlae_jax.analysis.similarity import (ExpertSimilarity, expert_cosine_matrix,
                                          expert_similarity, export_similarity)
