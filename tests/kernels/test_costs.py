"""kernels/_triton_costs.py: the byte and FLOP formulas benchmarks use (kernels/README.md)."""


def test_cost_formulas_for_the_benchmark_shapes():
    """The formulas kernels/README.md gives, at the benchmark shapes (hand-computed here)."""
    from kernels.costs import attention_bytes, attention_flops, group_norm_bytes

    numel = 256 * 128 * 32 * 32
    assert group_norm_bytes((256, 128, 32, 32), 32, 2, 4) == 2 * numel * 2 + 2 * 128 * 4 + 2 * 256 * 128 * 2 \
        + 2 * 256 * 32 * 4
    assert group_norm_bytes((256, 128, 32, 32), 32, 2, 4, film=False, backward=True) == \
        3 * numel * 2 + 4 * 128 * 4 + 2 * 256 * 32 * 4 + 4 * 256 * 128 * 4
    assert attention_flops(8, 4, 256, 64) == 4 * 8 * 4 * 256 * 256 * 64
    assert attention_flops(8, 4, 256, 64, backward=True) == 2.5 * attention_flops(8, 4, 256, 64)
    assert attention_flops(8, 4, 256, 64, backward=True, executed=True) == 14 * 8 * 4 * 256 * 256 * 64
    assert attention_bytes(8, 4, 256, 64, 2) == 4 * 8 * 4 * 256 * 64 * 2 + 8 * 4 * 256 * 4
