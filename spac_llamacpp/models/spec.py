"""Shapes and hyper-parameters of the tiny models spac writes (:class:`TinySpec`), and their checks.

Shared by the random-weight test-model factory (``factory.py``), the GGUF writer (``gguf_write.py``)
and the trained default models (``tinylm``), so a model's shape is described once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.bpe import SPECIAL_TOKENS

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2moe",
    "qwen3moe",
    "deepseek2",
    "deepseek2-merged",
    "olmoe",
    "gpt-oss",
)
"""Architectures a :class:`TinySpec` can describe (``factory.write_tiny_moe`` writes them all);
``deepseek2-merged`` is architecture deepseek2 with the expert gate/up stored as one ``ffn_gate_up_exps``
tensor."""

DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
"""Weight types every architecture is tested with."""

EXTRA_DTYPES: tuple[str, ...] = ("q4_0",)
"""Also accepted by the writers, but not part of the standard test matrix."""

# GGUF ``general.architecture`` for each factory name.
GGUF_ARCH: dict[str, str] = {a: ("deepseek2" if a == "deepseek2-merged" else a) for a in ARCHITECTURES}

QBLOCK = 32
"""Block size of q8_0 and q4_0: every quantized row must be a multiple of it."""


@dataclass(frozen=True)
class TinySpec:
    """Shape and scale parameters of a tiny model; :func:`tiny_spec` fills in arch defaults.

    Head size is ``n_embd // n_head`` for all architectures except deepseek2, whose MLA sizes
    are given by the ``*_rank`` and ``*_dim`` fields.
    """

    arch: str = "qwen3moe"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 64
    n_ff: int = 128  # dense FFN width (dense models, deepseek2 leading dense blocks)
    n_ff_shexp: int = 128  # qwen2moe shared expert width
    n_expert_shared: int = 1  # deepseek2: shared expert width is n_ff_exp * n_expert_shared
    n_dense_lead: int = 1  # deepseek2 leading dense blocks
    n_vocab: int = 512
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    # deepseek2 MLA
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_rope_dim: int = 16
    qk_nope_dim: int = 32
    v_head_dim: int = 32
    expert_weights_scale: float = 2.5
    # gpt-oss
    sliding_window: int = 128
    # scales: weights are normal * gain / sqrt(fan_in); the router gain is large so that
    # the expert choice depends strongly on the token.
    attn_gain: float = 0.7
    ffn_gain: float = 1.0
    router_gain: float = 3.0
    output_gain: float = 3.0
    bias_std: float = 0.05

    @property
    def gguf_arch(self) -> str:
        """The ``general.architecture`` value."""
        return GGUF_ARCH.get(self.arch, self.arch)

    @property
    def head_dim(self) -> int:
        """Attention head size for the non-MLA architectures."""
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return self.n_expert > 0


# Per-architecture overrides of the TinySpec defaults (matching what the real models do).
_ARCH_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"n_head_kv": 2},
    "qwen2moe": {"n_head_kv": 2, "rms_eps": 1e-6, "rope_freq_base": 1000000.0},
    "qwen3moe": {"n_head_kv": 2, "rms_eps": 1e-6, "rope_freq_base": 1000000.0},
    "deepseek2": {"n_head_kv": 1, "rms_eps": 1e-6},
    "deepseek2-merged": {"n_head_kv": 1, "rms_eps": 1e-6},
    "olmoe": {},  # n_head_kv = n_head: olmoe's k-norm spans n_embd, so no GQA
    "gpt-oss": {"n_head_kv": 2, "rope_freq_base": 150000.0},
}


def tiny_spec(arch: str = "qwen3moe", **overrides: object) -> TinySpec:
    """Return the :class:`TinySpec` of ``arch`` with its defaults, updated by ``overrides``.

    Raises :class:`SpacError` for an unknown architecture or field name.
    """
    if arch not in ARCHITECTURES:
        raise SpacError(f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    fields = {f.name for f in dataclasses.fields(TinySpec)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise SpacError(
            f"unknown TinySpec field(s) {', '.join(bad)}; valid fields: {', '.join(sorted(fields))}"
        )
    params: dict[str, object] = {**_ARCH_DEFAULTS[arch], **overrides}
    if arch == "olmoe" and "n_head_kv" not in overrides:
        params["n_head_kv"] = params.get("n_head", TinySpec.n_head)
    return TinySpec(arch=arch, **params)  # type: ignore[arg-type]


def check_spec(spec: TinySpec, *, quantized: bool) -> None:
    """Raise :class:`SpacError` if llama.cpp cannot load ``spec`` (or quantize it, if ``quantized``)."""
    if spec.n_layer < 1 or spec.n_embd < 1 or spec.n_head < 1:
        raise SpacError("n_layer, n_embd and n_head must be positive")
    if spec.n_vocab < 256 + len(SPECIAL_TOKENS) + 1:
        raise SpacError(
            f"n_vocab must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + special tokens)"
        )
    if spec.arch == "llama" and spec.n_expert == 0:
        pass  # the dense model
    elif spec.n_expert < 1 or not 1 <= spec.n_expert_used <= spec.n_expert:
        raise SpacError(f"{spec.arch} needs n_expert >= 1 and 1 <= n_expert_used <= n_expert")
    mla = spec.arch.startswith("deepseek2")
    if not mla:
        if spec.n_embd % spec.n_head or spec.head_dim % 2:
            raise SpacError(f"n_embd ({spec.n_embd}) must be n_head ({spec.n_head}) times an even head size")
        if spec.n_head % spec.n_head_kv:
            raise SpacError(f"n_head ({spec.n_head}) must be a multiple of n_head_kv ({spec.n_head_kv})")
    elif spec.n_dense_lead >= spec.n_layer:
        raise SpacError("deepseek2 needs n_dense_lead < n_layer (at least one MoE block)")
    if quantized:
        rows = {
            "n_embd": spec.n_embd,
            "n_ff_exp": spec.n_ff_exp,
            "n_ff": spec.n_ff,
            "n_ff_shexp": spec.n_ff_shexp,
        }
        if not mla:
            rows["n_head * head_dim"] = spec.n_head * spec.head_dim
        else:
            rows |= {
                "q_lora_rank": spec.q_lora_rank,
                "kv_lora_rank": spec.kv_lora_rank,
                "qk_nope_dim": spec.qk_nope_dim,
                "n_head * v_head_dim": spec.n_head * spec.v_head_dim,
                "n_ff_exp * n_expert_shared": spec.n_ff_exp * spec.n_expert_shared,
            }
        bad = [f"{k}={v}" for k, v in rows.items() if v % QBLOCK]
        if bad:
            raise SpacError(
                f"quantized tiny models need row sizes that are multiples of {QBLOCK}: {', '.join(bad)}"
            )

