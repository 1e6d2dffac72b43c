"""The record sampler with its state on the model's device, run here on CPU tensors (the same torch
code as on CUDA): its records must be the host sampler's, its stats equal up to float32 summation order."""

import numpy as np
import pytest
import torch

from neuron_assets.method.records import RecordSampler
from neuron_assets.stages.device_records import DeviceRecordSampler

N, T = 37, 12
# a small maxima reservoir: once full, a batch often draws one slot twice for a unit (the later window wins)
OPTIONS = {"n_top": 20, "n_random": 15, "quantile_pool": 16, "n_maxima": 4, "seed": 5}


def batches(seed: int = 0):
    """Sparse activations with ties: unit 3 is constant, unit 4 takes one of two values per window;
    batch sizes vary (1 window, and more than the top-k holds at once)."""
    rng = np.random.default_rng(seed)
    start = 0
    for size in (1, 7, 25, 3, 7, 7, 16, 2, 9):
        acts = rng.standard_normal((size, T, N)).astype(np.float32)
        acts[rng.random(acts.shape) < 0.4] = 0
        acts[:, :, 3] = 1.0
        acts[:, :, 4] = rng.integers(0, 2, size=(size, 1)).astype(np.float32)
        yield acts, np.arange(start, start + size)
        start += size


def test_records_equal_the_host_samplers_and_stats_agree():
    host, device = RecordSampler(N, T, **OPTIONS), DeviceRecordSampler(N, T, device="cpu", **OPTIONS)
    for acts, seq_ids in batches():
        host.update(acts, seq_ids)
        device.update(torch.from_numpy(acts), seq_ids)
    (host_records, host_stats), (device_records, device_stats) = host.finalize(), device.finalize()
    assert host_records.keys() == device_records.keys()
    for column in host_records:
        np.testing.assert_array_equal(device_records[column], host_records[column], err_msg=column)
    assert set(host_records["kind"]) >= {"top", "random"} and len(host_records["unit"]) > N * 35
    for column, values in host_stats.items():
        np.testing.assert_allclose(np.asarray(device_stats[column], float), np.asarray(values, float), rtol=1e-5,
                                   atol=1e-6, equal_nan=True, err_msg=column)
    assert device_stats["variance"][3] == 0.0 and np.isnan(device_stats["kurtosis"][3])  # the constant unit


def test_finalize_leaves_the_state_on_the_device_and_unchanged():
    sampler = DeviceRecordSampler(N, T, device="cpu", **OPTIONS)
    for acts, seq_ids in batches():
        sampler.update(torch.from_numpy(acts), seq_ids)
    first = sampler.finalize()[0]
    assert isinstance(sampler.top_acts, torch.Tensor)
    second = sampler.finalize()[0]
    for column in first:
        np.testing.assert_array_equal(first[column], second[column])


def test_update_names_the_expected_shape():
    sampler = DeviceRecordSampler(N, T, device="cpu", **OPTIONS)
    with pytest.raises(ValueError, match=rf"expected acts \[B, {T}, {N}\]"):
        sampler.update(torch.zeros(2, T, N + 1), np.arange(2))
