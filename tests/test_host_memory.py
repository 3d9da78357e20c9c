"""keep_freed_memory: on CPU, a training step's activations stop costing page faults once the heap has grown."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# Six training steps of a small convolution net on 512 × 352 inputs (46 MB activations, above glibc's
# 32 MB mmap ceiling): the minor page faults of the last steps tell whether freed activations went back
# to the kernel (and were faulted in, zeroed, again) or were reused from the heap.
_STEPS = """
import json, resource, sys, torch
from dist_cardio.host_memory import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
x = torch.randn(8, 3, 352, 512)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _run(device: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _STEPS, device], env={**clean, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_run_reuses_freed_blocks_instead_of_faulting_them_in_again():
    kept, default = _run("cpu"), _run("cuda")  # "cuda": the call leaves glibc's defaults
    assert kept["applied"] and not default["applied"]
    activations = 4 * 8 * 8 * 352 * 512 / 4096  # pages of one 8-channel activation
    assert min(default["faults"][3:]) > 2 * activations  # unmapped on free, faulted (and zeroed) in again
    # The heap still grows now and then (freed blocks do not always fit the next ones), but mostly reuses.
    assert sum(kept["faults"][1:]) < 0.2 * sum(default["faults"][1:])


def test_a_users_own_glibc_setting_wins():
    mine = _run("cpu", MALLOC_MMAP_MAX_="65536")
    assert not mine["applied"]
    assert min(mine["faults"][3:]) > 2 * 4 * 8 * 8 * 352 * 512 / 4096
