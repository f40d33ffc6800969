"""One conversion for every feedback path (isample._feedback.feedback_arrays): rules and properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from isample import TableSampler
from isample._feedback import feedback_arrays
from isample.schemes import base

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.int16, torch.uint8]


@pytest.mark.parametrize("convert", [feedback_arrays, base.feedback_arrays])
def test_bool_mask_is_a_type_error_not_indices_zero_and_one(convert):
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[3, 7]] = True
    with pytest.raises(TypeError, match="integer.*bool.*nonzero"):
        convert(mask, torch.ones(10), 10, "Owner")
    with pytest.raises(TypeError, match="integer"):
        convert(np.array([True, False]), np.ones(2), 10, "Owner")


@pytest.mark.parametrize("convert", [feedback_arrays, base.feedback_arrays])
def test_float_indices_are_a_type_error(convert):
    for idx in (torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]), [1.0, 2.0], torch.tensor([1, 2]).half()):
        with pytest.raises(TypeError, match="'indices' parameter of Owner.update must be an integer"):
            convert(idx, [1.0, 2.0], 10, "Owner")


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_float_dtype_is_accepted_and_becomes_float64(dtype):
    scores = torch.tensor([0.5, 1.25, 3.0], dtype=dtype)
    idx, val = feedback_arrays(torch.tensor([0, 4, 2]), scores, 5, "Owner")
    assert idx.dtype == np.int64 and val.dtype == np.float64
    assert val.tolist() == scores.double().tolist()
    idx2, val2 = base.feedback_arrays(torch.tensor([0, 4, 2]), scores, 5, "Owner")  # the schemes' path
    assert np.array_equal(idx, idx2) and np.array_equal(val, val2)


@pytest.mark.parametrize("dtype", INTS)
def test_every_integer_index_dtype_is_accepted(dtype):
    idx, _ = feedback_arrays(torch.tensor([0, 4, 2], dtype=dtype), torch.ones(3), 5, "Owner")
    assert idx.tolist() == [0, 4, 2] and idx.dtype == np.int64


def test_nonfinite_dropped_with_warning_negative_is_an_error():
    with pytest.warns(RuntimeWarning, match="skipped 2 NaN or infinite"):
        idx, val = feedback_arrays([0, 1, 2], [1.0, float("nan"), float("inf")], 3, "Owner")
    assert idx.tolist() == [0] and val.tolist() == [1.0]
    with pytest.raises(ValueError, match="negative"):
        feedback_arrays([0, 1], [1.0, -0.5], 3, "Owner")
    with pytest.raises(ValueError, match="negative"):
        feedback_arrays([0, 1], [1.0, float("-inf")], 3, "Owner")
    with pytest.raises(ValueError, match="lengths must match"):
        feedback_arrays([0, 1], [1.0], 3, "Owner")
    with pytest.raises(IndexError, match="index -1 outside"):
        feedback_arrays([0, -1], [1.0, 1.0], 3, "Owner")
    with pytest.raises(IndexError, match="index 3 outside"):
        feedback_arrays([3], [1.0], 3, "Owner")
    with pytest.raises(ValueError, match="overflow"):
        feedback_arrays([0], [10.0], 3, "Owner", max_score=5.0)
    with pytest.raises(TypeError, match="Tensor, array or list"):
        feedback_arrays("0", [1.0], 3, "Owner")
    with pytest.raises(TypeError, match="real"):
        feedback_arrays([0], torch.tensor([True]), 3, "Owner")


def test_result_does_not_alias_the_callers_tensors():
    idx, val = torch.tensor([0, 1]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    i, v = feedback_arrays(idx, val, 2, "Owner")
    idx[0], val[0] = 1, 9.0
    assert i.tolist() == [0, 1] and v.tolist() == [1.0, 2.0]


def test_table_sampler_update_uses_the_rules():
    s = TableSampler(10, 2, seed=0)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[5] = True
    with pytest.raises(TypeError, match="TableSampler.update.*integer"):
        s.update(mask, torch.ones(10))
    assert s.state_dict()["visited"].sum() == 0  # nothing written
    s.update(torch.tensor([5]), torch.tensor([2.0], dtype=torch.float16))
    assert float(s.scores()[5]) == 2.0


@given(
    n=st.integers(1, 50),
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
)
@example(n=1, data=None, dtype=torch.bfloat16)
def test_conversion_property(n, data, dtype):
    """For any integer indices and scores: output == reference, or the documented error."""
    if data is None:  # the pinned example: one index, a NaN and a normal score
        raw_idx, raw_val = [0, 0], [float("nan"), 2.0]
    else:
        k = data.draw(st.integers(0, 20))
        raw_idx = data.draw(st.lists(st.integers(-3, n + 3), min_size=k, max_size=k))
        raw_val = data.draw(
            st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), min_size=k, max_size=k)
        )
    idx_t = torch.tensor(raw_idx, dtype=torch.int64)
    val_t = torch.tensor(raw_val, dtype=torch.float64).to(dtype)
    ref = val_t.double().numpy()
    out_of_range = [i for i in raw_idx if not 0 <= i < n]
    negative = bool((ref < 0).any())
    nonfinite = int((~np.isfinite(ref)).sum()) - int((ref == -np.inf).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idx, val = feedback_arrays(idx_t, val_t, n, "Owner")
        except IndexError:
            assert out_of_range
            return
        except ValueError:
            assert negative and not out_of_range
            return
    assert not out_of_range and not negative
    keep = np.isfinite(ref)
    assert idx.tolist() == np.asarray(raw_idx, dtype=np.int64)[keep].tolist()
    assert np.array_equal(val, ref[keep])
    assert val.dtype == np.float64 and idx.dtype == np.int64
    assert (len(caught) == 1) == (nonfinite > 0)
