"""`RecordSampler` with its state on the subject model's device (CUDA), fed the activations where the
forward pass left them: per batch only the reservoirs' slot writes (index rows, fewer as the
reservoirs fill) go to the device, and nothing comes back until `finalize`. Copying every layer's
[B, T, N] activations to the host and sampling them with numpy would make the CPU the bottleneck
of a GPU run: 48 layers of 6,400 neurons is 1.2 GB per batch of 16 windows of 64 tokens.

The records equal the host sampler's (the same window maxima, the same reservoir draws, ties to the
earlier window); the moments differ only by float32 summation order."""

import copy

import numpy as np
import torch

from neuron_assets.method.records import RecordSampler, batch_moments, merge_moments, reservoir_writes

# RecordSampler's arrays that `update` changes: tensors here, numpy arrays again for `finalize`
STATE = ("top_max", "top_seq", "top_acts", "pool_seq", "pool_acts", "maxima", "mean", "m2", "m3", "m4", "max",
         "min", "n_active")


class DeviceRecordSampler(RecordSampler):
    """The same records and stats as `RecordSampler`, its state as tensors on `device`.

    `update` takes the activations as a float32 tensor [B, T, N] on that device. The top-k is
    re-sorted on every batch (max desc, seq_id asc) instead of filling unordered slots: finding the
    windows that enter would need their number on the host, a wait for the device every batch."""

    def __init__(self, *args, device: torch.device | str, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        for name in STATE:
            setattr(self, name, torch.as_tensor(getattr(self, name), device=self.device))

    @torch.inference_mode()
    def update(self, acts: torch.Tensor, seq_ids: np.ndarray) -> None:
        """Add a batch: acts float32 [B, T, N] on the sampler's device, seq_ids int [B]."""
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        self._check_batch(tuple(acts.shape), seq_ids.shape)
        if len(acts) == 0:
            return
        acts = acts.to(self.device, torch.float32)
        seq = torch.as_tensor(seq_ids, device=self.device)
        by_unit = acts.permute(2, 0, 1)  # [N, B, T]
        window_max = by_unit.amax(dim=2)  # [N, B]
        self._update_top(by_unit, seq, window_max)
        n_seen = self.n_windows + np.arange(len(acts))
        b, units, slots = self._slot_writes(self.pool_rng, n_seen, self.quantile_pool)
        self.pool_seq[units, slots] = seq[b]
        self.pool_acts[units, slots] = by_unit[units, b]
        b, units, slots = self._slot_writes(self.maxima_rng, n_seen, self.n_maxima)
        self.maxima[units, slots] = window_max[units, b]
        x = acts.reshape(-1, self.n_neurons)
        self._update_moments(x)
        self.n_active += (x > 0).sum(dim=0)
        self.max = torch.maximum(self.max, window_max.amax(dim=1).double())
        self.n_windows += len(acts)

    def _slot_writes(self, rng, n_seen: np.ndarray, size: int) -> torch.Tensor:
        """A batch's reservoir writes (`reservoir_writes`) as one device tensor of rows (window,
        unit, slot), one per slot written: where the batch draws a slot twice, the later window
        wins, as when the writes are applied one after another."""
        windows, units, slots = [], [], []
        for b, written, slot in reservoir_writes(rng, n_seen, size, self.n_neurons):
            written = np.arange(self.n_neurons) if isinstance(written, slice) else written
            windows.append(np.full(len(written), b))
            units.append(written)
            slots.append(np.broadcast_to(slot, written.shape))
        windows, units, slots = (np.concatenate(a) for a in (windows, units, slots))
        _, last = np.unique((units * size + slots)[::-1], return_index=True)
        keep = len(units) - 1 - last
        return torch.as_tensor(np.stack([windows[keep], units[keep], slots[keep]]), device=self.device)

    def _update_top(self, by_unit, seq, window_max):
        k, (N, B, T) = self.n_top, by_unit.shape
        cand_max = torch.cat([self.top_max, window_max], dim=1)  # [N, k + B]
        cand_seq = torch.cat([self.top_seq, seq.expand(N, B)], dim=1)
        by_seq = torch.argsort(cand_seq, dim=1, stable=True)
        by_max = torch.argsort(cand_max.gather(1, by_seq), dim=1, descending=True, stable=True)
        best = by_seq.gather(1, by_max)[:, :k]  # max desc, seq_id asc
        self.top_max = cand_max.gather(1, best)
        self.top_seq = cand_seq.gather(1, best)
        self.top_acts = torch.cat([self.top_acts, by_unit], dim=1).gather(1, best[:, :, None].expand(N, k, T))

    def _update_moments(self, x):
        nb = x.shape[0]
        c = x.sum(dim=0) / nb
        d = x - c
        e = d.sum(dim=0).double() / nb
        d2 = d * d
        s2, s3, s4 = (t.sum(dim=0).double() for t in (d2, d2 * d, d2 * d2))
        batch = batch_moments(nb, c.double(), e, s2, s3, s4)
        na = float(self.n_windows * self.seq_len)
        self.mean, self.m2, self.m3, self.m4 = merge_moments(na, (self.mean, self.m2, self.m3, self.m4), nb, batch)
        self.min = torch.minimum(self.min, x.amin(dim=0).double())

    def finalize(self) -> tuple[dict, dict]:
        """`RecordSampler.finalize` on a host copy of the state. Does not change state."""
        host = copy.copy(self)
        for name in STATE:
            setattr(host, name, getattr(self, name).cpu().numpy())
        return RecordSampler.finalize(host)
