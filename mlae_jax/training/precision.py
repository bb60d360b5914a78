"""The compute dtype: `config.model.dtype = 'auto'` picks bfloat16 only where the devices
compute it natively (NVIDIA compute capability >= 8.0, i.e. A100, RTX 30xx/40xx, L4,
H100/H200; TPUs), float32 elsewhere (CPU, T4, V100, P100, devices of unknown capability),
and says why. Parameters and optimizer state stay float32 either way."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

DTYPE_NAMES = ('auto', 'float32', 'bfloat16')  # The values of config.model.dtype.
# The first NVIDIA architecture (Ampere) whose tensor cores compute bf16.
NATIVE_BF16_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
  """A chosen compute dtype and the reason, as logged and stored in results.json."""
  name: str  # 'float32' or 'bfloat16'
  reason: str

  @property
  def dtype(self) -> Any:
    return jnp.dtype(self.name)

  def record(self) -> dict[str, str]:
    return {'name': self.name, 'reason': self.reason}


def _capability(device: Any) -> tuple[int, ...] | None:
  """(major, minor) of a CUDA device's compute capability ('8.6' -> (8, 6)), else None."""
  text = getattr(device, 'compute_capability', None)
  try:
    return tuple(int(part) for part in str(text).split('.')) if text else None
  except ValueError:
    return None


def native_bf16(device: Any) -> tuple[bool, str]:
  """Whether `device` (a jax Device, or any object with its `platform`, `device_kind` and,
  for CUDA, `compute_capability`) computes bf16 natively, and why."""
  platform, kind = str(device.platform).lower(), getattr(device, 'device_kind', device.platform)
  if platform == 'tpu':
    return True, f'{kind}: TPUs compute bf16 natively'
  if platform in ('gpu', 'cuda', 'rocm'):
    capability = _capability(device)
    if capability is None:
      return False, (f'{kind}: compute capability unknown (not a CUDA device), so bf16 is not '
                     'assumed to be native')
    shown = '.'.join(map(str, capability))
    if capability >= NATIVE_BF16_CAPABILITY:
      return True, f'{kind}: compute capability {shown} >= 8.0 computes bf16 natively'
    return False, (f'{kind}: compute capability {shown} < 8.0 has no native bf16 (as T4 and '
                   'V100), where bf16 would be slower than float32')
  return False, f'{kind}: no native bf16 on {platform.upper()}'


def choose_compute_dtype(name: str, devices: Sequence[Any] | None = None) -> ComputeDtype:
  """`name` ('auto', 'float32' or 'bfloat16') resolved for `devices` (default: this
  process's devices; the hosts of a job are alike): 'auto' is bfloat16 when all of them
  compute it natively."""
  if name not in DTYPE_NAMES:
    raise ValueError(f'Bad config value config.model.dtype = {name!r}: use one of {DTYPE_NAMES}.')
  if name != 'auto':
    return ComputeDtype(name, 'set by config.model.dtype')
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError('No devices to choose a compute dtype for.')
  for device in devices:
    native, why = native_bf16(device)
    if not native:
      return ComputeDtype('float32', f'auto: {why}; set config.model.dtype=bfloat16 to '
                                     'force it')
  return ComputeDtype('bfloat16', f'auto: {why}')
