"""Writes the Colab notebooks of this folder from the cell texts below.

  python notebooks/build_notebooks.py          # (re)write the .ipynb files, outputs cleared
  python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook is stale

Every notebook starts with the settings cell (`SMALL`; the training notebooks also
`EPOCHS` and `USE_DRIVE`) and the install cell. SMALL = True is what CI runs (a tiny
ViT, synthetic data, a random checkpoint in the original layout; about a minute on a
CPU); SMALL = False is the real thing for a Colab GPU runtime (ViT-B/16 from the
ImageNet-21k checkpoint, a VTAB-1k task through TFDS). In Colab the default is the full
mode, elsewhere the small one; the environment variable MLAE_NOTEBOOK_SMALL=1 / 0 forces
either.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
# No real repository: the install cell refuses to pip-install from it.
PLACEHOLDER_REPO = 'mlae-jax/mlae_jax'
# The GitHub repository ('owner/name') the notebooks install from and link to, the one place
# it is written: for a fork or the published repository, change it here and regenerate.
GITHUB_REPO = PLACEHOLDER_REPO
COLAB_URL = 'https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}.ipynb'


def header(name: str, title: str, text: str) -> str:
  """The first markdown cell: the Colab badge of this notebook, the title and the text."""
  url = COLAB_URL.format(repo=GITHUB_REPO, name=name)
  note = (f'\n\n*`{GITHUB_REPO}` in the link above is a placeholder, not a published repository: '
          'set `REPO` in the install cell to the repository you opened this notebook from.*'
          if GITHUB_REPO == PLACEHOLDER_REPO else '')
  return (f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})'
          f'{note}\n\n# {title}\n\n{text}')


def settings(training: bool) -> str:
  """The first code cell: the switches of a notebook (EPOCHS and USE_DRIVE where it trains)."""
  training_switches = '''
# Full mode: 500 epochs is the paper's schedule; fewer (more than its 10 warmup epochs) give a
# quicker, weaker run. The notebook measures how long this runtime takes before training.
EPOCHS = 500
# In Colab, True keeps runs/ and the downloaded checkpoint on Google Drive: after a disconnect,
# running the notebook again resumes each run from its last checkpoint.
USE_DRIVE = False''' if training else ''
  return f'''\
# The switches of this notebook.
#   SMALL = True:  a tiny ViT, synthetic data and a random checkpoint in the original layout;
#                  about a minute on a CPU (what CI runs).
#   SMALL = False: ViT-B/16 from the original ImageNet-21k checkpoint on a real VTAB-1k task;
#                  use a GPU runtime (Runtime > Change runtime type).
# Default: full mode in Colab, small mode elsewhere; MLAE_NOTEBOOK_SMALL=1 or 0 forces either.
import os
import sys

IN_COLAB = 'google.colab' in sys.modules
SMALL = os.environ.get('MLAE_NOTEBOOK_SMALL', '0' if IN_COLAB else '1') == '1'{training_switches}
print('mode:', 'small' if SMALL else 'full')'''


def setup_requirements() -> list[str]:
  """setup.py's install_requires, read from its source (so the list is written only there)."""
  with open(os.path.join(HERE, os.pardir, 'setup.py')) as f:
    tree = ast.parse(f.read())
  call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, 'id', None) == 'setup')
  return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == 'install_requires')


def requirement_name(requirement: str) -> str:
  """The distribution a requirement names, normalised ('tensorflow-cpu>=2.16': tensorflow-cpu)."""
  return re.split(r'[\s<>=!~;\[@]', requirement, maxsplit=1)[0].lower().replace('_', '-')


# What the install cell does with its settings (REPO, REQUIREMENTS, EXTRAS, IN_COLAB). The
# decision is the pure function install_plan, which tests/test_notebook_install.py runs
# under faked environments.
INSTALL_LOGIC = '''\
def install_plan(in_colab: bool, importable: bool, has_tensorflow: bool,
                 repo: str) -> list[list[str]]:
  """The pip commands to run, in order: none when mlae_jax imports already; raises a
  RuntimeError saying what to do where pip must not run."""
  if importable:
    return []
  if not in_colab:
    raise RuntimeError(
        'mlae_jax is not installed in this Python environment, and outside Colab this cell '
        'installs nothing. In a checkout of the repository, run '
        f'`{shlex.join(["pip", "install", "-e", "."] + EXTRAS)}` '
        "with this kernel's Python, then restart the kernel and run the notebook again.")
  if repo == PLACEHOLDER_REPO:
    raise RuntimeError(
        f'REPO = {repo!r} is a placeholder, not a published GitHub repository, so there is '
        "nothing to install from. Set REPO in this cell to the 'owner/name' of your fork or of "
        "the published mlae_jax repository (for example REPO = 'your-name/mlae_jax') and run "
        'the cell again.')
  package = f'mlae_jax @ git+https://github.com/{repo}'
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  if has_tensorflow:  # No tensorflow-cpu: it would replace this runtime's TensorFlow (GPU build).
    return [pip + ['--no-deps', package], pip + REQUIREMENTS + EXTRAS]
  return [pip + [package] + EXTRAS]


def found(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


commands = install_plan(IN_COLAB, found('mlae_jax'), found('tensorflow'), REPO)
for command in commands:
  if subprocess.run(command).returncode != 0:
    raise RuntimeError(f'pip failed (its output is above): {shlex.join(command)}')
importlib.invalidate_caches()
print(f'Installed mlae_jax from https://github.com/{REPO}.' if commands else
      'mlae_jax imports already (installed, or run from a checkout): nothing to install.')'''


