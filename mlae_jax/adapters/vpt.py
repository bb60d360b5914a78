"""VPT-Deep (Visual Prompt Tuning, Jia et al., ECCV 2022): learned prompt tokens in
front of the patch tokens of every block.

Each adapted block owns p = `num_tokens` prompt vectors (p, d). They act on the
block's input sequence (the 'tokens' site), [cls, patches] or [cls, prompts, patches]:
  - the first adapted block (block 0 by default) inserts its prompts after the class
    token, before the patch tokens: [cls, P_0, patches] (the sequence grows by p);
  - every later adapted block i replaces tokens 1..p (the previous block's outputs at
    the prompt positions) by its own prompts: [cls, P_i, patches];
  - a block that is not adapted (with `layers` a subset) processes the prompt
    positions as ordinary tokens, so the previous prompts' outputs carry on; blocks
    before the first adapted one see no prompts.
The classifier reads the class token after the final LayerNorm, as without prompts;
the prompts only serve as keys and values of the class token (so the last block's
class-token-only shortcut of `mlae_jax.model.vit` gives the same logits).

Where each fact comes from (KMnP/vpt):
  - insertion after the class token, before the patches, after the embeddings and the
    position embedding (prompts get none): src/models/vit_prompt/vit.py
    `incorporate_prompt` (`self.embeddings` adds the position embedding first);
  - deep prompts: block 0 uses `prompt_embeddings` (1, p, d), block i >= 1 replaces
    tokens 1..p by `deep_prompt_embeddings[i-1]`: vit.py `forward_deep_prompt`; a block
    without deep prompts keeps the previous prompt outputs: the `i <=
    deep_prompt_embeddings.shape[0]` branch there (partial depth in
    src/models/vit_prompt/vit_ablations.py, NUM_DEEP_LAYERS);
  - init uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + prompt_dim)) (0.0625 at
    ViT-B/16), the same bound for every block: vit.py `__init__`;
  - prompt dropout on the prompts expanded to the batch (independent per example and
    per block), off at eval: vit.py `prompt_dropout(...expand(B, -1, -1))`;
  - the class token after the final norm feeds the head: vit.py
    `PromptedVisionTransformer.forward` (`x[:, 0]`, VIT_POOL_TYPE 'original').
Defaults: `num_tokens` 5 is src/configs/config.py's MODEL.PROMPT.NUM_TOKENS (VPT picks p
per task from {1, 5, 10, 50, 100, 200}; demo.ipynb's VTAB runs use 100 for dmlab and
eurosat, 5 for sun397); `dropout` 0.1 is MODEL.PROMPT.DROPOUT of demo.ipynb's VTAB
VPT-deep runs (config.py's default is 0.0). Not supported: the prompt projection
(MODEL.PROMPT.PROJECT > -1; the default -1 is the identity), shared deep prompts,
other locations and initialisations (vit.py asserts the same defaults).

Trainable parameters: d * p per adapted block, 9,216 * p at ViT-B/16 (12 blocks): 46,080
at p = 5, 460,800 at p = 50. The paper's 0.53 M (VPT-Deep, VTAB-1k) is an average over
tasks with per-task p, not one setting.

Recipe (deviation): VPT trains with SGD (momentum 0.9, cosine schedule, 10 warm-up
epochs, 100 epochs) and per-task learning-rate / weight-decay grids (tune_vtab.py,
configs/base-prompt.yaml); this library's trainer is AdamW, so RECIPE is the common PEFT
AdamW recipe (lr 1e-3, weight decay 1e-4, 100 epochs), as for the selection methods.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mlae_jax.adapters.method import PEFT_RECIPE, Method, ModelInfo, SiteCall
from mlae_jax.adapters.sites import Site


def prompt_init_bound(patch_size: int, prompt_dim: int) -> float:
  """VPT's uniform init bound sqrt(6 / (3 * patch_size^2 + prompt_dim)): Xavier-uniform
  as if the prompt were the output of the (3 * patch^2 -> prompt_dim) patch embedding."""
  return math.sqrt(6.0 / (3 * patch_size * patch_size + prompt_dim))


class DeepPrompts(nn.Module):
  """One block's prompts (p, d), inserted after the class token (`replace` False) or
  written over tokens 1..p (`replace` True), with dropout on the per-example copies
  in training (flax's 'dropout' PRNG stream)."""
  num_tokens: int
  dropout: float
  bound: float
  replace: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    batch, length, d = x.shape
    p = self.num_tokens
    if self.replace and length < 1 + p:
      raise ValueError(f'VPT: a sequence of {length} tokens has no {p} prompts to replace.')

    def init(key, shape, dtype):
      return jax.random.uniform(key, shape, dtype, -self.bound, self.bound)

    prompt = self.param('prompt', init, (p, d), self.param_dtype)
    prompts = jnp.broadcast_to(prompt.astype(x.dtype), (batch, p, d))
    if self.dropout > 0:
      prompts = nn.Dropout(self.dropout, deterministic=not train)(prompts)
    rest = x[:, 1 + p:] if self.replace else x[:, 1:]
    return jnp.concatenate([x[:, :1], prompts, rest], axis=1)


@dataclasses.dataclass(frozen=True)
class VptDeep(Method):
  """VPT-Deep. Fields beyond `Method`'s:

    targets: ('tokens',), the only site it acts on (each adapted block's input).
    num_tokens: prompts per block, p (VPT chooses it per task).
    dropout: dropout probability on the prompts in training.
    layers: the blocks with prompts, () = all; the first inserts, the later ones
      replace, the others carry the previous prompts' outputs.
  """
  NAME: ClassVar[str] = 'vpt_deep'
  SITES: ClassVar[tuple[str, ...]] = ('tokens',)
  MERGEABLE: ClassVar[bool] = False
  RECIPE: ClassVar[Mapping[str, Any]] = PEFT_RECIPE

  targets: tuple[str, ...] = ('tokens',)
  num_tokens: int = 5
  dropout: float = 0.1

  def validate(self) -> None:
    super().validate()
    self.check_integer('num_tokens', hint='prompts per block')
    self.check_fraction('dropout')

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    """The block's input with its prompts at positions 1..p (inserted at the first
    adapted block, replacing the previous ones at later blocks)."""
    first = site.layer == self.blocks(info.num_layers)[0]
    return DeepPrompts(self.num_tokens, float(self.dropout),
                       prompt_init_bound(info.patch_size, info.hidden_size),
                       replace=not first, param_dtype=info.param_dtype,
                       name=name)(call.y, train=train)
