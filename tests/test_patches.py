"""The llama.cpp patch series (patches/): applied, and its kernels right (ggml level)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp import patched_llama_available

ROOT = Path(__file__).resolve().parent.parent
# CI builds the patched library (scripts/setup.sh -> build_llama.sh): there a skip would hide a failure
needs_patch = pytest.mark.skipif(
    not patched_llama_available() and not os.environ.get("SPAC_REQUIRE_PATCHED"),
    reason="the installed llama.cpp is stock (run scripts/build_llama.sh)",
)

# ggml type ids (ggml.h enum ggml_type) of every weight type the CPU backend multiplies without an
# importance matrix, with the relative error allowed against the float product (weights and, for
# quantised types, activations are rounded)
TYPES = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
         "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "MXFP4": 39}
REL_ERR = {"F32": 1e-5, "F16": 1e-2, "BF16": 2e-2, "Q8_0": 2e-2, "Q6_K": 0.05, "Q5_0": 0.1, "Q5_1": 0.1,
           "Q5_K": 0.1, "Q4_0": 0.2, "Q4_1": 0.2, "Q4_K": 0.2, "IQ4_NL": 0.2, "IQ4_XS": 0.2, "MXFP4": 0.25,
           "Q3_K": 0.35, "Q2_K": 0.6}


def test_every_patch_applies_to_the_pinned_sdist(tmp_path):
    sdist = Path(os.environ.get("SPAC_MODEL_CACHE", Path.home() / ".cache/spac-llamacpp")) / "sdist"
    archive = sdist / "llama_cpp_python-0.3.36.tar.gz"
    if not archive.is_file():
        pytest.skip("sdist not downloaded (scripts/build_llama.sh downloads it)")
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(tmp_path)], check=True)
    src = tmp_path / "llama_cpp_python-0.3.36"
    patches = sorted((ROOT / "patches").glob("*.patch"))
    assert patches
    for p in patches:
        r = subprocess.run(["patch", "-d", str(src), "-p1", "--dry-run", "-i", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stdout}{r.stderr}"
        subprocess.run(["patch", "-d", str(src), "-p1", "--silent", "-i", str(p)], check=True)


@needs_patch
def test_patch_level():
    assert patched_llama_available(1)


@needs_patch
@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_mul_mat_id_skips_negative_ids(type_name, n_tokens):
    from spac_llamacpp.native import module as native

    mod = native.load()
    ffi, lib = mod.ffi, mod.lib
    rng = np.random.default_rng(0)
    n_embd, n_ff, n_expert, n_used = 256, 32, 6, 3
    a = rng.normal(size=(n_expert, n_ff, n_embd)).astype(np.float32)
    b = rng.normal(size=(n_tokens, n_embd)).astype(np.float32)
    ids = np.stack([rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    skipped = ids.copy()
    skipped[:, 1] = -1  # every token skips its second slot ...
    if n_tokens > 1:
        skipped[0, :] = -1  # ... and token 0 skips them all

    def run(idv: np.ndarray) -> np.ndarray:
        out = np.empty((n_tokens, n_used, n_ff), dtype=np.float32)
        idv = np.ascontiguousarray(idv)
        rc = lib.spac_test_mul_mat_id(TYPES[type_name], n_embd, n_ff, n_expert, n_used, n_tokens,
                                      ffi.from_buffer("float[]", a), ffi.from_buffer("float[]", b),
                                      ffi.from_buffer("int32_t[]", idv), ffi.from_buffer("float[]", out), 2)
        assert rc == 0
        return out

    full, part = run(ids), run(skipped)
    assert (part[skipped < 0] == 0.0).all()  # skipped slots: zeros (the output was poisoned before)
    keep = skipped >= 0
    assert np.array_equal(part[keep], full[keep])  # the same arithmetic, whatever else was skipped
    # the computed slots are real products (loose: quantised weights and activations)
    ref = np.einsum("tfe,te->tf", a[ids.reshape(-1)].reshape(n_tokens, n_used, n_ff, n_embd).reshape(
        n_tokens * n_used, n_ff, n_embd), np.repeat(b, n_used, axis=0)).reshape(n_tokens, n_used, n_ff)
    rel = np.linalg.norm(full - ref) / np.linalg.norm(ref)
    assert rel < REL_ERR[type_name], rel
