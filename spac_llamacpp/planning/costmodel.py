"""The cost model of the balancer and the simulator: what an expert costs where, on this machine.

A :class:`CostModel` holds what ``spac calibrate`` measured (see ``calibrate.py``) and answers:

- ``cpu_seconds(tensors, n_tokens)``: CPU time of one expert activation (gate/up/down matmuls of one
  expert applied to ``n_tokens`` tokens), from the measured seconds-per-weight-byte of each ggml type
  at a few batch sizes (piecewise linear in the batch size);
- ``gpu_seconds(nbytes, n_tokens)``: the same on the GPU (measured when a GPU was present, otherwise
  documented assumptions, flagged by ``gpu.measured == False``);
- ``flash_miss.seconds(nbytes, n_ranges)``: an on-demand read of an expert from flash (memory-mapped
  page faults with a cold page cache), ``flash_prefetch.seconds(...)``: a planned read (``pread``);
- ``h2d_seconds(nbytes)``: a RAM->VRAM copy.

An :class:`ExpertLayout` says how big each model's experts are and of which weight types, from the GGUF
header (or synthetic, for benchmarks).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import GGML_TYPES, MoEModelInfo

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1

# Used only when no GPU was measured (the numbers of a PCIe 4.0 x16 link and an H100-class GPU at
# batch 1, where an expert matmul is bound by memory bandwidth); see docs/balancer.md.
ASSUMED_GPU_BANDWIDTH = 1.5e12  # effective bytes/s of a small-batch expert matmul on the GPU
ASSUMED_GPU_LAUNCH = 2e-6  # s per expert activation: llama.cpp's MUL_MAT_ID runs a layer's experts in one launch
ASSUMED_H2D_BANDWIDTH = 20e9  # bytes/s, pinned-ish host memory over PCIe 4.0 x16
ASSUMED_H2D_LATENCY = 10e-6  # s per copy


def _bits_per_weight(ggml_type: str) -> float | None:
    for name, block, nbytes in GGML_TYPES.values():
        if name == ggml_type:
            return 8.0 * nbytes / block
    return None


@dataclass(frozen=True)
class ReadCost:
    """Affine read time: ``n_ranges * latency_s + nbytes / bandwidth``."""

    bandwidth: float  # bytes/s
    latency_s: float  # per contiguous range

    def seconds(self, nbytes: float, n_ranges: int = 1) -> float:
        return n_ranges * self.latency_s + float(nbytes) / self.bandwidth

    def to_json(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "latency_s": self.latency_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReadCost:
        return cls(float(d["bandwidth"]), float(d["latency_s"]))


@dataclass(frozen=True)
class CpuKernel:
    """Seconds per weight byte of one expert activation with ``batch[i]`` tokens (measured)."""

    batch: tuple[int, ...]
    s_per_byte: tuple[float, ...]
    source: str = "measured"  # or "borrowed from <type>"

    def per_byte(self, n_tokens: float | np.ndarray) -> Any:
        """Piecewise-linear in the batch size; linear extrapolation past the largest measured batch.

        Accepts a scalar or an array of token counts (returns the same shape).
        """
        b, s = self.batch, self.s_per_byte
        n = np.asarray(n_tokens, dtype=np.float64)
        if len(b) == 1:
            out = np.full(n.shape, s[0])
        else:
            slope = max(0.0, (s[-1] - s[-2]) / (b[-1] - b[-2]))
            out = np.where(n >= b[-1], s[-1] + slope * (n - b[-1]), np.interp(n, b, s))
        return float(out) if out.ndim == 0 else out

    def to_json(self) -> dict[str, Any]:
        return {"batch": list(self.batch), "s_per_byte": list(self.s_per_byte), "source": self.source}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CpuKernel:
        batch = tuple(int(x) for x in d["batch"])
        spb = tuple(float(x) for x in d["s_per_byte"])
        if not batch or len(batch) != len(spb) or list(batch) != sorted(set(batch)) or min(spb) <= 0:
            raise ValueError("cpu kernel needs increasing batch sizes and positive s_per_byte of the same length")
        return cls(batch, spb, str(d.get("source", "measured")))


@dataclass(frozen=True)
class GpuCost:
    """GPU side: present or not, measured or assumed."""

    present: bool = False
    measured: bool = False
    name: str = ""
    bandwidth: float = ASSUMED_GPU_BANDWIDTH
    launch_s: float = ASSUMED_GPU_LAUNCH
    h2d: ReadCost = ReadCost(ASSUMED_H2D_BANDWIDTH, ASSUMED_H2D_LATENCY)
    free_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "measured": self.measured,
            "name": self.name,
            "bandwidth": self.bandwidth,
            "launch_s": self.launch_s,
            "h2d": self.h2d.to_json(),
            "free_bytes": self.free_bytes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GpuCost:
        """``measured: false`` means the matmul numbers are this version's assumptions, not the file's."""
        measured = bool(d.get("measured", False))
        return cls(
            present=bool(d.get("present", False)),
            measured=measured,
            name=str(d.get("name", "")),
            bandwidth=float(d.get("bandwidth", ASSUMED_GPU_BANDWIDTH)) if measured else ASSUMED_GPU_BANDWIDTH,
            launch_s=float(d.get("launch_s", ASSUMED_GPU_LAUNCH)) if measured else ASSUMED_GPU_LAUNCH,
            h2d=ReadCost.from_json(d["h2d"]) if "h2d" in d else ReadCost(ASSUMED_H2D_BANDWIDTH, ASSUMED_H2D_LATENCY),
            free_bytes=int(d.get("free_bytes", 0)),
        )


@dataclass
class CostModel:
    """Measured costs of this machine (see module docstring)."""

    cpu: dict[str, CpuKernel]
    flash_miss: ReadCost
    flash_prefetch: ReadCost
    gpu: GpuCost = field(default_factory=GpuCost)
    mem_available: int = 0
    mem_total: int = 0
    threads: int = 1
    machine: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # raw measurements, for --show
    source: str = ""  # where it was loaded from

    @classmethod
    def nominal(cls) -> CostModel:
        """Assumed costs for when this machine has no calibration (``spac calibrate`` measures them).

        NVMe-class flash (2 GB/s, 100 us per range on a miss; prefetches overlap, 4 GB/s) and
        0.5 ns per weight byte per activation on the CPU. With equal expert sizes the flash-tier plan
        depends only on the ratio of these numbers, so a wrong guess changes the plan little.
        """
        kernel = CpuKernel((1, 8), (5e-10, 1e-9), "nominal")
        return cls(cpu={"F16": kernel}, flash_miss=ReadCost(2e9, 1e-4), flash_prefetch=ReadCost(4e9, 2e-5),
                   source="nominal (no calibration; run `spac calibrate`)")

    # -- costs ------------------------------------------------------------------------------------
    def kernel(self, ggml_type: str) -> CpuKernel:
        """The measured kernel of ``ggml_type``, or that of the measured type closest in bits per weight."""
        k = self.cpu.get(ggml_type)
        if k is not None:
            return k
        if not self.cpu:
            raise SpacError("the calibration has no CPU measurements; re-run `spac calibrate`")
        bpw = _bits_per_weight(ggml_type) or 16.0
        best = min(self.cpu, key=lambda t: (abs(math.log((_bits_per_weight(t) or 16.0) / bpw)), t))
        log.info("no CPU measurement for %s: using %s (closest bits per weight)", ggml_type, best)
        k = CpuKernel(self.cpu[best].batch, self.cpu[best].s_per_byte, f"borrowed from {best}")
        self.cpu[ggml_type] = k  # remember (and log once)
        return k

    def cpu_seconds(self, tensors: Sequence[tuple[str, int]], n_tokens: float | np.ndarray) -> Any:
        """CPU time of one expert activation; ``tensors`` = (ggml type, bytes of this expert) per tensor.

        ``n_tokens`` may be an array (the result then is one); 0 tokens cost nothing.
        """
        n = np.asarray(n_tokens, dtype=np.float64)
        t = sum(nbytes * self.kernel(ty).per_byte(n) for ty, nbytes in tensors)
        out = np.where(n > 0, t, 0.0)
        return float(out) if out.ndim == 0 else out

    def gpu_seconds(self, nbytes: float, n_tokens: float | np.ndarray) -> Any:
        """GPU time of one expert activation (bandwidth-bound at the small batches of decoding)."""
        n = np.asarray(n_tokens, dtype=np.float64)
        out = np.where(n > 0, self.gpu.launch_s + float(nbytes) / self.gpu.bandwidth, 0.0)
        return float(out) if out.ndim == 0 else out

    def h2d_seconds(self, nbytes: float, n_ranges: int = 1) -> float:
        return self.gpu.h2d.seconds(nbytes, n_ranges)

    # -- persistence ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION,
            "created": self.created,
            "machine": self.machine,
            "model": self.model,
            "threads": self.threads,
            "cpu": {t: k.to_json() for t, k in sorted(self.cpu.items()) if k.source == "measured"},
            "flash_miss": self.flash_miss.to_json(),
            "flash_prefetch": self.flash_prefetch.to_json(),
            "gpu": self.gpu.to_json(),
            "memory": {"mem_available": self.mem_available, "mem_total": self.mem_total},
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "") -> CostModel:
        if d.get("version") != CALIBRATION_VERSION:
            raise SpacError(
                f"calibration {source or ''} has version {d.get('version')}, not {CALIBRATION_VERSION}; "
                "re-run `spac calibrate`"
            )
        try:
            mem = d.get("memory", {})
            return cls(
                cpu={str(t): CpuKernel.from_json(k) for t, k in d["cpu"].items()},
                flash_miss=ReadCost.from_json(d["flash_miss"]),
                flash_prefetch=ReadCost.from_json(d["flash_prefetch"]),
                gpu=GpuCost.from_json(d.get("gpu", {})),
                mem_available=int(mem.get("mem_available", 0)),
                mem_total=int(mem.get("mem_total", 0)),
                threads=int(d.get("threads", 1)),
                machine=dict(d.get("machine", {})),
                model=d.get("model"),
                created=str(d.get("created", "")),
                extra=dict(d.get("extra", {})),
                source=source,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpacError(
                f"calibration {source} is damaged ({type(exc).__name__}: {exc}); re-run `spac calibrate`"
            ) from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise SpacError(f"calibration file not found: {path}; run `spac calibrate` or pass an existing file")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SpacError(
                f"{path} is not a calibration JSON ({type(exc).__name__}); re-run `spac calibrate`"
            ) from None
        if not isinstance(d, dict):
            raise SpacError(f"{path} is not a calibration JSON; re-run `spac calibrate`")
        return cls.from_json(d, source=str(path))


# --------------------------------------------------------------------------------------------------
# Expert layout


@dataclass(frozen=True)
class ExpertLayout:
    """Sizes and weight types of a model's routed experts, per MoE layer (index i = moe_layers[i])."""

    moe_layers: tuple[int, ...]
    n_expert: int
    tensors: tuple[tuple[tuple[str, int], ...], ...]  # per MoE layer: (ggml type, bytes per expert) per tensor
    n_expert_used: tuple[int, ...]  # per MoE layer
    non_expert_bytes: int = 0
    model: str = ""

    @property
    def n_layer(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_bytes(self) -> np.ndarray:
        """``[n_moe_layer]`` int64: bytes of one expert of each MoE layer."""
        return np.array([sum(b for _, b in ts) for ts in self.tensors], dtype=np.int64)

    @property
    def bytes_matrix(self) -> np.ndarray:
        """``[n_moe_layer, n_expert]`` int64 expert sizes."""
        return np.repeat(self.expert_bytes[:, None], self.n_expert, axis=1)

    @property
    def total_expert_bytes(self) -> int:
        return int(self.expert_bytes.sum()) * self.n_expert

    def n_ranges(self, i: int) -> int:
        """Contiguous file ranges of one expert of MoE layer ``i`` (one per tensor)."""
        return len(self.tensors[i])

    @classmethod
    def from_info(cls, info: MoEModelInfo) -> ExpertLayout:
        tensors = []
        for il in info.moe_layers:
            tensors.append(tuple((t.ggml_type, t.bytes_per_expert) for t in info.layer_tensors(il) if not t.is_chunk))
        return cls(
            moe_layers=tuple(info.moe_layers),
            n_expert=info.n_expert,
            tensors=tuple(tensors),
            n_expert_used=tuple(info.n_expert_used[il] for il in info.moe_layers),
            non_expert_bytes=info.non_expert_bytes,
            model=str(info.path),
        )

    @classmethod
    def synthetic(
        cls,
        n_layer: int,
        n_expert: int,
        expert_bytes: int,
        n_expert_used: int,
        ggml_type: str = "Q4_K",
        non_expert_bytes: int = 0,
        n_tensors: int = 3,
    ) -> ExpertLayout:
        """A uniform layout (for benchmarks): ``n_tensors`` equal tensors per expert."""
        per = expert_bytes // n_tensors
        ts = tuple((ggml_type, per) for _ in range(n_tensors))
        return cls(tuple(range(n_layer)), n_expert, (ts,) * n_layer, (n_expert_used,) * n_layer, non_expert_bytes)
