"""VTAB label rules on hand-made examples with known answers, bin edges included."""

import numpy as np
import pytest

from mlae_jax.data import labels, vtab


def _clevr(depths, count=None):
  depths = np.asarray(depths, np.float32)
  count = len(depths) if count is None else count
  coords = np.zeros((len(depths), 3), np.float32)
  coords[:, 0], coords[:, 1], coords[:, 2] = 10.0, 20.0, depths
  return {'objects': {'size': np.zeros(count, np.int64), 'pixel_coords': coords}}


@pytest.mark.parametrize('objects, expected', [(3, 0), (4, 1), (7, 4), (10, 7)])
def test_clevr_count_is_objects_minus_three(objects, expected):
  assert labels.clevr_count(_clevr([9.0] * objects)) == expected
  assert vtab.TASKS['clevr_count'].label_rule(_clevr([9.0] * objects)) == expected


@pytest.mark.parametrize('nearest, expected', [
    (0.5, 0), (8.0, 0),      # (0, 8]
    (8.01, 1), (8.5, 1),     # (8, 8.5]
    (8.75, 2), (9.0, 2),     # (8.5, 9]
    (9.25, 3), (9.5, 3),     # (9, 9.5]
    (9.75, 4), (10.0, 4),    # (9.5, 10]
    (10.01, 5), (15.0, 5), (100.0, 5),  # (10, 100]
])
def test_clevr_distance_bins_use_the_nearest_object(nearest, expected):
  example = _clevr([nearest + 3.0, nearest, nearest + 1.0])  # Nearest object in the middle.
  assert labels.clevr_closest_distance(example) == expected
  assert vtab.TASKS['clevr_dist'].label_rule(example) == expected


@pytest.mark.parametrize('nearest', [0.0, -1.0, 100.5])
def test_clevr_distance_outside_the_vtab_bins_raises(nearest):
  with pytest.raises(ValueError, match='outside the bins'):
    labels.clevr_closest_distance(_clevr([nearest]))


def _kitti(types, depths):
  location = np.zeros((len(depths), 3), np.float32)
  location[:, 0], location[:, 1], location[:, 2] = 1.5, -2.0, depths
  return {'objects': {'type': np.asarray(types, np.int64), 'location': location}}


@pytest.mark.parametrize('types, depths, expected', [
    ([0], [5.0], 0),               # Car at 5 m.
    ([0], [8.0], 0),               # Edge: 8 m is still the first bin.
    ([1], [8.001], 1),             # Van just past 8 m.
    ([2], [20.0], 1),              # Truck at the 20 m edge.
    ([0], [20.5], 2),
    ([0], [998.0], 2),
    ([3, 5, 6, 7], [2.0, 3.0, 4.0, 5.0], 3),  # Pedestrian, cyclist, tram, misc: no vehicle.
    ([], [], 3),                    # No objects at all.
    ([3, 0, 1], [1.0, 30.0, 15.0], 1),  # Nearest object is a pedestrian; nearest vehicle 15 m.
    ([0, 4, 2], [40.0, 2.0, 7.0], 0),
])
def test_kitti_distance_bins_only_count_vehicles(types, depths, expected):
  example = _kitti(types, depths)
  assert labels.kitti_closest_vehicle_distance(example) == expected
  assert vtab.TASKS['kitti'].label_rule(example) == expected


def test_kitti_mismatched_objects_raise():
  with pytest.raises(ValueError, match='disagree'):
    labels.kitti_distance_bin(np.array([0, 1]), np.array([3.0]))


@pytest.mark.parametrize('position, expected', [(0, 0), (1, 0), (2, 1), (3, 1), (30, 15), (31, 15)])
def test_dsprites_position_binned_by_two(position, expected):
  rule = vtab.TASKS['dsprites_loc'].label_rule
  assert rule({'label_x_position': np.int64(position)}) == expected


@pytest.mark.parametrize('orientation, expected', [
    (0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (7, 2), (8, 3), (10, 4), (37, 14), (38, 15), (39, 15)])
def test_dsprites_orientation_binned_by_two_and_a_half(orientation, expected):
  rule = vtab.TASKS['dsprites_ori'].label_rule
  assert rule({'label_orientation': np.int64(orientation)}) == expected


def test_dsprites_bins_cover_sixteen_classes_evenly():
  positions = [labels.binned(value, 32, 16) for value in range(32)]
  orientations = [labels.binned(value, 40, 16) for value in range(40)]
  assert sorted(set(positions)) == list(range(16)) and np.bincount(positions).tolist() == [2] * 16
  assert sorted(set(orientations)) == list(range(16))
  assert np.bincount(orientations).tolist() == [3, 2, 3, 2] * 4


def test_smallnorb_reads_its_own_field():
  example = {'label_azimuth': np.int64(17), 'label_elevation': np.int64(8),
             'label_category': np.int64(2), 'label_lighting': np.int64(5)}
  assert vtab.TASKS['smallnorb_azi'].label_rule(example) == 17
  assert vtab.TASKS['smallnorb_ele'].label_rule(example) == 8


def test_plain_tasks_use_the_label_feature():
  example = {'label': np.int64(41), 'coarse_label': np.int64(3), 'id': b'x'}
  for name in ('cifar100', 'dtd', 'sun397', 'eurosat', 'dmlab', 'diabetic_retinopathy'):
    assert vtab.TASKS[name].label_rule(example) == 41, name


def test_last_threshold_below_is_strict():
  assert labels.last_threshold_below(1.0, (0.0, 1.0, 2.0)) == 0
  assert labels.last_threshold_below(1.5, (0.0, 1.0, 2.0)) == 1
  assert labels.last_threshold_below(2.0, (0.0, 1.0, 2.0)) == 1