def install(extras: tuple[str, ...] = ()) -> str:
  """The install cell: in Colab, mlae_jax (and `extras`) from GITHUB_REPO unless mlae_jax
  imports already, keeping the runtime's own TensorFlow; elsewhere nothing."""
  requirements = [r for r in setup_requirements() if requirement_name(r) != 'tensorflow-cpu']
  listed = textwrap.fill(', '.join(map(repr, requirements)), 96, initial_indent=' ' * 4,
                         subsequent_indent=' ' * 4, break_long_words=False,
                         break_on_hyphens=False)
  return f'''\
# Installs mlae_jax{" (and " + ", ".join(extras) + ")" if extras else ""} if it does not import \
yet: in Colab from the GitHub
# repository REPO (for a fork, set REPO to its 'owner/name'), keeping Colab's TensorFlow.
# Elsewhere nothing is installed: run `pip install -e .` in a checkout of the repository.
import importlib
import importlib.util
import shlex
import subprocess

REPO = {GITHUB_REPO!r}
PLACEHOLDER_REPO = {PLACEHOLDER_REPO!r}
# setup.py's install_requires without tensorflow-cpu, installed beside `--no-deps` mlae_jax.
REQUIREMENTS = [
{listed},
]
EXTRAS = {list(extras)!r}


''' + INSTALL_LOGIC


# Where the training notebooks keep their runs: see USE_DRIVE in the settings cell.
STORAGE = '''\
# Where runs/ goes: the working directory, or with USE_DRIVE (Colab) a folder on Google Drive,
# which also holds the checkpoint cache (MLAE_JAX_CACHE), so both outlive the runtime.
def storage_root(use_drive: bool, in_colab: bool) -> str:
  """The folder that holds runs/; on Drive it also becomes the checkpoint cache's parent."""
  if not use_drive:
    return os.getcwd()
  if not in_colab:
    raise RuntimeError(
        'USE_DRIVE = True mounts Google Drive, which works only in Google Colab. Set USE_DRIVE = '
        'False here: runs/ stays in the working directory, and running the notebook again '
        'resumes from it.')
  from google.colab import drive

  drive.mount('/content/drive')
  root = '/content/drive/MyDrive/mlae_jax'
  os.environ['MLAE_JAX_CACHE'] = os.path.join(root, 'cache')  # Read by resolve_checkpoint.
  return root


ROOT = storage_root(USE_DRIVE, IN_COLAB)
print('runs under', os.path.join(ROOT, 'runs'))'''


# A random ViT saved exactly as the released .npz files are laid out; used by the small
# mode of the notebooks that load "the original checkpoint".
RANDOM_CHECKPOINT = '''\
def write_random_original_checkpoint(path, size, image_size, seed=0):
  """A ViT with random weights, saved as the released ImageNet-21k files are: pre-Linen
  block numbering (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3),
  a pre_logits layer and a 21,843-class head. Loading it runs the same code as loading
  ViT-B_16.npz."""
  model = create_model('ViT-Ti_16', num_classes=21843, **size)
  images = jnp.zeros((1, image_size, image_size, 3))
  shapes = layout.flatten(jax.eval_shape(model.init, jax.random.key(0), images)['params'])
  shapes['pre_logits/kernel'] = jax.ShapeDtypeStruct((size['hidden_size'],) * 2, jnp.float32)
  shapes['pre_logits/bias'] = jax.ShapeDtypeStruct((size['hidden_size'],), jnp.float32)
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, leaf in shapes.items():
    noise = rng.standard_normal(leaf.shape)
    if key.endswith('kernel'):  # Scaled by 1/sqrt(fan in); q, k, v are (d, heads, head_dim).
      qkv = key.split('/')[-2] in ('query', 'key', 'value')
      value = noise / np.sqrt(leaf.shape[0] if qkv else np.prod(leaf.shape[:-1]))
    elif key.endswith('scale'):  # LayerNorm scales near 1.
      value = 1 + 0.1 * noise
    else:  # Biases, class token, position embeddings.
      value = 0.02 * noise
    arrays[key] = value.astype(np.float32)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **layout.to_pre_linen(arrays))
  return path'''

