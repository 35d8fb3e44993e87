"""The ctypes binding to ggml's quantizers: shapes, threads, references, errors."""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest

from shortquant.errors import BackendError, QuantError
from shortquant import ggml

T = gguf.GGMLQuantizationType
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((96, 512)) * rng.uniform(0.1, 3, 512)).astype(np.float32)


@pytest.fixture(scope="module")
def importance():
    return np.random.default_rng(1).gamma(0.5, 2.0, 512).astype(np.float32)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
                                   T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.TQ2_0])
def test_round_trip_through_gguf_py_dequantizer(weights, importance, qtype):
    """gguf-py's independent numpy dequantizer reads our blocks back close to the input."""
    q = ggml.quantize(weights, qtype, imatrix=importance, threads=2)
    assert q.shape == (96, ggml.row_size(qtype, 512)) and q.dtype == np.uint8
    back = gguf.quants.dequantize(q, qtype)
    assert back.shape == weights.shape
    rel = np.linalg.norm(back - weights) / np.linalg.norm(weights)
    bound = {T.TQ2_0: 0.9, T.Q2_K: 0.45, T.IQ3_XXS: 0.3, T.Q3_K: 0.3, T.IQ3_S: 0.3}.get(qtype, 0.15)
    assert rel < bound


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0])
def test_equals_gguf_py_reference_quantizer(weights, qtype):
    """For the classic types gguf-py has a numpy port of ggml's reference code: same bytes."""
    assert ggml.quantize(weights, qtype).tobytes() == gguf.quants.quantize(weights, qtype).tobytes()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.IQ4_XS, T.Q8_0, T.F16])
def test_threads_do_not_change_bytes(weights, importance, qtype):
    one = ggml.quantize(weights, qtype, imatrix=importance, threads=1)
    three = ggml.quantize(weights, qtype, imatrix=importance, threads=3)
    per_row = np.concatenate([ggml.quantize(r, qtype, imatrix=importance) for r in weights[:5]])
    assert one.tobytes() == three.tobytes()
    assert per_row.tobytes() == one[:5].tobytes()


def test_float_types(weights):
    assert np.array_equal(ggml.quantize(weights, T.F32).view(np.float32), weights)
    assert np.array_equal(ggml.quantize(weights, T.F16).view(np.float16), weights.astype(np.float16))
    bf16 = ggml.quantize(weights, T.BF16).view(np.uint16)
    bits = weights.view(np.uint32).astype(np.uint64)
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    assert np.array_equal(bf16, expected)


def test_one_dimensional_and_out(weights):
    row = weights[0]
    assert ggml.quantize(row, T.Q8_0).shape == (1, ggml.row_size(T.Q8_0, 512))
    out = np.zeros((96, ggml.row_size(T.Q6_K, 512)), np.uint8)
    assert ggml.quantize(weights, T.Q6_K, out=out) is out
    assert out.tobytes() == ggml.quantize(weights, T.Q6_K).tobytes()


def test_requires_imatrix():
    from shortquant.quant.types import requires_imatrix

    assert requires_imatrix(T.IQ2_XXS) and requires_imatrix(T.IQ3_XXS) and requires_imatrix(T.IQ1_M)
    assert not requires_imatrix(T.Q4_K) and not requires_imatrix(T.IQ4_XS)
    assert ggml.kernel_requires_imatrix(T.IQ2_XS) and not ggml.kernel_requires_imatrix(T.IQ3_XXS)


def test_bad_input(weights, importance):
    with pytest.raises(QuantError, match="not a multiple of 256"):
        ggml.quantize(weights[:, :320], T.Q4_K)
    # the kernel would abort the process; we refuse first
    with pytest.raises(QuantError, match="needs an importance matrix.*shortquant imatrix"):
        ggml.quantize(weights, T.IQ2_XXS)
    with pytest.raises(QuantError, match="importance matrix has 256 values"):
        ggml.quantize(weights, T.Q4_K, imatrix=importance[:256])
    bad = importance.copy()
    bad[3] = np.nan
    with pytest.raises(QuantError, match="non-finite"):
        ggml.quantize(weights, T.Q4_K, imatrix=bad)
    nan_weights = weights.copy()
    nan_weights[7, 9] = np.inf
    with pytest.raises(QuantError, match="rejected"):
        ggml.quantize(nan_weights, T.Q8_0)
    # 3-D: stacked experts, their rows in order; importance per expert must match the experts
    stacked = weights.reshape(2, -1, weights.shape[-1])
    assert (ggml.quantize(stacked, T.Q8_0) == ggml.quantize(weights, T.Q8_0)).all()
    with pytest.raises(QuantError, match="importance matrix has 3 rows for 2 experts"):
        ggml.quantize(stacked, T.Q4_K, imatrix=np.ones((3, weights.shape[-1]), np.float32))


def test_library_lookup_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("SHORTQUANT_GGML_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(BackendError, match="SHORTQUANT_GGML_LIB"):
        ggml.library_path()
    monkeypatch.delenv("SHORTQUANT_GGML_LIB")
    assert ggml.library_path().name.startswith("libggml-base")
    monkeypatch.setattr(ggml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match="llama-cpp-python is not installed"):
        ggml.library_path()
