import importlib.util
import os

import pytest
import torch

# The triton fusion backend's tests run under Triton's interpreter on a machine without CUDA; Triton decides when
# triton.language is first imported (its own helpers are decorated then), so the switch is set before any test module
# is collected.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mamba_ssm_kernel():
    """mamba-ssm's scan on a CUDA machine. Missing there is a failure, not a skip: a GPU run that silently skips
    the kernel's tests would pass without checking the code path the GPU jobs use."""
    from msf_scale.ops.scan import _mamba_ssm_scan

    fn = _mamba_ssm_scan()
    if fn is None:
        pytest.fail("mamba-ssm does not import on this CUDA machine: pip install 'msf_scale[cuda]' "
                    "(or mamba-ssm built for this torch/CUDA)", pytrace=False)
    return fn
