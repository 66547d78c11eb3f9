"""A replay of PyTorch's CUDA caching allocator, for load paths whose transients leave memory reserved.

Pure Python (the planning path imports no torch). The rules are those of
``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x, default settings: no ``max_split_size_mb``, no
expandable segments, no garbage-collection threshold):

* a request is rounded up to a multiple of 512 B (``kMinBlockSize``); requests of at most 1 MiB
  (``kSmallSize``) are served from the small pool, the rest from the large pool;
* a free block is found best-fit (the smallest cached block of the pool that is large enough);
* without one, a new segment is ``cudaMalloc``-ed: 2 MiB (``kSmallBuffer``) for small requests, 20 MiB
  (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), else the request rounded up to 2 MiB
  (``kRoundLarge``);
* a block larger than the request is split when the remainder is at least 512 B (small pool) or more
  than 1 MiB (large pool); the request takes the front, the remainder stays cached;
* a freed block merges with free neighbours of its segment; nothing is returned to the driver
  (no ``empty_cache``), so the reserved total only grows.

Every size is in bytes. ``reserved`` is what ``torch.cuda.memory_reserved()`` would print.
"""

from __future__ import annotations

import bisect

MIB = 2**20
MIN_BLOCK = 512
SMALL_SIZE = MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


def round_size(nbytes: int) -> int:
    """The request as the allocator books it: at least 512 B, a multiple of 512 B."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-int(nbytes) // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The ``cudaMalloc`` size of a new segment for a rounded request."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """Segments, blocks and the two free pools; ``malloc`` returns a handle for ``free``."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small? -> sorted (size, addr)
        self._blocks: dict[int, list] = {}  # addr -> [size, segment start, allocated, small]
        self._ends: dict[int, int] = {}     # end address -> start address, for merging with the previous block
        self._top = 0
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0

    def _put(self, addr: int, size: int, seg: int, small: bool, used: bool) -> None:
        self._blocks[addr] = [size, seg, used, small]
        self._ends[addr + size] = addr
        if not used:
            bisect.insort(self._pools[small], (size, addr))

    def _drop(self, addr: int) -> list:
        b = self._blocks.pop(addr)
        del self._ends[addr + b[0]]
        if not b[2]:
            self._pools[b[3]].remove((b[0], addr))
        return b

    def malloc(self, nbytes: int) -> int:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        k = bisect.bisect_left(pool, (size, -1))
        if k < len(pool):
            bsize, addr = pool[k]
            seg = self._drop(addr)[1]
        else:
            bsize = segment_size(size)
            addr = seg = self._top
            self._top += bsize
            self.reserved += bsize
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rest = bsize - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            self._put(addr + size, rest, seg, small, False)
            bsize = size
        self._put(addr, bsize, seg, small, True)
        self.allocated += bsize
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return addr

    def free(self, addr: int) -> None:
        size, seg, _, small = self._drop(addr)
        self.allocated -= size
        nxt = self._blocks.get(addr + size)
        if nxt is not None and not nxt[2] and nxt[1] == seg:
            size += self._drop(addr + size)[0]
        prev = self._ends.get(addr)
        if prev is not None and not self._blocks[prev][2] and self._blocks[prev][1] == seg:
            size += self._drop(prev)[0]
            addr = prev
        self._put(addr, size, seg, small, False)
