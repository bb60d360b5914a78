"""VTAB label rules, as the original VTAB tooling derives labels from TFDS examples.

Each rule maps one decoded TFDS example (a dict of numpy values, nested dicts for
`Sequence` features such as clevr's and kitti's `objects`) to an int label. They are
plain numpy so they can be checked on hand-made examples with known answers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

Example = Mapping[str, Any]
LabelRule = Callable[[Example], int]

# clevr closest_object_distance: label i <=> depth in (thr[i], thr[i + 1]].
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
# kitti closest_vehicle_distance: 0: <= 8 m, 1: 8-20 m, 2: 20-999 m, 3: no vehicle.
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE_DEPTH = 1000.0  # VTAB appends this depth, so "no vehicle" is the last bin.
KITTI_VEHICLE_TYPES = 3  # TFDS kitti object types 0, 1, 2 = Car, Van, Truck.


def last_threshold_below(value: float, thresholds: Sequence[float]) -> int:
  """Index of the last threshold strictly below `value`: VTAB's
  `reduce_max(where(thresholds - value < 0))`, so a value equal to a threshold falls in
  the lower bin. A value at or below thresholds[0] has no bin and raises."""
  below = np.flatnonzero(np.asarray(thresholds, np.float64) < value)
  if below.size == 0:
    raise ValueError(f'Value {value} lies outside the bins: not above {thresholds[0]}.')
  return int(below[-1])


def from_key(key: str) -> LabelRule:
  """The TFDS feature `key` used unchanged (most tasks: 'label')."""
  def rule(example: Example) -> int:
    return int(example[key])
  rule.__name__ = f'label_from_{key}'
  return rule


def clevr_count(example: Example) -> int:
  """clevr count_all: number of objects - 3 (scenes hold 3..10 objects: 8 classes)."""
  return int(np.size(example['objects']['size'])) - 3


def clevr_distance_bin(depths: np.ndarray) -> int:
  """Bin of the closest object's depth (pixel_coords[:, 2]) among 6 classes; depths
  outside (0, 100] have no class (VTAB would emit an out-of-range label) and raise."""
  nearest = float(np.min(depths))
  label = last_threshold_below(nearest, CLEVR_DISTANCE_THRESHOLDS)
  if label == len(CLEVR_DISTANCE_THRESHOLDS) - 1:
    raise ValueError(f'clevr depth {nearest} lies outside the bins (0, 100].')
  return label


def clevr_closest_distance(example: Example) -> int:
  """clevr closest_object_distance: the depth bin of the nearest object."""
  pixel_coords = np.asarray(example['objects']['pixel_coords']).reshape(-1, 3)
  return clevr_distance_bin(pixel_coords[:, 2])


def kitti_distance_bin(types: np.ndarray, depths: np.ndarray) -> int:
  """Bin of the closest vehicle's depth (location z, metres); 3 when there is no vehicle
  (the appended depth 1000 is above the last threshold, 999)."""
  types, depths = np.asarray(types).reshape(-1), np.asarray(depths, np.float32).reshape(-1)
  if types.shape != depths.shape:
    raise ValueError(f'kitti objects disagree: {types.size} types but {depths.size} locations.')
  vehicle_depths = np.append(depths[types < KITTI_VEHICLE_TYPES], KITTI_NO_VEHICLE_DEPTH)
  return last_threshold_below(float(np.min(vehicle_depths)), KITTI_DISTANCE_THRESHOLDS)


def kitti_closest_vehicle_distance(example: Example) -> int:
  """kitti closest_vehicle_distance: 4 classes from the nearest Car/Van/Truck."""
  objects = example['objects']
  return kitti_distance_bin(objects['type'], np.asarray(objects['location']).reshape(-1, 3)[:, 2])


def binned(value: int, num_original_classes: int, num_classes: int) -> int:
  """VTAB's dsprites coarsening: floor(value / (num_original / num_classes)) in float32."""
  factor = np.float32(num_original_classes / num_classes)
  return int(np.floor_divide(np.float32(value), factor))


def dsprites_binned(key: str, num_original_classes: int, num_classes: int = 16) -> LabelRule:
  """dsprites attribute `key` (x position: 32 values, orientation: 40) binned to 16."""
  def rule(example: Example) -> int:
    return binned(int(example[key]), num_original_classes, num_classes)
  rule.__name__ = f'dsprites_{key}_binned'
  return rule
