"""Two ways to measure memory, shared by the tests and bench/.

- :class:`Peak`: peak resident-memory growth (MB) of this process while a block runs, sampled from
  /proc every millisecond (CUDA: the peak allocated). Run it in a fresh process started with
  ``MALLOC_MMAP_THRESHOLD_`` set (:data:`FRESH_ENV`) so that freed tensors go back to the system
  and the resident size follows what is alive, and run the measured work once before measuring it
  (first calls build oneDNN primitives and caches that stay).
- :class:`SavedTensors`: the bytes autograd keeps alive for backward passes, exactly: every saved
  tensor is counted when autograd packs it and uncounted when its graph is freed. Deterministic,
  so tests can assert on it; it cannot see inside ``torch.utils.checkpoint`` (which packs with its
  own hooks), so measure checkpointed code with :class:`Peak`.
"""
from __future__ import annotations

import os
import threading
import time

import torch

# glibc: allocations of 64 KiB and more are mmap'ed and unmapped when freed
FRESH_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


class Peak:
    """Peak resident-memory growth (MB) while the block runs (CUDA: peak allocated)."""

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self.stop = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self._rss())
        self.mb = round(self.peak - self.base, 1)
        if torch.cuda.is_available():
            self.mb = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)


class _Held:
    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner._release(self.key)


class SavedTensors:
    """Live and peak bytes of the storages autograd keeps for backward passes inside the block:
    each storage counted once however many views of it are saved; storages of ``exclude``
    (e.g. a model's parameters, which exist anyway) not counted."""

    def __init__(self, exclude=()):
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self._skip:
            return _Held(t, None, self)
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [0, t.untyped_storage().nbytes()]
            self.live += ref[1]
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Held(t, key, self)

    def _release(self, key):
        ref = self._refs.get(key) if key is not None else None
        if ref is not None:
            ref[0] -= 1
            if ref[0] == 0:
                self.live -= ref[1]
                del self._refs[key]

    @staticmethod
    def _unpack(held):
        return held.tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
