"""The launcher's pieces that need no subprocess (the sweeps themselves: test_sweep.py)."""

from __future__ import annotations

import pytest

from pnn.sweep.slots import make_slots


def test_gpu_pool_slots_pin_one_gpu_per_job() -> None:
    slots = make_slots(["0", "1"], jobs_per_gpu=2, cpu_workers=1)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert len({s["PNN_SLOT"] for s in slots}) == 4
    cpu = make_slots([], jobs_per_gpu=1, cpu_workers=3)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in cpu] == ["", "", ""]
    with pytest.raises(ValueError, match="jobs_per_gpu must be >= 1"):
        make_slots(["0"], jobs_per_gpu=0, cpu_workers=1)
