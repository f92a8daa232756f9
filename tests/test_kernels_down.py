"""tools/kernels_down.py decides from each library's verbose line whether forcing the kernels down took effect:
on an Intel host all three name their kernels, on an AMD host MKL names none (the CI failure this guards)."""

import pytest
from helpers import load_script

MKL_AMD = ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) "
           "Architecture processors, Lnx 2.60GHz lp64 gnu_thread")  # as printed on an AMD EPYC, forced or not
MKL_INTEL_512 = ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) "
                 "Advanced Vector Extensions 512 (Intel(R) AVX-512) enabled processors, Lnx 2.10GHz lp64 gnu_thread")
MKL_INTEL_AVX2 = MKL_INTEL_512.replace("Advanced Vector Extensions 512 (Intel(R) AVX-512)",
                                       "Advanced Vector Extensions 2 (Intel(R) AVX2)")
ONEDNN_512 = "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support"
ONEDNN_AVX2 = "onednn_verbose,v1,info,cpu,isa:Intel AVX2"


@pytest.fixture(scope="module")
def kernels_down():
    return load_script("tools/kernels_down.py")


def test_intel_host_checks_all_three_libraries(kernels_down):
    host = {"aten": "AVX512", "onednn": ONEDNN_512, "mkl": MKL_INTEL_512}
    forced = {"aten": "AVX2", "onednn": ONEDNN_AVX2, "mkl": MKL_INTEL_AVX2}
    wanted = kernels_down.LEVEL_BELOW["AVX512"]
    assert kernels_down.check(host, forced, wanted) == ([], ["aten", "onednn", "mkl"], [])
    wrong, _, _ = kernels_down.check(host, {**forced, "mkl": MKL_INTEL_512}, wanted)  # MKL ignored the switch
    assert len(wrong) == 1 and wrong[0].startswith("mkl reports")


def test_amd_host_leaves_mkl_unverified_and_still_checks_aten_and_onednn(kernels_down):
    host = {"aten": "AVX512", "onednn": ONEDNN_512, "mkl": MKL_AMD}
    wanted = kernels_down.LEVEL_BELOW["AVX512"]
    forced = {"aten": "AVX2", "onednn": ONEDNN_AVX2, "mkl": MKL_AMD}
    assert kernels_down.check(host, forced, wanted) == ([], ["aten", "onednn"], ["mkl"])
    wrong, _, _ = kernels_down.check(host, {"aten": "AVX2", "onednn": ONEDNN_512, "mkl": MKL_AMD}, wanted)
    assert [w.split()[0] for w in wrong] == ["onednn"]


def test_a_library_this_torch_does_not_use_is_skipped(kernels_down):
    host = {"aten": "AVX2", "onednn": "", "mkl": ""}
    wanted = kernels_down.LEVEL_BELOW["AVX2"]
    assert kernels_down.check(host, {"aten": "DEFAULT", "onednn": "", "mkl": ""}, wanted) == ([], ["aten"], [])
    wrong, _, _ = kernels_down.check(host, {"aten": "AVX2", "onednn": "", "mkl": ""}, wanted)
    assert [w.split()[0] for w in wrong] == ["aten"]
