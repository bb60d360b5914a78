"""The method interface: what a PEFT method is to the model, the trainer and the merger.

A method is a frozen dataclass (its fields are its config group, `config.adapter.<name>`)
that
  - names the sites it acts on (`targets`, patterns over `sites.SITES`) and the blocks
    (`layers`, () = all);
  - at each of its sites, computes the site's new output from the site's input, output,
    frozen kernel and bias (`adapt`), creating its parameters there, with the PRNG
    streams and train/eval mode of the call;
  - may keep parameters shared by every block (`shared`, created once under
    `adapter_shared` and handed to every `adapt`);
  - says which backbone parameters it trains in place (`trained_patterns`: regular
    expressions over '/'-joined parameter paths, e.g. every bias for BitFit);
  - folds itself into the base weights of a site (`merge`), or says it cannot
    (`MERGEABLE = False`);
  - carries the training recipe of its paper (`RECIPE`: config fields, overridable);
  - may keep state that is not trained (adapter leaves named `state_*`: masks, routing
    tables) and change it, or anything else, in phases of the run between epochs
    (`phase_epochs`, `run_phase`: scoring, pruning, schedules), which are checkpointed
    with the run, so a run killed during or after a phase resumes to the same result.
`mlae_jax.adapters.registry` lists the methods by name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Iterable, Mapping

import jax

from mlae_jax.adapters.sites import BLOCK_SITES, MODEL_SITES, Site


# The VTAB-1k recipe most PyTorch PEFT codes share (AdamW, e.g. PETL-ViT, NOAH,
# RepAdapter): the RECIPE of methods whose reference trained otherwise (SGD grids).
PEFT_RECIPE = {'learning_rate': 1e-3, 'weight_decay': 1e-4, 'epochs': 100}


def is_number(value: Any) -> bool:
  """An int or float, not a bool (which Python counts as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
  """An int, not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def round_half_up(value: float) -> int:
  """`value` rounded to the nearest integer, halves up (Python's `round` takes halves to
  the even neighbour): for counts and epochs that are fractions of a whole."""
  return int(math.floor(value + 0.5))


class NotMergeable(ValueError):
  """The method's update depends on the input, so it cannot be folded into weights."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a method may need to know of the model it adapts."""
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  patch_size: int
  dtype: Any
  param_dtype: Any


@dataclasses.dataclass(frozen=True)
class SiteCall:
  """One evaluation of a site: `y` is the output the base model computes from `x`;
  `kernel` (d_in, d_out) and `bias` (d_out,) are the frozen weights of dense sites
  (None elsewhere); `weights` (batch,) are 1 for real examples and 0 for the padding
  rows of a partial batch (None: all real), for an update that mixes examples."""
  x: jax.Array
  y: jax.Array
  kernel: jax.Array | None = None
  bias: jax.Array | None = None
  weights: jax.Array | None = None


# Gradients for a phase: (params, batches) -> that many per-batch gradient trees of the
# training loss with respect to every parameter (fixed batches, eval mode), yielded one
# at a time (iterate once).
Gradients = Callable[[Any, int], Iterable[Any]]


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of every method. Attributes shared by all:

    targets: the sites it acts on (see `mlae_jax.adapters.sites`).
    layers: the blocks it acts on, () for every block (placement ablations).
    train: extra backbone parameters trained in place: regular expressions matched
      against whole '/'-joined paths (e.g. '.*/bias' for every bias).

  A method with SITES acts somewhere: its `targets` may not be empty.
  """
  NAME: ClassVar[str] = ''
  SITES: ClassVar[tuple[str, ...]] = ()  # The sites it can act on.
  MERGEABLE: ClassVar[bool] = False
  # Config fields of its paper's recipe (learning_rate, weight_decay, epochs), applied
  # where a run config leaves them unset; per data source where they differ.
  RECIPE: ClassVar[Mapping[str, Any]] = {}
  # Its update at a site depends on other tokens of the sequence (e.g. a mean over
  # them): the model then computes every token of the last block.
  MIXES_TOKENS: ClassVar[bool] = False

  targets: tuple[str, ...] = ()
  layers: tuple[int, ...] = ()
  train: tuple[str, ...] = ()

  def __post_init__(self):
    # Lists (from configs and JSON) become tuples, so a method stays hashable; one name
    # stands for a one-element tuple of the common sequence fields.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, str) and field.name in ('targets', 'layers', 'train'):
        value = (value,)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, field.name, tuple(value))
    self.validate()

  def fail(self, message: str):
    raise ValueError(f'Bad {self.NAME} config: {message}')

  def validate(self) -> None:
    """Raises ValueError naming the field and the fix; subclasses add their checks."""
    unknown = [t for t in self.targets if t not in self.SITES]
    if unknown:
      self.fail(f'targets {unknown} are not sites it can act on; choose from {self.SITES}.')
    if len(set(self.targets)) != len(self.targets):
      self.fail(f'targets {self.targets} name a site twice.')
    if 'qkv' in self.targets and set(self.targets) & {'query', 'key', 'value'}:
      self.fail("'qkv' already covers query, key and value; do not combine them.")
    for layer in self.layers:
      if not is_integer(layer) or layer < 0:
        self.fail(f'layers must be block indices >= 0, got {self.layers!r}.')
    if len(set(self.layers)) != len(self.layers):
      self.fail(f'layers {self.layers} name a block twice.')
    for pattern in self.train:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as error:
        self.fail(f'train pattern {pattern!r} is not a regular expression ({error}).')
    if self.SITES and not self.targets:
      self.fail(f'targets is empty; choose from {self.SITES}.')

  # Field checks for `validate`: each fails, naming the field and its value, unless
  # every named field passes. `per_layer` also accepts a tuple of such values (one per
  # layer); `hint` is said in parentheses after the expectation (with `per_layer`,
  # 'or one per layer' unless given).

  def _check(self, names: Iterable[str], valid: Callable[[Any], bool], expectation: str,
             per_layer: bool = False, hint: str = '') -> None:
    hint = hint or ('or one per layer' if per_layer else '')
    for name in names:
      value = getattr(self, name)
      values = value if per_layer and isinstance(value, tuple) else (value,)
      if not all(valid(v) for v in values):
        note = f' ({hint})' if hint else ''
        self.fail(f'{name} must {expectation}{note}, got {value!r}.')

  def check_integer(self, *names: str, low: int = 1, per_layer: bool = False,
                    hint: str = '') -> None:
    """Each named field is an int (not a bool) >= `low`."""
    self._check(names, lambda v: is_integer(v) and v >= low, f'be an integer >= {low}',
                per_layer, hint)

  def check_fraction(self, *names: str, per_layer: bool = False, hint: str = '') -> None:
    """Each named field is a number in [0, 1) (a probability that is not certain)."""
    self._check(names, lambda v: is_number(v) and 0.0 <= v < 1.0, 'lie in [0, 1)', per_layer,
                hint)

  def check_finite(self, *names: str, hint: str = '') -> None:
    """Each named field is a finite number."""
    self._check(names, lambda v: is_number(v) and math.isfinite(v), 'be a finite number',
                hint=hint)

  def check_flag(self, *names: str) -> None:
    """Each named field is True or False."""
    self._check(names, lambda v: isinstance(v, bool), 'be True or False')

  def blocks(self, num_layers: int) -> tuple[int, ...]:
    """The blocks it adapts, checked against the model's depth."""
    if any(layer >= num_layers for layer in self.layers):
      self.fail(f'layers {self.layers} name blocks beyond the model\'s {num_layers}.')
    return tuple(sorted(self.layers)) if self.layers else tuple(range(num_layers))

  def sites(self, num_layers: int) -> tuple[Site, ...]:
    """Every site it acts on, block sites of each adapted block, in model order."""
    block = [t for t in self.targets if t in BLOCK_SITES]
    model = [t for t in self.targets if t in MODEL_SITES]
    return (tuple(Site(name) for name in model if name == 'embedding')
            + tuple(Site(name, layer) for layer in self.blocks(num_layers) for name in block)
            + tuple(Site(name) for name in model if name != 'embedding'))

  def trained_patterns(self, num_layers: int) -> tuple[str, ...]:
    """Regular expressions of the backbone paths it trains in place."""
    del num_layers
    return self.train

  def shared(self, info: ModelInfo, *, name: str) -> Any:
    """Creates, as submodule `name` of the calling module (the model), and returns the
    parameters every site shares; None when there are none."""
    del info, name
    return None

  def adapt(self, site: Site, call: SiteCall, shared: Any, info: ModelInfo, *, train: bool,
            name: str) -> jax.Array:
    """The new output of `site`. Parameters live in a submodule called `name` of the
    calling module (created here); random draws use named PRNG streams."""
    raise NotImplementedError(f'{self.NAME} does not act on site {site.name!r}.')

  def merge(self, site: Site, params: Mapping[str, Any], shared: Any, kernel: jax.Array,
            bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) of `site` with the method folded in: the eval-time map. `params`
    are the site's own parameters (flat names), `shared` the shared ones."""
    raise NotMergeable(f'{self.NAME} cannot be merged into the base weights (its update '
                       'depends on the input); keep the adapted model for inference.')

  def phase_epochs(self, epochs: int) -> tuple[int, ...]:
    """The completed-epoch counts after which `run_phase` runs, in a run of `epochs`."""
    del epochs
    return ()

  def run_phase(self, epoch: int, epochs: int, params: Any, gradients: Gradients) -> Any:
    """The params of one configuration after the phase that follows epoch `epoch`."""
    raise NotImplementedError(f'{self.NAME} has no phase after epoch {epoch}.')

  def recipe(self, source: str) -> dict[str, Any]:
    """Its paper's recipe for data `source` ('tfds' for VTAB-1k, 'fgvc', ...)."""
    return {field: value.get(source, value['default']) if isinstance(value, Mapping) else value
            for field, value in self.RECIPE.items()}

  def describe(self) -> dict[str, Any]:
    """Name and fields, as written into exports and results."""
    return {'method': self.NAME, **dataclasses.asdict(self)}
