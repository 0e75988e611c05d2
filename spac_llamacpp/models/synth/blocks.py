"""Random but valid GGML blocks, written directly (no quantization): F16, Q8_0, Q5_0, Q4_K, MXFP4.

Each writer fills a uint8 buffer with whole blocks whose dequantized values have mean ~0 and a chosen
standard deviation, e.g. ``gain / sqrt(fan_in)`` as a trained model's weights roughly have. It is cheap:
a per-type pool of pre-built blocks (random quants, valid sub-block scales) is tiled into the buffer
from a random offset, then every block gets a fresh random scale, so two experts never share bytes
and block magnitudes vary as in a real file. Layouts are ggml's (``ggml-common.h``):

- ``Q8_0`` (34 B / 32 values): f16 ``d``, 32 int8 ``qs``; ``x = d * q``.
- ``Q5_0`` (22 B / 32): f16 ``d``, 4 bytes ``qh`` (5th bits), 16 bytes ``qs`` (low nibbles);
  ``x = d * (q - 16)``. llama.cpp's fallback for Q4_K rows that are not a multiple of 256.
- ``Q4_K`` (144 B / 256): f16 ``d``, f16 ``dmin``, 12 bytes of packed 6-bit sub-block scales and mins,
  128 bytes of 4-bit quants; ``x = d * sc_j * q - dmin * m_j`` for the 8 sub-blocks ``j`` of 32 values.
  The mins are chosen as ``m_j = round(sc_j * 15/16)`` with ``dmin = 8 d``, so a sub-block's mean is ~0.
- ``MXFP4`` (17 B / 32): e8m0 exponent ``e`` and 16 bytes of E2M1 nibbles;
  ``x = kvalues[q] * 2^(e - 128)`` (``kvalues`` = the doubled E2M1 values, as ``ggml_e8m0_to_fp32_half``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

CHUNK_BYTES = 16 << 20
"""The most bytes one :meth:`BlockWriter.fill` call writes (the size of each type's block pool)."""

SCALE_JITTER = 0.25
"""Standard deviation of log(block scale): block magnitudes vary by about +-25%."""

_MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)