# The 19 VTAB-1k tasks with the paper's Table 10 choices (as configs/vtab.py).
TABLE_10 = '''\
  # task: (expert dropout p, coefficient init), the paper's Table 10 (as configs/vtab.py).
  TABLE_10 = {
      'cifar100': (0.7, 2.0), 'caltech101': (0.1, 0.5), 'dtd': (0.7, 0.25),
      'oxford_flowers102': (0.7, 1.0), 'oxford_iiit_pet': (0.7, 2.0), 'svhn': (0.5, 4.0),
      'sun397': (0.7, 4.0), 'patch_camelyon': (0.7, 1.0), 'eurosat': (0.5, 4.0),
      'resisc45': (0.5, 2.0), 'diabetic_retinopathy': (0.7, 0.25), 'clevr_count': (0.0, 0.125),
      'clevr_dist': (0.0, 0.125), 'dmlab': (0.5, 2.0), 'kitti': (0.5, 1.0),
      'dsprites_loc': (0.5, 1.0), 'dsprites_ori': (0.7, 4.0), 'smallnorb_azi': (0.0, 1.0),
      'smallnorb_ele': (0.0, 0.25),
  }'''

# The run config of either mode, shared by quick_start and analysis (so analysis reuses
# the MLAE run quick_start made in the same session).
RUN_CONFIG = f'''\
config = base_config()  # The paper's recipe, trained as the PyTorch runs (README: Reproducing).
if SMALL:
  TASK = 'synthetic'
  for field, value in TINY.items():  # The named size, overridden field by field.
    config.model[field] = value
  config.model.name = 'ViT-Ti_16'
  config.data.source = 'synthetic'  # Tinted noise images, learnable in a few steps.
  config.data.image_size = IMAGE_SIZE
  config.data.num_classes, config.data.num_train, config.data.num_eval = 8, 80, 80
  config.adapter.mlae.rank = 8
  config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init = 0.5, 1.0
  config.epochs, config.warmup_epochs, config.eval_every_epochs = 8, 0, 1
  config.checkpoint_every_epochs = 8
  config.batch_size, config.eval_batch_size = 16, 40
  config.learning_rate = 1e-2
  config.progress_bar = False
else:
  TASK = 'cifar100'  # Any VTAB-1k task of TABLE_10 (the paper's Fig. 5 shows CIFAR-100).
{TABLE_10}
  config.data.source = 'tfds'
  config.data.task = TASK
  config.data.train_split, config.data.eval_split = 'train800val200', 'test'
  config.data.download = True  # Let TFDS download and prepare the dataset.
  config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init = TABLE_10[TASK]
  config.epochs = EPOCHS  # The settings cell's (500: the paper's schedule).
config.pretrained = CHECKPOINT


def workdir_of(method):
  """The workdir of `method`'s run on TASK. The epochs are in its name: a workdir resumes only
  a run of the same config."""
  return os.path.join(ROOT, 'runs', f'{{TASK}}_{{method}}_{{config.epochs}}ep')'''

# How long the training notebooks' runs take on this runtime, measured before training
# (mlae_jax.training.estimate: the run's own compiled steps, timed here).
ESTIMATE = 'from mlae_jax.training.estimate import estimate_training'

ESTIMATE_TEXT = '''\
## How long it takes

Before training, the next cell compiles the run's own jitted training and evaluation steps, times
them on this runtime and multiplies by the run's numbers of steps: an estimate measured here (not a
published figure), printed as "about N minutes for EPOCHS epochs on <device>". Checkpoints, exports
and the Python loop are not counted. For comparison, the paper reports about 40 minutes per VTAB-1k
task on an RTX 3090. Lower `EPOCHS` in the first cell for a quicker, weaker run.'''


