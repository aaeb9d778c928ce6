"""Tests for npvae.data's Dataset on any data (labels and paired targets optional),
Dataset.from_arrays (splits, stratification, errors) and preprocess.to_model_range."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npvae.data import Dataset, load_dataset, load_demo, to_float, to_model_range


def _rows(a: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in a.reshape(a.shape[0], -1))


# ----------------------------------------------------------------------------- Dataset


def test_dataset_takes_any_sample_shape_without_labels():
    x = np.random.default_rng(0).random((5, 20, 20, 3), dtype=np.float32)
    ds = Dataset("scans", x[:3], None, x[3:], None, x[3:], None)
    assert ds.sample_shape == (20, 20, 3) and ds.target_shape is None
    assert not ds.has_labels and not ds.is_paired and ds.num_classes == 0
    assert ds.description == "" and not ds.is_demo and ds.source is None
    assert repr(ds) == ("Dataset(name='scans', train=(3, 20, 20, 3), val=(2, 20, 20, 3), test=(2, 20, 20, 3), "
                        "is_demo=False, labels=None)")


def test_dataset_with_labels_and_targets_infers_num_classes():
    x, t = np.zeros((4, 6), np.uint8), np.ones((4, 2, 3), np.float64)
    y = np.array([0, 3, 1, 1])
    ds = Dataset("pairs", x, y, x[:2], y[:2], x[:1], y[:1], train_target=t, val_target=t[:2], test_target=t[:1],
                 source={"kind": "arrays"})
    assert ds.has_labels and ds.is_paired and ds.num_classes == 4 and ds.target_shape == (2, 3)
    assert repr(ds).endswith("is_demo=False, target=(2, 3))")
    assert Dataset("pairs", x, y, x, y, x, y, num_classes=10).num_classes == 10


def test_builtin_datasets_keep_their_shape_and_say_where_they_came_from():
    demo = load_demo()
    assert demo.sample_shape == (784,) and demo.has_labels and not demo.is_paired and demo.num_classes == 10
    assert demo.source == {"kind": "builtin", "name": "demo", "data_dir": None}
    assert load_dataset("demo").source == demo.source
    json.dumps(demo.source)


@pytest.mark.parametrize("change, error, message", [
    ({"val_x": np.zeros((2, 5), np.uint8)}, ValueError, r"expected val_x with the sample shape of train_x \(6,\), "
                                                          r"got shape \(2, 5\)"),
    ({"val_y": None}, ValueError, "train_y, test_y given but val_y missing: give y for every split or for none"),
    ({"test_y": np.zeros(3, np.float32)}, TypeError, "expected test_y integer class labels, got dtype float32"),
    ({"train_y": np.array([0, -2, 1, 1])}, ValueError, r"expected train_y labels >= 0, got train_y\[1\] = -2"),
    ({"train_x": np.array(list("abcd"))}, TypeError, "expected train_x a numeric array.*<U1"),
    ({"train_x": np.zeros(4, np.uint8)}, ValueError, r"train_x of shape \(N, ...\).*got shape \(4,\).*reshape"),
    ({"test_x": np.array([[0.5, np.inf]])}, ValueError, r"test_x contains inf at index \(0, 1\)"),
    ({"num_classes": 2}, ValueError, "train_y holds label 3 but num_classes=2"),
    ({"num_classes": -1}, ValueError, "num_classes a non-negative integer"),
    ({"train_target": np.zeros((4, 2))}, ValueError, "train_target given but val_target, test_target missing"),
    ({"source": {"path": object()}}, TypeError, "JSON-able"),
    ({"source": "x.npz"}, TypeError, "expected source a dict"),
])
def test_dataset_rejects_bad_parts(change, error, message):
    x, y = np.zeros((4, 6), np.uint8), np.array([0, 3, 1, 1])
    args = {"name": "d", "train_x": x, "train_y": y, "val_x": x[:2], "val_y": y[:2], "test_x": x[:1],
            "test_y": y[:1], **change}
    with pytest.raises(error, match=message):
        Dataset(**args)


def test_unlabelled_dataset_refuses_num_classes():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="num_classes=10 but the dataset has no labels"):
        Dataset("d", x, None, x, None, x, None, num_classes=10)


# ----------------------------------------------------------------------------- from_arrays


def test_from_arrays_random_split_partitions_in_order():
    x = np.arange(50 * 4, dtype=np.float32).reshape(50, 4) / 200
    ds = Dataset.from_arrays(x, seed=3)
    assert (len(ds.train_x), len(ds.val_x)) == (45, 5)
    assert ds.test_x is ds.val_x and ds.test_y is None and ds.num_classes == 0
    assert _rows(np.concatenate([ds.train_x, ds.val_x])) == _rows(x)
    assert np.all(np.diff(ds.train_x[:, 0]) > 0) and np.all(np.diff(ds.val_x[:, 0]) > 0)  # file order kept
    assert ds.name == "arrays" and ds.source == {"kind": "arrays"}
    assert "45 train / 5 validation" in ds.description and "x (N, 4) float32" in ds.description
    np.testing.assert_array_equal(Dataset.from_arrays(x, seed=3).val_x, ds.val_x)
    assert not np.array_equal(Dataset.from_arrays(x, seed=4).val_x, ds.val_x)
    two = Dataset.from_arrays(x[:2], val_fraction=0.01)
    assert (len(two.train_x), len(two.val_x)) == (1, 1)
    assert len(Dataset.from_arrays(x[:2], val_fraction=0.99).val_x) == 1


def test_from_arrays_stratifies_and_carries_targets():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [40, 20, 10, 3])
    x = rng.random((73, 3, 3))
    target = x * 2
    ds = Dataset.from_arrays(x, y, target, val_fraction=0.2, seed=1, name="mine", description="d")
    assert ds.name == "mine" and ds.description == "d" and ds.num_classes == 4 and ds.is_paired
    np.testing.assert_array_equal(np.bincount(ds.val_y, minlength=4), [8, 4, 2, 1])   # round(0.2 * n_c)
    np.testing.assert_array_equal(np.bincount(ds.train_y, minlength=4), [32, 16, 8, 2])
    np.testing.assert_array_equal(ds.train_target, ds.train_x * 2)   # rows stay with their targets and labels
    np.testing.assert_array_equal(ds.val_target, ds.val_x * 2)
    for part in ("train", "val"):
        xs, ys = getattr(ds, f"{part}_x"), getattr(ds, f"{part}_y")
        for xi, yi in zip(xs, ys):
            assert y[np.flatnonzero((x == xi).all(axis=(1, 2)))[0]] == yi
    assert len(set(ds.val_y[:4].tolist())) > 1                       # shuffled: a prefix mixes the classes


def test_from_arrays_small_classes_stay_in_training():
    y = np.array([0, 0, 0, 0, 1, 2, 2])
    ds = Dataset.from_arrays(np.zeros((7, 2)), y, val_fraction=0.1)
    assert len(ds.val_y) == 1 and ds.val_y[0] == 0        # every class rounds to 0: the largest gives one
    assert sorted(ds.train_y.tolist()) == [0, 0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="every class has a single example"):
        Dataset.from_arrays(np.zeros((3, 2)), [0, 1, 2])


@settings(max_examples=40, deadline=None)
@given(y=hnp.arrays(np.int64, st.integers(2, 60), elements=st.integers(0, 5)),
       frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_from_arrays_split_properties(y, frac, seed):
    x = np.arange(len(y))[:, None]
    try:
        ds = Dataset.from_arrays(x, y, val_fraction=frac, seed=seed)
    except ValueError as exc:
        assert "single example" in str(exc) and len(np.unique(y)) == len(y)
        return
    assert len(ds.train_x) >= 1 and len(ds.val_x) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.train_x, ds.val_x])[:, 0]), np.arange(len(y)))
    np.testing.assert_array_equal(y[ds.train_x[:, 0]], ds.train_y)
    for c in np.unique(y):
        n_c, k_c = np.sum(y == c), np.sum(ds.val_y == c)
        assert 1 <= n_c - k_c                             # every class keeps one in training
        assert k_c in (min(int(np.floor(frac * n_c + 0.5)), n_c - 1), 1)
    plain = Dataset.from_arrays(x, val_fraction=frac, seed=seed)
    assert len(plain.val_x) == min(max(int(np.floor(frac * len(y) + 0.5)), 1), len(y) - 1)


def test_from_arrays_with_explicit_validation():
    x, vx = np.zeros((5, 2, 2), np.uint8), np.ones((3, 2, 2), np.uint8)
    ds = Dataset.from_arrays(x, [0, 1, 0, 1, 0], val_x=vx, val_y=[1, 1, 0], val_fraction=5.0)
    assert len(ds.train_x) == 5 and ds.val_x is ds.test_x
    np.testing.assert_array_equal(ds.val_x, vx)
    assert "validation given" in ds.description


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((np.array([["a", "b"], ["c", "d"]]),), {}, TypeError, "expected x a numeric array.*<U1"),
    ((np.zeros((3, 2), complex),), {}, TypeError, "expected x a numeric array.*complex128"),
    ((np.arange(5.0),), {}, ValueError, r"expected x of shape \(N, ...\).*got shape \(5,\)"),
    ((np.zeros((1, 4)),), {}, ValueError, r"at least 2 examples.*got shape \(1, 4\)"),
    ((np.array([[0.1, 0.2], [np.nan, 0.3]]),), {}, ValueError, r"x contains nan at index \(1, 0\)"),
    ((np.zeros((3, 2)), [0.0, 1.0, 1.0]), {}, TypeError, r"expected y integer class labels, got dtype float64.*astype"),
    ((np.zeros((3, 2)), [0, 1]), {}, ValueError, r"expected y of shape \(3,\), one label per example, got \(2,\)"),
    ((np.zeros((3, 2)), [0, 1, -1]), {}, ValueError, r"y\[2\] = -1"),
    ((np.zeros((3, 2)), None, np.zeros((4, 2))), {}, ValueError, r"expected target with 3 rows.*\(4, 2\)"),
    ((np.zeros((3, 2)), None, np.array([[1.0], [np.inf], [0.0]])), {}, ValueError, r"target contains inf at \S+ \(1, 0\)"),
    ((np.zeros((3, 2)),), {"val_fraction": 1.0}, ValueError, r"val_fraction in \(0, 1\), got 1.0"),
    ((np.zeros((3, 2)),), {"val_fraction": True}, ValueError, "val_fraction in"),
    ((np.zeros((3, 2)),), {"val_y": [0]}, ValueError, "val_y given without val_x"),
    ((np.zeros((3, 2)), [0, 1, 1]), {"val_x": np.zeros((1, 2))}, ValueError, "y given but val_y missing"),
    ((np.zeros((3, 2)),), {"val_x": np.zeros((1, 2)), "val_target": np.zeros((1, 2))}, ValueError,
     "val_target given but target missing"),
    ((np.zeros((3, 2)),), {"val_x": np.zeros((1, 3))}, ValueError, r"val_x with the sample shape of train_x \(2,\)"),
    ((np.zeros((3, 2)),), {"val_x": np.zeros((0, 2))}, ValueError, "val_x with at least 1 example"),
])
def test_from_arrays_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        Dataset.from_arrays(*args, **kwargs)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- to_model_range


def _old_trainer_path(images: np.ndarray, value_range, dtype) -> np.ndarray:
    """What the trainer did before to_model_range: to_float to [0, 1], then the linear map."""
    x = to_float(images.reshape(images.shape[0], -1), value_range=(0, 1), dtype=dtype).reshape(images.shape)
    lo, hi = value_range
    if (lo, hi) != (0, 1):
        x = x * np.dtype(dtype).type(hi - lo) + np.dtype(dtype).type(lo)
    return x


@settings(max_examples=60, deadline=None)
@given(images=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=4, max_side=6)),
       value_range=st.sampled_from([(0, 1), (-1, 1), (0.0, 1.0), (-0.5, 2.0), (1e-3, 1 - 1e-3), (0, 255)]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_uint8_is_bit_identical_to_the_old_trainer_path(images, value_range, dtype):
    out = to_model_range(images, value_range, dtype)
    want = _old_trainer_path(images, value_range, dtype)
    assert out.dtype == dtype and out.shape == images.shape
    assert out.tobytes() == want.tobytes()


def test_uint8_endpoints_and_full_mnist_like_batch():
    images = load_demo().val_x
    for value_range in ((0, 1), (-1, 1)):
        for dtype in (np.float32, np.float64):
            assert to_model_range(images, value_range, dtype).tobytes() == \
                _old_trainer_path(images, value_range, dtype).tobytes()
    out = to_model_range(np.array([[0, 255]], np.uint8), (-1, 1))
    assert out[0, 0] == -1 and out[0, 1] == 1


@pytest.mark.parametrize("x, value_range", [
    (np.array([[0.0, 0.25, 1.0]]), (0, 1)),
    (np.array([[-1.0, 1.0]], np.float32), (-1, 1)),
    (np.array([[True, False]]), (0, 1)),
    (np.array([[0, 1]], np.int64), (0, 1)),
    (np.zeros((0, 3)), (0, 1)),
])
def test_values_on_the_model_scale_are_only_cast(x, value_range):
    for dtype in (np.float32, np.float64):
        out = to_model_range(x, value_range, dtype)
        assert out.dtype == dtype and out is not x
        np.testing.assert_array_equal(out, x.astype(dtype))


@pytest.mark.parametrize("x, kwargs, error, message", [
    (np.array([[-0.5, 2.0]]), {}, ValueError,
     r"^expected x values in \[0, 1\] for this model, got range \[-0.5, 2\]; scale your data or pick a model "
     r"with that range$"),
    (np.array([[0.0, 1.5]]), {"value_range": (-1, 1), "name": "train_target"}, ValueError,
     r"expected train_target values in \[-1, 1\].*got range \[0, 1.5\]"),
    (np.array([[0.5, np.nan]]), {}, ValueError, "found NaN"),
    (np.array([[0, 200]], np.int32), {}, ValueError, r"got range \[0, 200\].*pass them as uint8"),
    (np.array([["a"]]), {}, TypeError, "numeric dtype"),
    (np.zeros((1, 2), np.uint8), {"value_range": (1, 1)}, ValueError, "finite lo < hi"),
    (np.zeros((1, 2), np.uint8), {"dtype": np.float16}, TypeError, "float32 or float64"),
])
def test_to_model_range_rejects(x, kwargs, error, message):
    with pytest.raises(error, match=message):
        to_model_range(x, **kwargs)
