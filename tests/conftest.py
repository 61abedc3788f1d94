import pytest
import torch


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