def quick_start() -> list:
  return [
      new_markdown_cell(header('quick_start', 'MLAE quick start', '''\
Fine-tune ViT-B/16 with **MLAE** (masked LoRA experts) on a VTAB-1k task, starting from the original
ImageNet-21k checkpoint: train, evaluate, merge the adapters into the backbone, export, and read the
results. The first cell picks the mode: the full run (the paper's recipe, for a Colab GPU; before
training, the notebook measures how long it takes on your runtime) or the small one (a tiny ViT on
synthetic data, under a minute on a CPU), the epochs, and whether runs go to Google Drive.''')),
      new_code_cell(settings(training=True)),
      new_code_cell(install()),
      new_code_cell(STORAGE),
      new_code_cell('''\
import json
import warnings

warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm without ipywidgets.

import jax
import jax.numpy as jnp
import numpy as np

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.torch_layout import export_torch_state, save_torch_state
from mlae_jax.checkpoints import layout, load_pretrained, resolve_checkpoint
from mlae_jax.data import build_task_data, normalize
from mlae_jax.export import load_adapter_export
from mlae_jax.model import create_model
from mlae_jax.training.defaults import base_config
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.train import train_on_task

print('JAX devices:', jax.devices())'''),
      new_markdown_cell('''\
## The pre-trained checkpoint

Full mode: `resolve_checkpoint('ViT-B_16')` downloads the original `ViT-B_16.npz` (about 400 MB)
into `~/.cache/mlae_jax` (with `USE_DRIVE`, into `mlae_jax/cache` on Drive) once. Small mode: a
random 2-block ViT written in exactly that file layout.'''),
      new_code_cell(RANDOM_CHECKPOINT + '''


if SMALL:
  TINY = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
  IMAGE_SIZE = 32
  CHECKPOINT = write_random_original_checkpoint('checkpoints/tiny_original.npz', TINY, IMAGE_SIZE)
else:
  IMAGE_SIZE = 224
  CHECKPOINT = resolve_checkpoint('ViT-B_16')
with np.load(CHECKPOINT) as original:
  print(CHECKPOINT, f'{len(original.files)} arrays, for example:')
  for key in sorted(original.files)[:6]:
    print(f'  {key}: {original[key].shape}')'''),
      new_markdown_cell('''\
## The run

`base_config()` holds the paper's recipe; the full mode sets the task's Table 10 expert dropout `p`
and coefficient init, as `configs/vtab.py` does
(`python -m mlae_jax.main --config=configs/vtab.py:cifar100` is the same run from a shell).'''),
      new_code_cell(RUN_CONFIG + '''
WORKDIR = workdir_of('mlae')
print(f'{config.model.name} on {TASK}, {config.epochs} epochs, batch {config.batch_size}, '
      f'lr {config.learning_rate}; workdir {WORKDIR}')
print('adapter:', config.adapter.mlae.to_dict())'''),
      new_markdown_cell(ESTIMATE_TEXT + ' A resumed run trains only the epochs left.'),
      new_code_cell(ESTIMATE + '''

data = build_task_data(config.data)  # Full mode: TFDS downloads and prepares the task once.
if os.path.exists(os.path.join(WORKDIR, 'results.json')):
  print(f'{WORKDIR} holds a finished run: nothing to train.')
else:
  print(estimate_training(config, data).describe())'''),
      new_markdown_cell('''\
## Fine-tune

Only the adapters (8 rank-1 experts on every block's fused q-k-v projection) and the new head are
trained. The workdir receives `metrics.jsonl`, TensorBoard events, orbax checkpoints, `results.json`
and the exports; running the cell again resumes from the last checkpoint. With `USE_DRIVE` the
workdir is on Google Drive: after a disconnect, run all cells again to resume.'''),
      new_code_cell('''\
results = train_on_task(config, WORKDIR, data)
print(f"final-epoch accuracy {results['final_epoch_accuracy']:.4f}, "
      f"best of the evaluations {results['best_of_evaluations_accuracy']:.4f} "
      f"(epoch {results['best_of_evaluations_epoch']}), "
      f"{results['adapter_params']:,} adapter parameters")'''),
      new_markdown_cell('''\
## Evaluate the exported model

`load_adapter_export` rebuilds the model from `export/adapter.npz` + `adapter_config.json` and the
pre-trained checkpoint. In evaluation every expert is used, unscaled.'''),
      new_code_cell('''\
model, params = load_adapter_export(f'{WORKDIR}/export', CHECKPOINT)
predict = jax.jit(lambda p, images: model.apply({'params': p}, images, train=False))
correct = 0
for batch in data.eval_batches(config.eval_batch_size):
  logits = predict(params, normalize(batch.images, data.mean, data.std))
  correct += int(np.sum((np.argmax(logits, -1) == batch.labels) & batch.mask))
print(f'{data.name}: accuracy of the reloaded export {correct / data.num_eval:.4f} on '
      f'{data.num_eval} test images (the run reported {results["final_epoch_accuracy"]:.4f})')'''),
      new_markdown_cell('''\
## Merge

The eval-time update of each layer, dW = sum_i c_i a_i b_i^T, folds into the frozen kernel:
the merged model is a plain ViT with the adapted model's outputs at the base model's cost.'''),
      new_code_cell('''\
plain_model, plain_params = merge_adapters(model, params)
batch = next(iter(data.eval_batches(16)))
images = normalize(batch.images, data.mean, data.std)
with jax.default_matmul_precision('float32'):  # Exact fp32 matmuls on GPUs too (no TF32).
  adapted = model.apply({'params': params}, images)
  merged = plain_model.apply({'params': plain_params}, images)
  reread_params = load_pretrained(f'{WORKDIR}/export/merged.npz', plain_model,
                                  rng=jax.random.key(0), image_size=IMAGE_SIZE, keep_head=True)
  reread = plain_model.apply({'params': reread_params}, images)
scale = float(jnp.abs(adapted).max())
for name, logits in (('merged in memory', merged), ('export/merged.npz', reread)):
  difference = float(jnp.abs(logits - adapted).max())
  print(f'max |adapted - {name}| = {difference:.2e} (logits up to {scale:.2f})')
  assert difference <= 1e-4 * max(1.0, scale)
print('adapter leaves left in the merged model:',
      sum('adapter_' in key for key in layout.flatten(plain_params)))'''),
      new_markdown_cell('''\
## Export

`export/adapter.npz` + `adapter_config.json`: the trained leaves only (adapters and head).
`export/merged.npz`: the merged ViT in the original checkpoint layout, readable by
`load_pretrained` and by timm. `export_torch_state` gives the adapters as the PyTorch MLAE layer on
timm's ViT names them.'''),
      new_code_cell('''\
export_dir = f'{WORKDIR}/export'
save_torch_state(f'{export_dir}/adapter_torch.npz', export_torch_state(model, params))
for name in sorted(os.listdir(export_dir)):
  print(f'{name:24s} {os.path.getsize(os.path.join(export_dir, name)) / 1e6:8.3f} MB')
with open(f'{export_dir}/adapter_config.json') as f:
  print(json.dumps(json.load(f)['adapter'], indent=1))
for key, value in list(export_torch_state(model, params).items())[:3]:
  print(f'{key}: {value.shape}')'''),
      new_markdown_cell('''\
## Results

`results.json` reports the final-epoch accuracy and, labelled apart, the best accuracy over the
periodic evaluations (what the PyTorch papers report); `metrics.jsonl` holds every epoch.'''),
      new_code_cell('''\
with open(f'{WORKDIR}/results.json') as f:
  print(f.read())
for record in read_metrics(WORKDIR):
  if record['kind'] == 'eval':
    print(f"epoch {record['epoch']:4d}: eval accuracy {record['accuracy']:.4f}, "
          f"loss {record['loss']:.4f}")'''),
  ]


