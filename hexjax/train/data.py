"""Token windows from a flat token file, read by memory map.

A token file is a 1-D ``.npy`` array, or a raw ``.bin`` of little-endian
integers (``dtype``, uint16 by default).  It is cut into windows of
``seq_len + 1`` tokens starting every ``seq_len`` tokens (consecutive windows
share one token, so every token is a target once per epoch).  Each epoch
visits the windows in a permutation drawn from ``(seed, epoch)``; a position
(windows consumed so far) is all the state there is, so resuming is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hexjax.errors import ConfigError


def open_tokens(path, dtype: str = "uint16") -> np.ndarray:
    """The token file as a read-only 1-D memory map."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such token file (give a 1-D .npy array or a raw .bin of token ids)")
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
    else:
        try:
            arr = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read as {dtype} tokens ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{path}: expected a 1-D array of integer token ids, got shape {arr.shape} {arr.dtype}")
    return arr


class TokenWindows:
    """Shuffled ``[batch, seq_len + 1]`` windows of a token array (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be at least 1, got {seq_len}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = max((len(tokens) - 1) // seq_len, 0)
        if self.num_windows == 0:
            raise ConfigError(f"the token file has {len(tokens)} tokens, fewer than one window of "
                              f"seq_len + 1 = {seq_len + 1}")
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._perm[epoch]

    def batch(self, position: int, batch: int) -> np.ndarray:
        """Windows ``position .. position + batch - 1`` of the shuffled stream, as int32 [batch, seq_len + 1]."""
        out = np.empty((batch, self.seq_len + 1), np.int32)
        for i in range(batch):
            epoch, j = divmod(position + i, self.num_windows)
            start = int(self._order(epoch)[j]) * self.seq_len
            out[i] = self.tokens[start:start + self.seq_len + 1]
        return out
