"""The PyTorch reference of the throughput benchmark: timm's ViT, every fused qkv
wrapped by an MLAE layer (low-rank path, one expert mask per layer and forward),
AdamW on adapters + head, as the paper's PyTorch code trains it."""

from __future__ import annotations

import argparse
import contextlib
import gc
from typing import Callable

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from mlae_jax.checkpoints.variants import get_variant

NAME = 'torch'


class MLAELinear(torch.nn.Module):
  """base(x) + ((x A^T) * drop(lambda)) B, inverted expert dropout in training."""

  def __init__(self, base: torch.nn.Linear, experts: int, drop_rate: float):
    super().__init__()
    self.base = base
    self.lora_A = torch.nn.Parameter(torch.empty(experts, base.in_features))
    torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
    self.lora_B = torch.nn.Parameter(torch.zeros(experts, base.out_features))
    self.lora_lamda = torch.nn.Parameter(torch.ones(experts))
    self.drop_rate = drop_rate

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    lam = self.lora_lamda
    if self.training and self.drop_rate > 0:
      keep = torch.bernoulli(torch.full_like(lam, 1 - self.drop_rate))
      lam = lam * keep / (1 - self.drop_rate)
    return self.base(x) + ((x @ self.lora_A.t()) * lam) @ self.lora_B


def device_peak() -> int | None:
  return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def reference_device() -> torch.device:
  """Where the reference runs: the first CUDA device if PyTorch has one, else the CPU."""
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def release() -> None:
  """Hands the memory PyTorch's CUDA allocator still caches back to the device, once
  the calls of `prepare` are dropped (so that a side run after this one has it)."""
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def prepare(args: argparse.Namespace, record: dict) -> tuple[dict[str, Callable], dict]:
  """Calls of the reference's train step and eval (bf16 autocast where ours is bf16)."""
  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
  device = reference_device()
  variant = get_variant(args.model)
  model = VisionTransformer(
      img_size=args.image_size, patch_size=variant.patch_size, embed_dim=variant.hidden_size,
      depth=args.layers or variant.num_layers, num_heads=variant.num_heads,
      mlp_ratio=variant.mlp_dim / variant.hidden_size, num_classes=args.num_classes)
  for p in model.parameters():
    p.requires_grad_(False)
  for block in model.blocks:
    block.attn.qkv = MLAELinear(block.attn.qkv, args.rank, args.drop_rate)
  for p in model.head.parameters():
    p.requires_grad_(True)
  model.to(device)
  trained = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-4)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if record['dtype'] == 'bfloat16'
              else contextlib.nullcontext())

  generator = torch.Generator().manual_seed(0)
  images = torch.rand(args.batch, 3, args.image_size, args.image_size,
                      generator=generator).mul(2).sub(1).to(device)
  labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def train_call():
    model.train()
    with autocast:
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()

  @torch.inference_mode()
  def eval_call():
    model.eval()
    with autocast:
      model(images).argmax(-1)
    sync()

  info = {'torch_version': torch.__version__, 'timm_version': timm.__version__,
          'torch_threads': torch.get_num_threads()}
  return {'torch_train': train_call, 'torch_eval': eval_call}, info
