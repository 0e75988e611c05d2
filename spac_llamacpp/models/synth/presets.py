"""Real MoE models' shapes: the presets of ``spac synth``.

Every number is from the model's published Hugging Face ``config.json`` (the repository is named in
each preset's ``source``); the GGUF keys follow what llama.cpp's ``convert_hf_to_gguf.py`` writes for it
(``conversion/*.py`` in the vendored llama.cpp). A preset is a :class:`~spac_llamacpp.models.spec.TinySpec`
at full size plus the few things a TinySpec does not describe (a head size that is not
``n_embd / n_head``, RoPE scaling, the gating of DeepSeek-V2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.spec import TinySpec


@dataclass(frozen=True)
class Preset:
    """A real model's architecture: the hyper-parameters and everything needed to lay out its tensors."""

    name: str
    source: str  # where the numbers come from
    spec: TinySpec  # full size (all layers)
    default_type: str  # routed-expert type when --type is not given (the one its common GGUFs use)
    head_dim: int | None = None  # attention head size when it is not n_embd // n_head
    rope_scaling: dict[str, float] = field(default_factory=dict)  # yarn: factor, original_context, yarn_log_mul
    gating: str | None = None  # deepseek2: "softmax" (V2) or "sigmoid" (V3)
    expert_weights_norm: bool | None = None  # deepseek2: renormalise the top-k weights
    min_layers: int = 1

    @property
    def n_layer(self) -> int:
        return self.spec.n_layer

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.spec.head_dim

    def with_layers(self, n_layer: int | None) -> TinySpec:
        """The spec shortened to its first ``n_layer`` blocks (all of them if None)."""
        if n_layer is None:
            return self.spec
        if not self.min_layers <= n_layer <= self.spec.n_layer:
            raise SpacError(
                f"--layers for {self.name} must be between {self.min_layers} and {self.spec.n_layer}, not {n_layer}"
            )
        return dataclasses.replace(self.spec, n_layer=n_layer)


_PRESETS: tuple[Preset, ...] = (
    Preset(
        name="qwen3-30b-a3b",
        source="Hugging Face config.json of Qwen/Qwen3-30B-A3B",
        spec=TinySpec(
            arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
            n_expert=128, n_expert_used=8, n_ff_exp=768, n_ff=6144,
            n_vocab=151936, n_ctx_train=40960, rope_freq_base=1_000_000.0, rms_eps=1e-6,
        ),
        head_dim=128,
        default_type="q4_k",
    ),
    Preset(
        name="gpt-oss-20b",
        source="Hugging Face config.json of openai/gpt-oss-20b",
        spec=TinySpec(
            arch="gpt-oss", n_layer=24, n_embd=2880, n_head=64, n_head_kv=8,
            n_expert=32, n_expert_used=4, n_ff_exp=2880, n_ff=2880,
            n_vocab=201088, n_ctx_train=131072, rope_freq_base=150000.0, rms_eps=1e-5,
            sliding_window=128,
        ),
        head_dim=64,
        rope_scaling={"factor": 32.0, "original_context": 4096},
        default_type="mxfp4",  # the checkpoint's experts are MXFP4 (quantization_config)
    ),
    Preset(
        name="mixtral-8x7b",
        source="Hugging Face config.json of mistralai/Mixtral-8x7B-v0.1",
        spec=TinySpec(
            arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
            n_expert=8, n_expert_used=2, n_ff_exp=14336, n_ff=14336,
            n_vocab=32000, n_ctx_train=32768, rope_freq_base=1_000_000.0, rms_eps=1e-5,
        ),
        default_type="q4_k",
    ),
    Preset(
        name="deepseek-v2-lite",
        source="Hugging Face config.json of deepseek-ai/DeepSeek-V2-Lite",
        spec=TinySpec(
            arch="deepseek2", n_layer=27, n_embd=2048, n_head=16, n_head_kv=1,  # MLA runs as MQA
            n_expert=64, n_expert_used=6, n_ff_exp=1408, n_ff=10944, n_expert_shared=2, n_dense_lead=1,
            n_vocab=102400, n_ctx_train=163840, rope_freq_base=10000.0, rms_eps=1e-6,
            q_lora_rank=0, kv_lora_rank=512, qk_rope_dim=64, qk_nope_dim=128, v_head_dim=128,
            expert_weights_scale=1.0,  # routed_scaling_factor
        ),
        # rope_scaling: yarn, factor 40, original_max_position_embeddings 4096, mscale_all_dim 0.707
        rope_scaling={"factor": 40.0, "original_context": 4096, "yarn_log_mul": 0.1 * 0.707},
        gating="softmax",  # scoring_func
        expert_weights_norm=False,  # norm_topk_prob
        default_type="q4_k",
        min_layers=2,  # first_k_dense_replace = 1: layer 0 is dense
    ),
    Preset(
        name="olmoe-1b-7b",
        source="Hugging Face config.json of allenai/OLMoE-1B-7B-0924",
        spec=TinySpec(
            arch="olmoe", n_layer=16, n_embd=2048, n_head=16, n_head_kv=16,
            n_expert=64, n_expert_used=8, n_ff_exp=1024, n_ff=1024,
            n_vocab=50304, n_ctx_train=4096, rope_freq_base=10000.0, rms_eps=1e-5,
        ),
        default_type="q4_k",
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}
"""The presets by name."""


def get_preset(name: str) -> Preset:
    """The preset ``name``; :class:`SpacError` (one line) if there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SpacError(f"unknown synth preset {name!r}; choose one of {', '.join(PRESETS)}") from None
