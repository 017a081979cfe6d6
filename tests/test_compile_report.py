"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 on this machine (no GPU needed)."""
import pytest
import torch

from moa.kernels.multi_lora.compile import compile_report, format_report

pytestmark = pytest.mark.slow  # compiles ten kernels (a child process when the interpreter is on)


@pytest.fixture(scope="module")
def report():
    return compile_report(targets=("sm_80", "sm_90"), dtypes=(torch.float16,), ranks=(16,))


def test_every_kernel_compiles_without_spills(report):
    kernels = {r["kernel"] for r in report}
    assert kernels == {"sgmv_shrink", "sgmv_expand", "segment_outer", "bgmv_shrink", "bgmv_expand"}
    assert {r["target"] for r in report} == {"sm_80", "sm_90"}
    for r in report:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, format_report([r])


def test_large_token_path_uses_tensor_cores(report):
    for r in report:
        if r["path"] == "sgmv" or r["kernel"] == "segment_outer":
            assert r["mma_ptx"] in ("mma.sync", "wgmma") and r["mma_sass"], format_report([r])
    hopper = {r["kernel"]: r["mma_ptx"] for r in report if r["target"] == "sm_90"}
    assert hopper["sgmv_shrink"] == "wgmma" and hopper["sgmv_expand"] == "wgmma"
