"""reason.train.keep_freed_blocks: a large CPU temporary freed and allocated again is not page-faulted in anew.

Counted, not timed: minor page faults (getrusage ru_minflt) of four 100 MB tensors, each
freed at once, after four like them (a training step's steady state: the first reuses
may land beside a freed block, an aligned request being a little larger than the block),
in a fresh interpreter each, with and without the setting.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from reason.train import keep_freed_blocks
applied = keep_freed_blocks(torch.device("cpu")) if sys.argv[1] == "on" else False
for _ in range(4):
    torch.ones(25_000_000)  # 100 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(25_000_000)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_large_block_is_reused_without_page_faults():
    off, on = _faults("off"), _faults("on")
    assert on["applied"] and not off["applied"]
    # 4 x 100 MB mapped afresh: ~97,700 faults in 4 KiB pages (fewer where huge pages are always on)
    assert on["faults"] < min(1_000, off["faults"])


def test_it_is_a_no_op_off_the_cpu():
    import torch

    from reason.train import keep_freed_blocks

    assert keep_freed_blocks(torch.device("meta")) is False
