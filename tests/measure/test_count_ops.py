"""benchmarks/count_ops.py counts the operators of a batch-1 eval forward (the launches a GPU would make). Checked
here: the scan counts as one op per call, and what the inference caches remove is really gone (a deterministic
count, not a timing)."""
from benchmark_scripts import load_benchmark

def test_scan_is_one_op_and_the_caches_remove_the_parameter_work():
    count = load_benchmark("count_ops").count
    separate = count("msf_mamba_plus", "tiny", False, 4, 32)
    grouped = count("msf_mamba_plus", "tiny", True, 4, 32)
    depth = 24
    assert separate["msf_scale::selective_scan"] == 2 * depth and grouped["msf_scale::selective_scan"] == depth
    # grouped with the caches: no parameter concatenation, stack or exp per block (one cat: the input and its flip)
    assert grouped["aten::stack"] == 0 and grouped["aten::exp"] == 0
    assert grouped["aten::cat"] <= 3 * depth   # the input's, the ASWM's and the class token's, per fusion block
    # the CFD fold (sums and subtractions of the kernels) is not redone per forward
    assert grouped["aten::sub"] == 0 and separate["aten::sub"] == 0
    assert separate["aten::exp"] == 0   # each direction's A = -exp(A_log) is cached too
    assert sum(grouped.values()) < sum(separate.values())


def test_the_mixers_feed_the_scan_without_transposing_copies():
    """The projections run transposed (W @ x), so dt, B, C and delta reach the scan time-innermost: no copy in the
    scan's CUDA path (aten::contiguous) and no reshape that copies, on either path."""
    count = load_benchmark("count_ops").count
    for grouped in (False, True):
        ops = count("videomamba", "tiny", grouped, 4, 32)
        copies = {k: v for k, v in ops.items() if k == "aten::contiguous" or k.endswith("(copy)")}
        assert copies == {}, (grouped, copies)