def pytorch_cross_check() -> list:
  return [
      new_markdown_cell(header('pytorch_cross_check', 'Cross-check with timm and PyTorch', '''\
The same original checkpoint in timm's ViT (PyTorch) and in mlae_jax: pre-head features and logits
must agree, and MLAE adapter weights must move between the two implementations both ways
(`export_torch_state`, `import_torch_state`) without changing the outputs. Full mode checks ViT-B/16
from the original ImageNet-21k file; small mode a random 2-block ViT in the same file layout.''')),
      new_code_cell(settings(training=False)),
      new_code_cell(install(('timm',))),
      new_code_cell('''\
import warnings

warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm without ipywidgets.

# PyTorch and timm first: they can crash when first imported after JAX or TensorFlow have run.
import timm
import torch

import jax
import jax.numpy as jnp
import numpy as np

from mlae_jax.adapters import Mlae
from mlae_jax.adapters.torch_layout import export_torch_state, import_torch_state
from mlae_jax.checkpoints import layout, load_pretrained, resolve_checkpoint
from mlae_jax.model import create_model

jax.config.update('jax_default_matmul_precision', 'float32')  # No TF32 on GPUs: exact fp32.
torch.backends.cuda.matmul.allow_tf32 = False
print('timm', timm.__version__, '| torch', torch.__version__, '| JAX devices:', jax.devices())'''),
      new_markdown_cell('## One checkpoint, two implementations'),
      new_code_cell(RANDOM_CHECKPOINT + '''


NUM_CLASSES = 10
if SMALL:
  TINY = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
  IMAGE_SIZE, RANK = 32, 4
  CHECKPOINT = write_random_original_checkpoint('checkpoints/tiny_original.npz', TINY, IMAGE_SIZE)
  jax_kwargs = dict(name='ViT-Ti_16', **TINY)
  timm_model = timm.models.vision_transformer.VisionTransformer(
      img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
      num_classes=NUM_CLASSES)
else:
  IMAGE_SIZE, RANK = 224, 8
  CHECKPOINT = resolve_checkpoint('ViT-B_16')
  jax_kwargs = dict(name='ViT-B_16')
  timm_model = timm.create_model('vit_base_patch16_224', pretrained=False,
                                  num_classes=NUM_CLASSES)
timm_model.load_pretrained(CHECKPOINT)  # timm reads the original .npz itself.
timm_model.eval()

model = create_model(num_classes=NUM_CLASSES, **jax_kwargs)  # Exact GELU, as timm.
params = load_pretrained(CHECKPOINT, model, rng=jax.random.key(0), image_size=IMAGE_SIZE)

# Both load a fresh head; give them the same random one so the logits say something.
rng = np.random.default_rng(0)
head_kernel = (rng.standard_normal((model.hidden_size, NUM_CLASSES)) * 0.1).astype(np.float32)
head_bias = (rng.standard_normal(NUM_CLASSES) * 0.1).astype(np.float32)
params['head'] = {'kernel': jnp.asarray(head_kernel), 'bias': jnp.asarray(head_bias)}
with torch.no_grad():
  timm_model.head.weight.copy_(torch.from_numpy(head_kernel.T.copy()))
  timm_model.head.bias.copy_(torch.from_numpy(head_bias))

images = rng.uniform(-1, 1, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)  # NHWC in [-1, 1]
torch_images = torch.from_numpy(images).permute(0, 3, 1, 2)  # timm takes NCHW'''),
      new_code_cell('''\
def report(name, ours, theirs):
  """Prints and checks the largest difference, relative to the outputs' scale."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  difference = float(np.abs(ours - theirs).max())
  scale = float(np.abs(theirs).max())
  print(f'{name:48s} max abs diff {difference:.2e}  (values up to {scale:.2f})')
  assert difference <= 1e-4 * max(1.0, scale), name
  return difference


def jax_outputs(model, params):
  logits, state = model.apply({'params': params}, images, mutable=['intermediates'])
  return state['intermediates']['pre_logits'][0], logits


def timm_outputs(timm_model):
  with torch.no_grad():
    tokens = timm_model.forward_features(torch_images)
    features = timm_model.forward_head(tokens, pre_logits=True)
    return features.numpy(), timm_model.forward_head(tokens).numpy()


features, logits = jax_outputs(model, params)
timm_features, timm_logits = timm_outputs(timm_model)
report('pre-head features, mlae_jax vs timm', features, timm_features)
report('logits, mlae_jax vs timm', logits, timm_logits);'''),
      new_markdown_cell('''\
## MLAE adapters, JAX -> PyTorch

A PyTorch MLAE layer with the parameter names of the paper's published code (`lora_A` (r, d_in),
`lora_B` (r, d_out), `lora_lamda` (r,)) wraps each block's `attn.qkv` in timm. The JAX adapters get
random values (as if trained: B is zero at init), go through `export_torch_state` and are loaded
with `load_state_dict`.'''),
      new_code_cell('''\
class MLAELinear(torch.nn.Module):
  """W0 x + b0 + sum_i m_i lambda_i b_i a_i^T x on a frozen nn.Linear; in training, an
  inverted-dropout mask m over the experts (one per forward pass)."""

  def __init__(self, base, experts, drop_rate=0.0):
    super().__init__()
    self.base, self.drop_rate = base, drop_rate
    self.lora_A = torch.nn.Parameter(torch.zeros(experts, base.in_features))
    self.lora_B = torch.nn.Parameter(torch.zeros(experts, base.out_features))
    self.lora_lamda = torch.nn.Parameter(torch.ones(experts))

  def forward(self, x):
    lamda = self.lora_lamda
    if self.training and self.drop_rate > 0:
      keep = torch.bernoulli(torch.full_like(lamda, 1 - self.drop_rate))
      lamda = lamda * keep / (1 - self.drop_rate)
    return self.base(x) + ((x @ self.lora_A.T) * lamda) @ self.lora_B


adapter = Mlae(rank=RANK, drop_rate=0.5, coeff_init=4.0)  # SVHN's Table 10 setting.
mlae_model = model.clone(adapter=adapter)
mlae_params = load_pretrained(CHECKPOINT, mlae_model, rng=jax.random.key(1), image_size=IMAGE_SIZE)
flat = layout.flatten(mlae_params)
for key, value in flat.items():
  if 'adapter_' in key:  # Random A, B and coefficients, as if trained.
    flat[key] = jnp.asarray(rng.standard_normal(value.shape).astype(np.float32) * 0.1
                            + (1.0 if key.endswith('coeff') else 0.0))
flat['head/kernel'], flat['head/bias'] = jnp.asarray(head_kernel), jnp.asarray(head_bias)
mlae_params = layout.unflatten(flat)

for block in timm_model.blocks:
  block.attn.qkv = MLAELinear(block.attn.qkv, RANK, drop_rate=0.5)
timm_model.eval()
state = export_torch_state(mlae_model, mlae_params)
for key in list(state)[:3]:
  print(f'{key}: {state[key].shape}')
loaded = timm_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                    strict=False)
assert not loaded.unexpected_keys

features, logits = jax_outputs(mlae_model, mlae_params)
timm_features, timm_logits = timm_outputs(timm_model)
_, plain_logits = jax_outputs(model, params)
print(f'the adapters move the logits by up to {np.abs(logits - plain_logits).max():.2f}')
report('MLAE pre-head features, JAX -> PyTorch', features, timm_features)
report('MLAE logits, JAX -> PyTorch', logits, timm_logits);'''),
      new_markdown_cell('''\
## MLAE adapters, PyTorch -> JAX

New random values in the PyTorch layers, read back with `import_torch_state` (other keys of the
state dict, the backbone and head, are ignored).'''),
      new_code_cell('''\
torch.manual_seed(0)
with torch.no_grad():
  for block in timm_model.blocks:
    block.attn.qkv.lora_A.normal_(0, 0.1)
    block.attn.qkv.lora_B.normal_(0, 0.1)
    block.attn.qkv.lora_lamda.uniform_(-2, 4)
imported_params = import_torch_state(mlae_model, mlae_params, timm_model.state_dict())

features, logits = jax_outputs(mlae_model, imported_params)
timm_features, timm_logits = timm_outputs(timm_model)
report('MLAE pre-head features, PyTorch -> JAX', features, timm_features)
report('MLAE logits, PyTorch -> JAX', logits, timm_logits)
round_trip = export_torch_state(mlae_model, imported_params)
assert all(np.array_equal(round_trip[k], v.numpy()) for k, v in timm_model.state_dict().items()
           if k in round_trip)
print('PyTorch -> JAX -> PyTorch: the adapter tensors come back bit for bit')'''),
      new_markdown_cell('''\
## Training mode with the same masks

In training each layer draws one expert mask per step. The JAX layer sows the masks it drew
(`intermediates/.../expert_mask`); the PyTorch layer given the same masks computes the same
outputs.'''),
      new_code_cell('''\
logits, state = mlae_model.apply({'params': imported_params}, images, train=True,
                                 rngs={'expert_mask': jax.random.key(7)},
                                 mutable=['intermediates'])
masks = [np.asarray(state['intermediates']['Transformer'][f'encoderblock_{i}']
                    ['MultiHeadDotProductAttention_0']['adapter_qkv']['expert_mask'][0])
         for i in range(mlae_model.num_layers)]
print('kept experts per block:', [int(m.sum()) for m in masks])


class FixedMask(torch.nn.Module):
  """Replaces the random draw of an MLAELinear with a given mask."""

  def __init__(self, layer, mask):
    super().__init__()
    self.layer, self.mask = layer, torch.from_numpy(mask.astype(np.float32))

  def forward(self, x):
    layer = self.layer
    lamda = layer.lora_lamda * self.mask / (1 - layer.drop_rate)
    return layer.base(x) + ((x @ layer.lora_A.T) * lamda) @ layer.lora_B


layers = [block.attn.qkv for block in timm_model.blocks]
for block, layer, mask in zip(timm_model.blocks, layers, masks):
  block.attn.qkv = FixedMask(layer, mask)
timm_model.train()
with torch.no_grad():
  timm_logits = timm_model(torch_images).numpy()
for block, layer in zip(timm_model.blocks, layers):
  block.attn.qkv = layer
timm_model.eval()
report('MLAE training-mode logits, same masks', logits, timm_logits);'''),
  ]


