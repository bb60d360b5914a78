"""`dtype='auto'`: bf16 only where the devices compute it natively, decided from device
descriptions (no accelerator needed), and the choice stored with its reason."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from mlae_jax.training.precision import choose_compute_dtype, native_bf16


def gpu(kind, capability):
  return SimpleNamespace(platform='gpu', device_kind=kind, compute_capability=capability)


T4 = gpu('Tesla T4', '7.5')
V100 = gpu('Tesla V100-SXM2-16GB', '7.0')
P100 = gpu('Tesla P100-PCIE-16GB', '6.0')
A100 = gpu('NVIDIA A100-SXM4-40GB', '8.0')
RTX3090 = gpu('NVIDIA GeForce RTX 3090', '8.6')
L4 = gpu('NVIDIA L4', '8.9')
H200 = gpu('NVIDIA H200', '9.0')
B200 = gpu('NVIDIA B200', '10.0')
TPU = SimpleNamespace(platform='tpu', device_kind='TPU v4')
CPU = SimpleNamespace(platform='cpu', device_kind='cpu')
ROCM = SimpleNamespace(platform='gpu', device_kind='AMD Instinct MI250X')  # No capability.


@pytest.mark.parametrize('device', [A100, RTX3090, L4, H200, B200, TPU],
                         ids=lambda d: d.device_kind)
def test_native_bf16_devices_get_bfloat16(device):
  choice = choose_compute_dtype('auto', [device] * 4)
  assert choice.name == 'bfloat16' and choice.dtype == jnp.bfloat16
  assert device.device_kind in choice.reason and choice.reason.startswith('auto: ')


@pytest.mark.parametrize('device,why', [(T4, '7.5 < 8.0'), (V100, '7.0 < 8.0'),
                                        (P100, '6.0 < 8.0'), (CPU, 'CPU'),
                                        (ROCM, 'capability unknown')],
                         ids=lambda d: getattr(d, 'device_kind', ''))
def test_other_devices_get_float32_and_say_why(device, why):
  choice = choose_compute_dtype('auto', [device])
  assert choice.name == 'float32' and choice.dtype == jnp.float32
  assert why in choice.reason and device.device_kind in choice.reason
  assert 'config.model.dtype=bfloat16' in choice.reason  # How to override it.


def test_capability_compares_as_numbers_not_text():
  assert native_bf16(gpu('future', '10.0'))[0] and not native_bf16(gpu('old', '7.10'))[0]
  assert not native_bf16(gpu('odd', 'sm_80?'))[0]  # Unparsable: not assumed native.


def test_one_device_without_native_bf16_makes_the_job_float32():
  choice = choose_compute_dtype('auto', [A100, A100, V100])
  assert choice.name == 'float32' and 'V100' in choice.reason


def test_an_explicit_dtype_is_kept_whatever_the_device():
  assert choose_compute_dtype('bfloat16', [T4]).name == 'bfloat16'
  assert choose_compute_dtype('float32', [H200]).name == 'float32'
  assert choose_compute_dtype('float32', [H200]).reason == 'set by config.model.dtype'


def test_this_machine_is_described_by_its_real_devices():
  choice = choose_compute_dtype('auto')
  native = all(native_bf16(device)[0] for device in jax.local_devices())
  assert choice.name == ('bfloat16' if native else 'float32')
  if jax.default_backend() == 'cpu':
    assert choice.name == 'float32'
  assert jax.local_devices()[0].device_kind in choice.reason


def test_an_unknown_dtype_name_is_refused_with_the_choices():
  with pytest.raises(ValueError, match=r"config.model.dtype = 'float16': use one of"):
    choose_compute_dtype('float16', [H200])
