"""Activations as a map-style torch Dataset: any row by its index, for samplers (a probe's train/test split,
``DistributedSampler``), from a store or through a server."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from actstore.torch.sources import LocalSource, RemoteSource


class ActivationRows(Dataset):
    """Row ``i`` of a run as a dict of tensors, as ``Activations`` yields them. A DataLoader fetches a batch's
    rows in one read (``__getitems__``; through a server, one call): neighbouring rows share their chunks' reads."""

    def __init__(
        self, source: LocalSource | RemoteSource, one_layer: bool, dtype: torch.dtype | None = torch.float32
    ) -> None:
        self.source, self.one_layer, self.dtype = source, one_layer, dtype
        self.categories = source.pinned.categories

    def __len__(self) -> int:
        return self.source.pinned.n_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        rows = np.asarray(indices, dtype=np.int64)
        if not len(rows):
            return []
        n = len(self)
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} outside the {n:,} rows of {self.source.description}")
        read = self.source.read_rows(rows % n if n else rows)
        states = torch.from_numpy(read.states[0] if self.one_layer else read.states.transpose(1, 0, 2).copy())
        states = states if self.dtype is None else states.to(self.dtype)
        coords = {name: torch.from_numpy(values) for name, values in read.coords.items()}
        return [{"states": states[i], **{name: values[i] for name, values in coords.items()}} for i in range(len(rows))]
