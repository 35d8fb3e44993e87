"""Per-tensor type choice: our rule tables against llama.cpp's own ``llama_tensor_get_type``.

llama.cpp exports a test hook (``llama_quant_compute_types`` on a mock model built from
metadata, in ``src/llama-ext.h``) that runs its real type-selection code without weights. We
call it through ctypes for every mix and several model shapes (GQA ratios, layer counts, the
70B rule, tied embeddings, rows that force fallbacks, 8 experts, overrides) and require the same
type for every tensor. The imatrix-dependent rules are covered by the quantization parity test,
since the hook always runs without an imatrix.
"""

from __future__ import annotations

import ctypes
import re

import gguf
import pytest

from shortquant.errors import QuantError
from shortquant.quant.mixes import QuantOverrides, choose_types, tensor_role
from shortquant.quant.types import QUANT_NAMES, parse_quant, parse_quants

T = gguf.GGMLQuantizationType
llama_cpp = pytest.importorskip("llama_cpp")


# ---------------------------------------------------------------------------------------------
# llama.cpp's type selection, through its exported test hook
# ---------------------------------------------------------------------------------------------

class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (n, ctypes.c_uint32)
        for n in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


class _GgmlInit(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class LlamaTypeOracle:
    """llama.cpp's llama_quant_compute_types (C++ symbols, hence the mangled names)."""

    def __init__(self):
        from llama_cpp import llama_cpp as L

        from shortquant import ggml

        self.L = L
        lib, base = L._lib, ggml._load()

        def sym(name):
            try:
                return getattr(lib, name)
            except AttributeError:
                pytest.skip("this libllama does not export llama.cpp's quantization test hooks")

        self.from_meta = sym("_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc")
        self.from_meta.argtypes, self.from_meta.restype = [ctypes.POINTER(_Desc)], ctypes.c_void_p
        self.qinit = sym("_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params")
        self.qinit.argtypes = [ctypes.c_void_p, ctypes.POINTER(L.llama_model_quantize_params)]
        self.qinit.restype = ctypes.c_void_p
        self.qfree = sym("_Z16llama_quant_freeP19quantize_state_impl")
        self.qfree.argtypes, self.qfree.restype = [ctypes.c_void_p], None
        self.compute = sym("_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem")
        self.compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
        self.compute.restype = None
        base.ggml_init.argtypes, base.ggml_init.restype = [_GgmlInit], ctypes.c_void_p
        base.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
        base.ggml_new_tensor.restype = ctypes.c_void_p
        base.ggml_set_name.argtypes, base.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
        base.ggml_free.argtypes, base.ggml_free.restype = [ctypes.c_void_p], None
        self.base = base

    def types(self, tensors, quant, *, n_layer, n_head, n_head_kv, n_expert=0, overrides=None):
        L, base = self.L, self.base
        model = self.from_meta(ctypes.byref(_Desc(b"llama", 256, 512, n_layer, n_head, n_head_kv, n_expert, 32, 32)))
        params = L.llama_model_quantize_default_params()
        keep = []
        if overrides is not None:
            params.pure = overrides.pure
            if overrides.output_type is not None:
                params.output_tensor_type = int(overrides.output_type)
            if overrides.embedding_type is not None:
                params.token_embedding_type = int(overrides.embedding_type)
            if overrides.tensor_types:
                arr = (L.llama_model_tensor_override * (len(overrides.tensor_types) + 1))()
                for k, (pattern, qtype) in enumerate(overrides.tensor_types):
                    keep.append(pattern.encode())
                    arr[k].pattern, arr[k].type = keep[-1], int(qtype)
                params.tt_overrides = arr
                keep.append(arr)
        qs = self.qinit(model, ctypes.byref(params))
        ctx = base.ggml_init(_GgmlInit(16 << 20, None, True))
        # llama.cpp visits tensors by block, then by name
        ordered = sorted(tensors, key=lambda t: (int(t[0].split(".")[1]) if t[0].startswith("blk.") else -1, t[0]))
        ptrs = []
        for name, shape in ordered:
            ne = (ctypes.c_int64 * len(shape))(*reversed(shape))
            t = base.ggml_new_tensor(ctx, int(T.F32), len(shape), ne)
            base.ggml_set_name(t, name.encode())
            ptrs.append(t)
        result = (ctypes.c_int * len(ptrs))()
        self.compute(qs, int(parse_quant(quant).file_type), (ctypes.c_void_p * len(ptrs))(*ptrs), result, len(ptrs))
        out = {name: T(r) for (name, _), r in zip(ordered, result)}
        base.ggml_free(ctx)
        self.qfree(qs)
        L.llama_model_free(model)
        return out


@pytest.fixture(scope="module")
def oracle():
    return LlamaTypeOracle()


def llama_tensors(n_layer, *, hidden=256, ffn=512, kv=128, vocab=512, tied=False, n_expert=0):
    """GGUF names and (rows, cols) shapes of a LLaMA model, in our writer's order."""
    t = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layer):
        t += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (kv, hidden)),
            (f"blk.{i}.attn_v.weight", (kv, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
        ]
        if n_expert:
            t += [
                (f"blk.{i}.ffn_gate_inp.weight", (n_expert, hidden)),
                (f"blk.{i}.ffn_gate_exps.weight", (n_expert, ffn, hidden)),
                (f"blk.{i}.ffn_up_exps.weight", (n_expert, ffn, hidden)),
                (f"blk.{i}.ffn_down_exps.weight", (n_expert, hidden, ffn)),
            ]
        else:
            t += [
                (f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
                (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
                (f"blk.{i}.ffn_down.weight", (hidden, ffn)),
            ]
    t.append(("output_norm.weight", (hidden,)))
    if not tied:
        t.append(("output.weight", (vocab, hidden)))
    return t


MODELS = {
    # name: (tensor kwargs, n_layer, n_head, n_head_kv, n_expert)
    "16 blocks gqa2": (dict(), 16, 8, 4, 0),
    "8 blocks gqa4": (dict(kv=64), 8, 8, 2, 0),
    "32 blocks mha tied": (dict(kv=256, tied=True), 32, 8, 8, 0),
    "80 blocks gqa8 (70B rule)": (dict(kv=32), 80, 64, 8, 0),
    "12 blocks rows 320/176 (fallbacks)": (dict(hidden=320, ffn=176, kv=160), 12, 10, 5, 0),
    "4 blocks 8 experts": (dict(n_expert=8, kv=128), 4, 8, 4, 8),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_mix_matches_llama_cpp(oracle, model):
    kwargs, n_layer, n_head, n_head_kv, n_expert = MODELS[model]
    tensors = llama_tensors(n_layer, **kwargs)
    mismatches = []
    for quant in QUANT_NAMES:
        ref = oracle.types(tensors, quant, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert)
        ours = choose_types(tensors, quant=quant, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                            n_expert=n_expert, require_imatrix=False)
        assert list(ours) == [name for name, _ in tensors]  # file order kept
        mismatches += [(quant, n, ref[n].name, ours[n].name) for n in ref if ref[n] != ours[n]]
    assert not mismatches, mismatches[:20]


OVERRIDES = [
    QuantOverrides(pure=True),
    QuantOverrides(output_type=T.Q8_0, embedding_type=T.Q4_0),
    QuantOverrides.parse(tensor_types=["ffn_down=q6_k", r"blk\.[0-3]\.attn_.*=q8_0"]),
    QuantOverrides.parse(tensor_types=["BLK\\.1[0-5]\\.=iq4_nl", "attn_v=f16"], output_type="q5_k"),
]


@pytest.mark.parametrize("overrides", OVERRIDES, ids=["pure", "output+embd", "tensor-type", "mixed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_overrides_match_llama_cpp(oracle, overrides, tied):
    tensors = llama_tensors(16, tied=tied)
    for quant in ("q4_k_m", "q3_k_m", "q2_k", "q8_0", "f16", "iq4_xs"):
        ref = oracle.types(tensors, quant, n_layer=16, n_head=8, n_head_kv=4, overrides=overrides)
        ours = choose_types(tensors, quant=quant, n_layer=16, n_head=8, n_head_kv=4, overrides=overrides,
                            require_imatrix=False)
        assert ours == ref, (quant, {n: (ref[n].name, ours[n].name) for n in ref if ref[n] != ours[n]})


def test_known_q4_k_m_pattern():
    """Independent of llama.cpp: the use_more_bits layers of 16 blocks get Q6_K in q4_k_m."""
    types = choose_types(llama_tensors(16), quant="q4_k_m", n_layer=16, n_head=8, n_head_kv=4)
    six = [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.5.attn_norm.weight"] == T.F32 and types["blk.5.attn_q.weight"] == T.Q4_K


def test_imatrix_changes_iq3_xxs_and_q4_0():
    tensors = llama_tensors(16)
    with_im = choose_types(tensors, quant="iq3_xxs", n_layer=16, n_head=8, n_head_kv=4, has_imatrix=True)
    without = choose_types(tensors, quant="iq3_xxs", n_layer=16, n_head=8, n_head_kv=4, require_imatrix=False)
    assert with_im["blk.5.attn_v.weight"] == T.IQ3_XXS and without["blk.5.attn_v.weight"] == T.IQ3_S
    assert with_im["blk.5.ffn_down.weight"] == T.IQ3_XXS and without["blk.5.ffn_down.weight"] == T.Q3_K
    q4 = choose_types(tensors, quant="q4_0", n_layer=16, n_head=8, n_head_kv=4, has_imatrix=True)
    assert [q4[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == [T.Q4_1, T.Q4_1, T.Q4_0]


@pytest.mark.parametrize("quant", ["iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "q2_k_s"])
def test_imatrix_required(quant):
    with pytest.raises(QuantError, match="importance matrix.*shortquant imatrix"):
        choose_types(llama_tensors(8), quant=quant, n_layer=8, n_head=8, n_head_kv=4)
    choose_types(llama_tensors(8), quant=quant, n_layer=8, n_head=8, n_head_kv=4, has_imatrix=True)


def test_quant_names():
    assert parse_quant("Q4_K_M").default_type == T.Q4_K
    assert parse_quant(" iq2_m ").file_type == gguf.LlamaFileType.MOSTLY_IQ2_M
    assert [q.name for q in parse_quants(["all"])] == [n for n in QUANT_NAMES if not n.startswith("tq")]
    assert len(QUANT_NAMES) == 32
    with pytest.raises(QuantError) as err:
        parse_quant("q4_k_x")
    assert "q4_k_x" in str(err.value) and "q4_k_m" in str(err.value) and "iq1_m" in str(err.value)


def test_bad_overrides():
    with pytest.raises(QuantError, match="PATTERN=TYPE"):
        QuantOverrides.parse(tensor_types=["ffn_down"])
    with pytest.raises(QuantError, match="unknown tensor type"):
        QuantOverrides.parse(tensor_types=["ffn_down=q9_k"])
    with pytest.raises(QuantError, match="bad --tensor-type pattern"):
        choose_types(llama_tensors(1), quant="q8_0", n_layer=1, n_head=8, n_head_kv=4,
                     overrides=QuantOverrides.parse(tensor_types=["blk.(=q8_0"]))


def test_roles():
    assert tensor_role("blk.0.attn_qkv.weight") == "attn_v"
    assert tensor_role("blk.0.ffn_down_exps.weight") == "ffn_down"
    assert tensor_role("rope_freqs.weight") == "other"
    assert re.fullmatch(r"\w+", tensor_role("output.weight"))
