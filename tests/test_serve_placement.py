"""Instance placement of ``toprovar serve`` (issue 20, CPU part): one Triton model instance per visible GPU,
none sharing a GPU unless asked, as pure functions of a (faked) device count and CUDA_VISIBLE_DEVICES; the
device an instance takes from Triton's arguments. The instance reporting its device from inside a running
server: tests/test_serve.py (CPU instance; GPU instances need a GPU machine)."""
from __future__ import annotations

import pytest

from toprovar.serving.placement import instance_device, instance_groups, to_pbtxt, visible_gpus


def test_visible_gpus_follows_cuda_visible_devices():
    assert visible_gpus(4, {}) == 4
    assert visible_gpus(4, {"CUDA_VISIBLE_DEVICES": "1,3"}) == 2
    assert visible_gpus(8, {"CUDA_VISIBLE_DEVICES": "0,1,-1,2"}) == 2  # CUDA stops at an invalid entry
    assert visible_gpus(4, {"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus(4, {"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 1
    assert visible_gpus(0, {}) == 0


def test_one_instance_per_gpu_none_shared_unless_asked():
    assert instance_groups(0) == [{"kind": "KIND_CPU", "count": 1}]
    assert instance_groups(4) == [{"kind": "KIND_GPU", "count": 1, "gpus": [0, 1, 2, 3]}]
    assert instance_groups(4, 2, [3, 1]) == [{"kind": "KIND_GPU", "count": 2, "gpus": [1, 3]}]
    with pytest.raises(ValueError, match=r"--gpus: \[2\] not among the 2 visible GPUs"):
        instance_groups(2, 1, [0, 2])
    with pytest.raises(ValueError, match="--instances-per-gpu: must be >= 1"):
        instance_groups(2, 0)
    text = to_pbtxt(instance_groups(visible_gpus(8, {"CUDA_VISIBLE_DEVICES": "4,5"})))
    assert text == "instance_group [\n  { kind: KIND_GPU, count: 1, gpus: [0, 1] }\n]\n"
    # what an instance makes of Triton's model_instance_kind / model_instance_device_id
    assert instance_device("GPU", "1") == "cuda:1" and instance_device("CPU", 0) == "cpu"
