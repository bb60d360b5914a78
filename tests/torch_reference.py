"""The PyTorch side of the cross-checks: timm's ViT with an MLAE layer on the fused
qkv, written from the paper's description (section 3), with the parameter names of
the published PyTorch layer (lora_A (r, in), lora_B (r, out), lora_lamda (r,))."""

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


def tiny_checkpoint(path):
  write_original_npz(path, **TINY_SIZE)
  return path


def timm_with_mlae(checkpoint, experts: int, drop_rate: float = 0.0, num_classes: int = 5):
  """timm's ViT of TINY_SIZE reading `checkpoint`, every qkv wrapped by PaperMLAELinear,
  backbone frozen."""
  model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2,
                  num_classes=num_classes)
  model.load_pretrained(str(checkpoint))
  for p in model.parameters():
    p.requires_grad_(False)
  for block in model.blocks:
    block.attn.qkv = PaperMLAELinear(block.attn.qkv, experts, drop_rate)
  return model


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def tensor(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x))
