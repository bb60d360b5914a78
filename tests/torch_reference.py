"""The PyTorch side of the cross-checks: timm's ViT with an MLAE layer on the fused
qkv, written from the paper's description (section 3), with the parameter names of
the published PyTorch layer (lora_A (r, in), lora_B (r, out), lora_lamda (r,)), and
timm's stochastic depth with its keep patterns set from outside."""

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from fake_checkpoint import write_original_npz

TINY_SIZE = dict(hidden=32, mlp=64, heads=4, layers=3, patch=8, image_size=32)


class PaperMLAELinear(torch.nn.Module):
  """W0 x + b0 + sum_i m_i lambda_i b_i a_i^T x, inverted dropout on lambda in
  training. The expert mask is set from outside (`mask`) so both sides share it."""

  def __init__(self, base: torch.nn.Linear, experts: int, drop_rate: float = 0.0):
    super().__init__()
    self.base = base
    self.lora_A = torch.nn.Parameter(torch.zeros(experts, base.in_features))
    self.lora_B = torch.nn.Parameter(torch.zeros(experts, base.out_features))
    self.lora_lamda = torch.nn.Parameter(torch.ones(experts))
    self.drop_rate = drop_rate
    self.mask = None

  def forward(self, x):
    lam = self.lora_lamda
    if self.training and self.drop_rate > 0:
      lam = lam * self.mask / (1 - self.drop_rate)
    experts = torch.stack([torch.outer(self.lora_A[i], self.lora_B[i]) * lam[i]
                           for i in range(self.lora_A.shape[0])])
    return self.base(x) + x @ experts.sum(0)


class InjectedDropPath(torch.nn.Module):
  """timm's DropPath (per-example branch keep, kept ones scaled by 1/(1-rate)) whose
  keep pattern (bool, (batch,)) is set from outside (`keep`)."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate
    self.keep = None

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    scale = self.keep.to(x.dtype).div_(1 - self.rate)  # timm: bernoulli_(keep).div_(keep)
    return x * scale.view(-1, *([1] * (x.ndim - 1)))


def tiny_checkpoint(path):
  write_original_npz(path, **TINY_SIZE)
  return path


def timm_vit(checkpoint, size=TINY_SIZE, num_classes: int = 5,
             drop_path_rate: float = 0.0) -> TimmViT:
  """timm's ViT of `size` (as write_original_npz takes it) reading `checkpoint`, its
  backbone frozen; every block's DropPath replaced by an InjectedDropPath of the same
  rate (timm's per-block rates)."""
  model = TimmViT(img_size=size['image_size'], patch_size=size['patch'],
                  embed_dim=size['hidden'], depth=size['layers'], num_heads=size['heads'],
                  mlp_ratio=size['mlp'] / size['hidden'], num_classes=num_classes,
                  drop_path_rate=drop_path_rate)
  model.load_pretrained(str(checkpoint))
  for p in model.parameters():
    p.requires_grad_(False)
  for block in model.blocks:
    for name in ('drop_path1', 'drop_path2'):
      setattr(block, name, InjectedDropPath(getattr(getattr(block, name), 'drop_prob', 0.0)))
  return model


def timm_with_mlae(checkpoint, experts: int, drop_rate: float = 0.0, num_classes: int = 5,
                   size=TINY_SIZE, drop_path_rate: float = 0.0) -> TimmViT:
  """`timm_vit` with every qkv wrapped by PaperMLAELinear."""
  model = timm_vit(checkpoint, size, num_classes, drop_path_rate)
  for block in model.blocks:
    block.attn.qkv = PaperMLAELinear(block.attn.qkv, experts, drop_rate)
  return model


def set_drop_path_keeps(model: TimmViT, intermediates: dict, rows: int | None = None) -> int:
  """Gives every InjectedDropPath of `model` the keep pattern our model sowed
  (flattened intermediates, `.../encoderblock_{i}/drop_path_{0,1}/keep`), first `rows`
  examples; returns how many patterns were set."""
  count = 0
  for i, block in enumerate(model.blocks):
    for j, name in enumerate(('drop_path1', 'drop_path2')):
      key = f'Transformer/encoderblock_{i}/drop_path_{j}/keep'
      if key in intermediates:
        getattr(block, name).keep = torch.from_numpy(np.array(intermediates[key][0][:rows]))
        count += 1
  return count


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def tensor(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x))
