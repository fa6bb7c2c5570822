"""dino_d2.measure.limits: the plumbing of the honest limits (which library, which dtype, which
rate counts), not the machine's speed."""

import pytest
import torch

from dino_d2.measure import limits

__all__ = []


def test_every_library_multiplies_correctly_in_its_dtype():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 8, generator=generator), torch.rand(8, 8, generator=generator)
    for name in limits.gemm_libraries("cpu"):
        product = limits.GEMM_LIBRARIES[name](a, b)
        torch.testing.assert_close(product, a @ b.T, rtol=1e-5, atol=1e-5)
    # bfloat16 in every library that this CPU computes it in (oneDNN needs AVX-512 for it).
    a16, b16 = a.bfloat16(), b.bfloat16()
    for name in limits.gemm_libraries("cpu", torch.bfloat16):
        product = limits.GEMM_LIBRARIES[name](a16, b16).float()
        torch.testing.assert_close(product, a16.float() @ b16.float().T, rtol=2e-2, atol=2e-2)


def test_onednn_is_measured_only_in_the_precisions_it_computes_here(monkeypatch):
    """A CPU without AVX-512 has no oneDNN bfloat16 (its inner product refuses it): the
    bfloat16 rate is the BLAS's alone there, flagged as emulated."""
    from dino_d2.layers import fast_path

    monkeypatch.setattr(limits, "_onednn_available", lambda: True)
    for available in (True, False):
        monkeypatch.setattr(fast_path, "onednn_bfloat16_available", lambda: available)
        expected = ("blas", "onednn") if available else ("blas",)
        assert limits.gemm_libraries("cpu", torch.bfloat16) == expected
        assert limits.gemm_libraries("cpu", torch.float32) == ("blas", "onednn")
    assert limits.gemm_libraries("cuda", torch.bfloat16) == ("blas",)
    assert limits.gemm_libraries("cpu", torch.float16) == ("blas",)
    from dino_d2.engine import precision

    for native in (True, False):
        monkeypatch.setattr(precision, "bfloat16_is_native", lambda device=None: native)
        assert limits.is_native(torch.bfloat16, "cpu") is native
        assert limits.is_native(torch.float32, "cpu")


def test_rates_are_measured_in_the_asked_dtype_and_positive(monkeypatch):
    seen = []

    def recording(library):
        def gemm(a, b):
            seen.append((library, a.dtype, b.dtype))
            return a

        return gemm

    monkeypatch.setattr(
        limits, "GEMM_LIBRARIES", {name: recording(name) for name in limits.GEMM_LIBRARIES}
    )
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        best = limits.fastest_gemm(dtype, size=16, repeats=2)
        assert set(best["rates"]) == set(limits.gemm_libraries("cpu", dtype))
        assert best["native"] == limits.is_native(dtype, "cpu")
        assert all(rate > 0 for rate in best["rates"].values())
        # One untimed and two timed products per library, all in dtype.
        assert len(seen) == 3 * len(best["rates"])
        assert {(a, b) for _, a, b in seen} == {(dtype, dtype)}


def test_the_larger_rate_sets_the_limit(monkeypatch):
    rates = {("blas", "float32"): 90.0, ("onednn", "float32"): 120.0}
    rates.update({("blas", "bfloat16"): 300.0, ("onednn", "bfloat16"): 250.0})

    def fake_rate(library, dtype, device="cpu", *, size, repeats):
        name = str(dtype).removeprefix("torch.")
        return limits.GemmRate(library, name, rates[library, name])

    monkeypatch.setattr(limits, "gemm_rate", fake_rate)
    monkeypatch.setattr(limits, "gemm_libraries", lambda device, dtype: ("blas", "onednn"))
    result = limits.model_limits(600.0)
    assert result["float32"].library == "onednn" and result["float32"].limit_s == 5.0
    assert result["bfloat16"].library == "blas" and result["bfloat16"].limit_s == 2.0
    assert result["bfloat16"].rates == {"blas": 300.0, "onednn": 250.0}
    assert result["float32"].native
    assert result["bfloat16"].native == limits.is_native(torch.bfloat16, "cpu")


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match="unknown GEMM library 'mkl'"):
        limits.gemm_rate("mkl", torch.float32)
    with pytest.raises(ValueError, match="size and repeats"):
        limits.gemm_rate("blas", torch.float32, size=0)
    with pytest.raises(ValueError, match="gmacs must be positive"):
        limits.model_limits(0.0)


def test_command_line_prints_both_precisions(capsys):
    result = limits.main(["--size", "32", "--repeats", "1"])
    assert {"float32", "bfloat16"} <= set(result)
    assert result["bfloat16"]["library"] in result["bfloat16"]["rates"]
    assert '"float32"' in capsys.readouterr().out