@dataclass(frozen=True)
class BlockWriter:
    """Writes random valid blocks of one ggml type."""

    qtype: GGMLQuantizationType

    @property
    def block_size(self) -> int:
        """Values per block."""
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def max_blocks(self) -> int:
        """The most blocks one :meth:`fill` call takes."""
        return CHUNK_BYTES // self.type_size

    def nbytes(self, n_values: int) -> int:
        """Bytes of ``n_values`` values (a multiple of :attr:`block_size`)."""
        if n_values % self.block_size:
            raise ValueError(f"{n_values} values are not whole {self.qtype.name} blocks of {self.block_size}")
        return n_values // self.block_size * self.type_size

    def fill(self, out: np.ndarray, std: float, rng: np.random.Generator, pool_seed: int = 0) -> None:
        """Fill the uint8 buffer ``out`` (whole blocks, at most :attr:`max_blocks`) with random blocks
        whose values have mean ~0 and standard deviation ``std``."""
        nb, rem = divmod(out.size, self.type_size)
        if rem or nb > self.max_blocks:
            raise ValueError(f"fill takes whole {self.qtype.name} blocks, at most {self.max_blocks}")
        if nb == 0:
            return
        if self.qtype == GGMLQuantizationType.F32:
            out.view(np.float32)[:] = rng.standard_normal(nb, dtype=np.float32) * np.float32(std)
            return
        if self.qtype == GGMLQuantizationType.F16:
            pool = _f16_pool(float(std), pool_seed)
            start = int(rng.integers(0, pool.size // 2))
            out.view(np.float16)[:] = pool[start:start + nb]
            return
        pool, unit_rms = _block_pool(self.qtype, pool_seed)
        start = int(rng.integers(0, pool.shape[0] // 2))
        blocks = out.reshape(nb, self.type_size)
        blocks[:] = pool[start:start + nb]
        if self.qtype == GGMLQuantizationType.MXFP4:
            blocks[:, 0] = _mxfp4_exponents(std / unit_rms, nb, rng)
            return
        d = _jittered_scales(std / unit_rms, nb, rng)
        blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
        if self.qtype == GGMLQuantizationType.Q4_K:
            blocks[:, 2:4] = (d * np.float16(8)).view(np.uint8).reshape(nb, 2)  # dmin = 8 d, exact in f16


def block_writer(qtype: GGMLQuantizationType) -> BlockWriter:
    """The writer of ``qtype`` (F32, F16, Q8_0, Q5_0, Q4_K or MXFP4)."""
    if qtype not in _POOL_BUILDERS and qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        raise ValueError(f"no random block writer for {qtype.name}")
    return BlockWriter(qtype)


def _jittered_scales(base: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` f16 block scales: ``base`` times log-normal factors whose mean square is 1 (a random slice of a
    pre-drawn pool: drawing them per block would cost as much as the rest of the fill)."""
    pool = _factor_pool()
    start = int(rng.integers(0, pool.size // 2))
    return (pool[start:start + n] * np.float32(base)).astype(np.float16)


@functools.lru_cache(maxsize=1)
def _factor_pool() -> np.ndarray:
    n = CHUNK_BYTES // min(GGML_QUANT_SIZES[t][1] for t in _POOL_BUILDERS)
    s = np.float32(SCALE_JITTER)
    rng = np.random.default_rng([0x5EED, 0xFAC])
    return _doubled(np.exp(rng.standard_normal(n, dtype=np.float32) * s - s * s))


def _mxfp4_exponents(base: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` e8m0 exponents with scale ``2^(e-128)`` of mean square ``base**2``: each block takes one of the two
    powers of two around ``base``, with the probability that makes the mean square exact."""
    x = np.log2(base)
    lo = np.floor(x)
    p_hi = (4.0 ** (x - lo) - 1.0) / 3.0
    e = np.int32(lo) + 128 + (rng.random(n, dtype=np.float32) < p_hi).astype(np.int32)
    return np.clip(e, 2, 254).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# pools of pre-built blocks (their scale fields are overwritten on every fill)


def _pool_rng(qtype: GGMLQuantizationType, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x5EED, int(qtype)])


def _doubled(a: np.ndarray) -> np.ndarray:
    """``a`` twice along axis 0, so any slice of at most len(a) from an offset below len(a) is contiguous."""
    return np.ascontiguousarray(np.concatenate([a, a], axis=0))


@functools.lru_cache(maxsize=16)
def _f16_pool(std: float, seed: int) -> np.ndarray:
    n = CHUNK_BYTES // 2
    rng = np.random.default_rng([seed, 0x5EED, 1, int(np.float32(std).view(np.uint32))])
    return _doubled((rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float16))


def _q8_0_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    blocks = np.zeros((n, 34), dtype=np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    return blocks, float(np.sqrt(np.mean(np.arange(-128, 128, dtype=np.float64) ** 2)))


def _q5_0_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    blocks = np.zeros((n, 22), dtype=np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (n, 20), dtype=np.uint8)
    return blocks, float(np.sqrt(np.mean((np.arange(32, dtype=np.float64) - 16) ** 2)))


def pack_q4_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K blocks from their 6-bit sub-block scales and mins, both (n, 8) in 0..63
    (the inverse of ggml's ``get_scale_min_k4``)."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _q4_k_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    sc = rng.integers(16, 64, (n, 8))
    m = np.rint(sc * (15.0 / 16.0)).astype(np.int64)  # dmin = 8 d: mean d*(7.5 sc - 8 m) ~ 0
    blocks = np.empty((n, 144), dtype=np.uint8)
    blocks[:, 0:4] = 0
    blocks[:, 4:16] = pack_q4_k_scales(sc, m)
    blocks[:, 16:] = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    # mean square of d*(sc*q - 8m) at d = 1, q uniform in 0..15
    q = np.arange(16, dtype=np.float64)
    ms = np.mean((sc[..., None] * q - 8.0 * m[..., None]) ** 2)
    return blocks, float(np.sqrt(ms))


def _mxfp4_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    blocks = np.zeros((n, 17), dtype=np.uint8)
    blocks[:, 1:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return blocks, float(np.sqrt(np.mean(_MXFP4_KVALUES ** 2)))


_POOL_BUILDERS = {
    GGMLQuantizationType.Q8_0: _q8_0_pool,
    GGMLQuantizationType.Q5_0: _q5_0_pool,
    GGMLQuantizationType.Q4_K: _q4_k_pool,
    GGMLQuantizationType.MXFP4: _mxfp4_pool,
}


@functools.lru_cache(maxsize=16)
def _block_pool(qtype: GGMLQuantizationType, seed: int) -> tuple[np.ndarray, float]:
    """(doubled pool of blocks, RMS of a block's values at unit scale) for ``qtype``."""
    n = CHUNK_BYTES // GGML_QUANT_SIZES[qtype][1]
    blocks, unit_rms = _POOL_BUILDERS[qtype](_pool_rng(qtype, seed), n)
    return _doubled(blocks), unit_rms