def analysis() -> list:
  return [
      new_markdown_cell(header('analysis', 'Expert similarity of MLAE and LoRA', '''\
The paper's analysis (section 4.3, appendix A.4): every expert of a layer is a rank-1 d_in x d_out
matrix; the cosine similarity of every pair of experts in a block, averaged over the pairs and the
blocks, is lower for MLAE than for LoRA. This notebook trains both methods on the same task (or
reuses runs already in `runs/`), shows the per-block similarity matrices as heat maps, the averages,
and the training curves from each run's `metrics.jsonl`.''')),
      new_code_cell(settings(training=True)),
      new_code_cell(install()),
      new_code_cell(STORAGE),
      new_code_cell('''\
import json
import warnings

warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm without ipywidgets.

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from mlae_jax.analysis import export_similarity
from mlae_jax.checkpoints import layout, resolve_checkpoint
from mlae_jax.data import build_task_data
from mlae_jax.model import create_model
from mlae_jax.training.defaults import base_config
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.train import train_on_task

print('JAX devices:', jax.devices())'''),
      new_markdown_cell('''\
## Two runs: MLAE and LoRA

The same task, backbone and recipe; LoRA (rank 8, alpha = rank) replaces MLAE's masked, adaptive
coefficients. The MLAE run is the one `quick_start.ipynb` makes (`runs/<task>_mlae_<epochs>ep`):
a finished run found in its workdir is reused instead of trained again. Small mode uses the tiny
random checkpoint of `quick_start.ipynb`.'''),
      new_code_cell(RANDOM_CHECKPOINT + '''


if SMALL:
  TINY = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
  IMAGE_SIZE = 32
  CHECKPOINT = write_random_original_checkpoint('checkpoints/tiny_original.npz', TINY, IMAGE_SIZE)
else:
  IMAGE_SIZE = 224
  CHECKPOINT = resolve_checkpoint('ViT-B_16')
''' + RUN_CONFIG + '''


def method_config(method):
  """The run config of `method`: config itself for MLAE, else LoRA of the same rank (scale
  alpha / r with alpha = r: no masks, no coefficients)."""
  run_config = config.copy_and_resolve_references()
  run_config.adapter.method = method
  run_config.adapter.lora.rank = config.adapter.mlae.rank
  return run_config


METHODS = ('mlae', 'lora')
TO_TRAIN = [method for method in METHODS
            if not os.path.exists(os.path.join(workdir_of(method), 'results.json'))]
print('runs to train:', ', '.join(TO_TRAIN) or 'none, both are finished')'''),
      new_markdown_cell(ESTIMATE_TEXT + ' Each run left to train is timed with its own config.'),
      new_code_cell(ESTIMATE + '''

if TO_TRAIN:
  data = build_task_data(config.data)  # Full mode: TFDS downloads and prepares the task once.
  for method in TO_TRAIN:
    print(f'{method}:', estimate_training(method_config(method), data).describe())'''),
      new_code_cell('''\
def run(method):
  """The workdir of a finished run of `method` on TASK, trained here if needed."""
  workdir = workdir_of(method)
  if method in TO_TRAIN:
    train_on_task(method_config(method), workdir, data)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  print(f"{method}: final-epoch accuracy {results['final_epoch_accuracy']:.4f} after "
        f"{results['epochs']} epochs ({workdir})")
  return workdir


WORKDIRS = {method: run(method) for method in METHODS}'''),
      new_markdown_cell('''\
## Expert cosine similarity

`export_similarity` reads a run's adapter export (no backbone needed) and returns, per block, the
r x r cosine similarities of the flattened experts c_i a_i b_i^T, computed from r x r Gram matrices
without forming any d_in x d_out matrix. The coefficients' magnitudes cancel; their signs are
kept.'''),
      new_code_cell('''\
similarity = {method: export_similarity(f'{workdir}/export')
              for method, workdir in WORKDIRS.items()}
for method, result in similarity.items():
  means = result.block_means()
  print(f'{method:5s} mean over blocks {result.mean():+.4f} | per block: '
        + ' '.join(f'{means[layer]:+.3f}' for layer in sorted(means)))

blocks = len(similarity['mlae'].block_means())
fig, axes = plt.subplots(2, blocks, figsize=(1.9 * blocks + 1, 4.4), squeeze=False)
for row, (method, result) in enumerate(similarity.items()):
  for layer, matrix in enumerate(result.stacked()):
    ax = axes[row, layer]
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap='RdBu_r')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f'block {layer + 1}', fontsize=8)
  axes[row, 0].set_ylabel(f'{method}\\nmean {result.mean():+.3f}')
fig.colorbar(image, ax=axes, shrink=0.8, label='cosine similarity')
fig.suptitle(f'Cosine similarity between the experts of each block ({TASK})')
plt.show()'''),
      new_code_cell('''\
fig, ax = plt.subplots(figsize=(6, 3))
width = 0.4
for offset, (method, result) in zip((-width / 2, width / 2), similarity.items()):
  means = result.block_means()
  ax.bar(np.arange(1, blocks + 1) + offset, [means[layer] for layer in sorted(means)], width,
         label=f'{method} (mean {result.mean():+.3f})')
ax.axhline(0, color='black', linewidth=0.5)
ax.set_xlabel('block')
ax.set_ylabel('mean pairwise similarity')
ax.set_xticks(np.arange(1, blocks + 1))
ax.legend()
plt.show()'''),
      new_markdown_cell('''\
## Training curves

From each run's `metrics.jsonl`: one `train` record per epoch (loss, accuracy, learning rate,
speed) and one `eval` record per evaluation.'''),
      new_code_cell('''\
fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
for color, (method, workdir) in zip(('tab:blue', 'tab:orange'), WORKDIRS.items()):
  records = read_metrics(workdir)
  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  loss_ax.plot([r['epoch'] for r in train], [r['loss'] for r in train], color=color,
               label=f'{method} train')
  loss_ax.plot([r['epoch'] for r in evals], [r['loss'] for r in evals], 'o--', color=color,
               label=f'{method} test')
  accuracy_ax.plot([r['epoch'] for r in evals], [r['accuracy'] for r in evals], 'o-',
                   color=color, label=method)
loss_ax.set(xlabel='epoch', ylabel='cross-entropy', title='loss')
accuracy_ax.set(xlabel='epoch', ylabel='accuracy', title='test accuracy')
loss_ax.legend()
accuracy_ax.legend()
plt.show()'''),
  ]


NOTEBOOKS = {
    'quick_start': quick_start,
    'pytorch_cross_check': pytorch_cross_check,
    'analysis': analysis,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name`, outputs empty, with stable cell ids (clean diffs)."""
  cells = NOTEBOOKS[name]()
  for index, cell in enumerate(cells):
    cell['id'] = f'{name}-{index}'
  notebook = new_notebook(cells=cells, metadata={
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'},
      # Colab opens the notebook on a GPU runtime, which the full mode wants.
      'accelerator': 'GPU',
      'colab': {'provenance': [], 'gpuType': 'T4'},
  })
  nbformat.validate(notebook)
  return notebook


def path_of(name: str) -> str:
  return os.path.join(HERE, f'{name}.ipynb')


def render(name: str) -> str:
  return nbformat.writes(build(name)) + '\n'


def main(argv: list[str]) -> int:
  stale = []
  for name in NOTEBOOKS:
    text = render(name)
    if '--check' in argv:
      with open(path_of(name)) as f:
        if f.read() != text:
          stale.append(name)
    else:
      with open(path_of(name), 'w') as f:
        f.write(text)
  if stale:
    print(f'Stale notebooks: {stale}; run python notebooks/build_notebooks.py', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
