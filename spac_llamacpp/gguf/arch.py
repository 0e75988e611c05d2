"""What the vendored llama.cpp knows per architecture: names, limits, expert tensor names, gating.

Copied from llama.cpp src/llama-arch.cpp (architecture and tensor names), src/llama-hparams.h
(limits, gating function ids) and src/models/*.cpp (which graph builders fix the gating function).
"""

from __future__ import annotations

import re

LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024


def _words(text: str) -> list[str]:
    return text.split()


#: Architectures known to the vendored llama.cpp (src/llama-arch.cpp LLM_ARCH_NAMES).
LLAMA_ARCHITECTURES: frozenset[str] = frozenset(
    _words(
        """
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2
    qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3
    phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n
    gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse
    command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2
    deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2
    nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite
    granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe
    hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe
    seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded
    mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed maincoder kimi-linear
    kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
    """
    )
)

# --- expert gating function (llama_expert_gating_func_type, src/llama-hparams.h) -----------------
GATING_NAMES = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}

# The graph builder of these architectures passes a constant to build_moe_ffn: the
# `<arch>.expert_gating_func` key, if any, is ignored (src/models/*.cpp).
GATING_FIXED: dict[str, str] = {
    **dict.fromkeys(
        _words(
            "llama llama-embed grok nomic-bert-moe llada-moe rnd1 qwen2moe qwen3moe qwen3vlmoe qwen3next "
            "qwen35moe qwen4exp phimoe maple jamba dbrx olmoe arctic deepseek granitemoe granitehybrid "
            "granite_swa bailingmoe ernie4_5-moe hunyuan-moe grovemoe minimax-01 mistral3 gemma4 "
            "mellum"
        ),
        "softmax",
    ),
    **dict.fromkeys(["llama4", "mimo2", "nemotron_h", "nemotron_h_moe"], "sigmoid"),
    "gpt-oss": "softmax_weight",
}
# These read the key (optional) and fall back to this value when it is absent or 0.
GATING_DEFAULT: dict[str, str] = {
    "deepseek2": "softmax",  # except GLM-4.7-Lite, see layout._resolve_gating
    "mistral4": "softmax",  # uses deepseek2's hparams loader
    "deepseek2-ocr": "softmax",
    **dict.fromkeys(
        ["afmoe", "cohere2moe", "glm-dsa", "glm4moe", "glm5-next", "hy_v3", "laguna", "step35"],
        "sigmoid",
    ),
}
# These require the key (llama.cpp refuses to load without it) ...
GATING_REQUIRED = frozenset(
    _words(
        "bailingmoe2 bailingmoe3 deepseek32 deepseek4 dflash dots3note exaone-moe kimi-k3 kimi-linear "
        "lfm2moe minimax-m3"
    )
)
# ... and these read it as optional but have no default: llama.cpp aborts when it is absent.
GATING_NO_DEFAULT = frozenset(["dots1", "minimax-m2", "hy_v4", "smallthinker"])

# --- tensor names (src/llama-arch.cpp) ------------------------------------------------------------
EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate_up|gate|up|down)_(ch)?exps\.(weight|bias|scale|input_scale)")
SHEXP_RE = re.compile(r"blk\.(\d+)\.ffn_(?:gate_up|gate|up|down|gate_inp)_shexp\.[a-z_]+")
ROUTER_RE = re.compile(r"blk\.(\d+)\.(ffn_gate_inp|exp_probs_b|exp_probs_b_vl)\.(weight|bias)")
SUFFIX_KIND = {"weight": "", "bias": "_bias", "scale": "_scale", "input_scale": "_input_scale"}
SUFFIX_RANK = {"weight": 3, "bias": 2, "scale": 1, "input_scale": 1}
WEIGHT_KINDS = ("gate", "up", "down", "gate_up")
