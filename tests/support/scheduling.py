"""pytest plugin: the suite on several processes (pytest-xdist, ``-n N --dist loadfile``, as
scripts/test.sh runs it).

- Each worker takes its share of the CPU cores for torch's intra-op threads, so that two workers on
  two cores do not fight over four threads.
- Test files are handed out whole (``loadfile``: a module's model fixtures and servers are built
  once) and the longest first: a worker that finishes early then takes the short files, and the
  run ends when the longest file does, not a long file started last. :data:`LONGEST_FIRST` is the
  order measured by ``--durations`` on the 2-core machine (whole-file seconds, most first); files
  not listed follow in their collection order. Without xdist the order only changes which file runs
  first.
"""
from __future__ import annotations

import os

#: test files by measured whole-file time, longest first (seconds of one 2-worker run, 1 thread each)
LONGEST_FIRST = (
    "test_testbed.py",                 # 645 s
    "test_workflows.py",               # 380 s
    "test_sdxl.py",                    # 344 s
    "test_nodes_restoration.py",       # 328 s
    "test_frontend.py",                # 279 s
    "test_frontend_newest.py",         # about 250 s (alone: 437 s beside another browser run and a bench)
    "test_fresh_machine.py",           # 230 s
    "test_quantized.py",               # 220 s (measured on 1 process, 2 threads: 185 s)
    "test_flow.py",                    # 158 s
    "test_nodes_inversion.py",         # 149 s
    "test_nodes_editing.py",           # 145 s
    "test_nodes_decoder_inversion.py", # 200 s (141 s before the decoder_memory test)
    "test_core_decoder_inversion.py",  # 118 s
    "test_nodes_comfy.py",             # 73 s
    "test_headless_batch.py",          # 57 s
)


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def _rank(item) -> int:
    name = os.path.basename(str(item.fspath))
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # stable: within a file, and among unlisted files, the collection order stays
