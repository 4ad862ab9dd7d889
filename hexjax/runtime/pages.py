"""Page allocator for the paged KV cache of one pipeline stage.

Each stage of a replica has its own page pool (its layers' keys and values)
and its own allocator, which decides which of its pages a sequence owns.
When a stage shards its batch over ``dp`` groups, the pool is cut into
``num_shards`` equal ranges and a sequence takes pages only from the range of
the group that serves it at that stage.  The first page
of every range is reserved: block-table slots a sequence has not been given
point there, so writes of padding tokens land somewhere harmless and no read
ever looks at it (reads stop at each sequence's length).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hexjax.errors import HexjaxError


class PagesExhaustedError(HexjaxError):
    """The KV cache has fewer free pages than a request needs."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


@dataclasses.dataclass
class PageAllocator:
    """Hands out KV-cache pages to sequences as they grow and takes them back."""

    num_pages: int
    """Pages in the pool, reserved ones included (a multiple of ``num_shards``)."""
    page_size: int
    """Tokens per page."""
    num_shards: int = 1
    """Equal page ranges, one per data-parallel group of the stages."""

    def __post_init__(self):
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if self.num_shards <= 0 or self.num_pages % self.num_shards:
            raise ValueError(
                f"num_pages {self.num_pages} must be a positive multiple of num_shards {self.num_shards}")
        per_shard = self.num_pages // self.num_shards
        if per_shard < 2:
            raise ValueError(
                f"each of the {self.num_shards} page ranges needs at least 2 pages (one is reserved); "
                f"got {self.num_pages} pages in all")
        # free lists hold the lowest page first so allocation is deterministic
        self._free = [list(range(s * per_shard + per_shard - 1, s * per_shard, -1))
                      for s in range(self.num_shards)]
        self._pages: dict[object, list[int]] = {}
        self._shard_of: dict[object, int] = {}
        self._tokens: dict[object, int] = {}

    @property
    def pages_per_shard(self) -> int:
        return self.num_pages // self.num_shards

    def reserved_page(self, shard: int = 0) -> int:
        """The page unallocated block-table slots of ``shard`` point to."""
        return shard * self.pages_per_shard

    def num_free(self, shard: int | None = None) -> int:
        """Free pages in one range, or in all of them."""
        if shard is None:
            return sum(len(f) for f in self._free)
        return len(self._free[shard])

    def tokens(self, seq) -> int:
        """Tokens sequence ``seq`` has room for."""
        return self._tokens.get(seq, 0)

    def pages(self, seq) -> list[int]:
        """Pages sequence ``seq`` owns, in order."""
        return list(self._pages.get(seq, ()))

    def reserve(self, requests: dict[object, tuple[int, int]]) -> None:
        """Grow several sequences at once, all or nothing.

        ``requests`` maps a sequence id to ``(num_tokens, shard)``; each
        sequence ends up owning enough pages for ``num_tokens`` tokens.  If a
        range has too few free pages, nothing is allocated and the error says
        how many pages were needed and how many were free.
        """
        need = [0] * self.num_shards
        for seq, (num_tokens, shard) in requests.items():
            self._check_shard(seq, shard)
            have = len(self._pages.get(seq, ()))
            need[shard] += max(0, pages_for(num_tokens, self.page_size) - have)
        for shard, n in enumerate(need):
            if n > len(self._free[shard]):
                where = f" in data-parallel range {shard}" if self.num_shards > 1 else ""
                raise PagesExhaustedError(
                    f"KV cache out of pages{where}: {n} more pages of {self.page_size} tokens were needed "
                    f"but only {len(self._free[shard])} of {self.pages_per_shard - 1} are free; "
                    "serve fewer or shorter sequences at once, or give the cache more pages")
        for seq, (num_tokens, shard) in requests.items():
            pages = self._pages.setdefault(seq, [])
            self._shard_of[seq] = shard
            while len(pages) < pages_for(num_tokens, self.page_size):
                pages.append(self._free[shard].pop())
            self._tokens[seq] = max(self._tokens.get(seq, 0), num_tokens)

    def grow(self, seq, num_tokens: int, shard: int = 0) -> None:
        """Give ``seq`` room for ``num_tokens`` tokens in all."""
        self.reserve({seq: (num_tokens, shard)})

    def free(self, seq) -> None:
        """Return every page of ``seq`` to the pool."""
        if seq not in self._pages:
            raise KeyError(f"sequence {seq!r} holds no pages")
        shard = self._shard_of.pop(seq)
        self._free[shard].extend(reversed(self._pages.pop(seq)))
        self._free[shard].sort(reverse=True)
        self._tokens.pop(seq, None)

    def block_table(self, seqs, width: int, shards=None) -> np.ndarray:
        """``[len(seqs), width]`` int32 page indices; unused slots hold the reserved page.

        ``None`` in ``seqs`` is an empty (padding) row; it points at the
        reserved page of its range, ``shards[row]`` (range 0 if not given).
        """
        table = np.zeros((len(seqs), width), np.int32)
        for row, seq in enumerate(seqs):
            if seq is None:
                table[row] = self.reserved_page(shards[row] if shards is not None else 0)
                continue
            pages = self._pages.get(seq, [])
            if len(pages) > width:
                raise ValueError(f"sequence {seq!r} holds {len(pages)} pages, more than the table width {width}")
            table[row] = self.reserved_page(self._shard_of[seq])
            table[row, :len(pages)] = pages
        return table

    def _check_shard(self, seq, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        if seq in self._shard_of and self._shard_of[seq] != shard:
            raise ValueError(f"sequence {seq!r} already holds pages in range {self._shard_of[seq]}, not {shard}")
