"""Test setup: Triton runs in interpreter mode on CPU tensors when no CUDA device is present.

TRITON_INTERPRET must be set before triton is imported (older triton reads it when a kernel is
decorated), so this happens here, before the package is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sara_kernels  # noqa: E402
from sara_kernels import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """Every backend that can run on ``device`` here (reference always)."""
    found = ["reference"]
    if _backend.native_available(device):
        found.append(device)
    if _backend.triton_available(device):
        found.append("triton")
    return found


DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = sara_kernels.backends()
    return [
        f"sara_kernels backends: {info['available']}",
        f"device/backend pairs under test: {DEVICE_BACKENDS}",
    ]
