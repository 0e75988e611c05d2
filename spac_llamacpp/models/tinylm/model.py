"""A PyTorch model that computes exactly what llama.cpp's ``llama`` architecture computes.

Dense (Llama) or Mixture-of-Experts (Mixtral layout) per :class:`~spac_llamacpp.models.spec.TinySpec`
with ``arch="llama"``. Each piece mirrors the vendored llama.cpp (``src/models/llama.cpp``,
``llm_graph_context::build_moe_ffn``):

- pre-norm blocks with RMSNorm ``x / sqrt(mean(x^2) + eps) * w`` (``llama.attention.layer_norm_rms_epsilon``);
- attention with GQA (query head ``h`` reads kv head ``h // (n_head / n_head_kv)``), scale
  ``1/sqrt(head_dim)``, causal, no biases, and RoPE of type NORM: consecutive pairs
  ``(x[2i], x[2i+1])`` rotated by ``pos * base^(-2i/head_dim)`` (so Q/K need no permutation at export,
  unlike Hugging Face checkpoints, which use the NEOX half-split layout);
- MoE FFN: ``probs = softmax(router(x))`` over all experts, the top-k experts by probability, their
  probabilities renormalised to sum to one (``norm_w = true``, sum clamped at 6.1e-5), and
  ``sum_j w_j * down_j(silu(gate_j(x)) * up_j(x))``; dense FFN is the same SwiGLU without routing;
- final RMSNorm and an output matrix tied to the token embedding (no ``output.weight`` in the GGUF:
  llama.cpp then reuses ``token_embd.weight``).

Training-only additions (not in the exported graph): the Switch-Transformer load-balancing loss and
the router z-loss, returned by :meth:`TinyLM.forward` as auxiliary terms.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from spac_llamacpp.models.spec import TinySpec


@dataclass
class RouterStats:
    """Per-forward routing statistics of one MoE layer (for auxiliary losses and logging)."""

    balance_loss: torch.Tensor  # n_expert * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # mean(logsumexp(router logits)^2)
    load: torch.Tensor  # [n_expert] fraction of the top-k selections per expert (detached)


class RMSNorm(nn.Module):
    """llama.cpp's ``ggml_rms_norm`` followed by the weight multiply, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@functools.lru_cache(maxsize=8)
def _rope_table(t: int, hd: int, base: float) -> torch.Tensor:
    """``exp(i * pos * base^(-2j/hd))`` [t, hd/2] complex64, as ggml's rope cache computes the angles."""
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(ang), ang)


def rope_norm(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE of type NORM on ``x`` [batch, seq, heads, head_dim] at positions 0..seq-1.

    Consecutive pairs ``(x[2j], x[2j+1])`` are one complex number rotated by the position's angle.
    """
    _, t, _, hd = x.shape
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], hd // 2, 2))
    rot = xc * _rope_table(t, hd, base)[None, :, None, :]
    return torch.view_as_real(rot).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention with NORM RoPE, no biases."""

    def __init__(self, s: TinySpec) -> None:
        super().__init__()
        self.n_head, self.n_head_kv, self.hd, self.base = s.n_head, s.n_head_kv, s.head_dim, s.rope_freq_base
        self.wq = nn.Linear(s.n_embd, s.n_head * s.head_dim, bias=False)
        self.wk = nn.Linear(s.n_embd, s.n_head_kv * s.head_dim, bias=False)
        self.wv = nn.Linear(s.n_embd, s.n_head_kv * s.head_dim, bias=False)
        self.wo = nn.Linear(s.n_head * s.head_dim, s.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = rope_norm(self.wq(x).view(b, t, self.n_head, self.hd), self.base)
        k = rope_norm(self.wk(x).view(b, t, self.n_head_kv, self.hd), self.base)
        v = self.wv(x).view(b, t, self.n_head_kv, self.hd)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.n_head != self.n_head_kv,
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_head * self.hd))


class DenseFFN(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, n_embd: int, n_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, n_ff, bias=False)
        self.up = nn.Linear(n_embd, n_ff, bias=False)
        self.down = nn.Linear(n_ff, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        return self.down(F.silu(self.gate(x)) * self.up(x)), None


class MoEFFN(nn.Module):
    """Softmax top-k routed SwiGLU experts with renormalised top-k weights (Mixtral / llama.cpp)."""

    def __init__(self, s: TinySpec) -> None:
        super().__init__()
        e, f, d = s.n_expert, s.n_ff_exp, s.n_embd
        self.n_expert, self.k = e, s.n_expert_used
        self.router = nn.Linear(d, e, bias=False)
        # numpy/GGUF layouts: gate/up [E, F, D], down [E, D, F] (ggml ne reversed)
        self.gate = nn.Parameter(torch.empty(e, f, d))
        self.up = nn.Parameter(torch.empty(e, f, d))
        self.down = nn.Parameter(torch.empty(e, d, f))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, E], top-k ids [N, k], renormalised top-k weights [N, k])`` for rows ``x`` [N, D]."""
        logits = F.linear(x.float(), self.router.weight.float())  # the router stays F32 in the GGUF
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        return logits, top_i, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        logits, top_i, weights = self.route(x)
        flat_e = top_i.flatten()
        # Group the (token, slot) pairs by expert into a padded [E, C, D] batch (C = the busiest
        # expert's count) so all experts run as three batched matmuls: far faster on CPU than a
        # Python loop of small matmuls, and the padding rows are zeros that cost only FLOPs.
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        tok = order // self.k
        counts = torch.bincount(flat_e, minlength=self.n_expert)
        offsets = torch.cumsum(counts, 0) - counts
        slot = torch.arange(flat_e.numel(), device=x.device) - offsets[sorted_e]
        cap = int(counts.max())
        xs = x.new_zeros(self.n_expert, cap, shape[-1])
        xs[sorted_e, slot] = x[tok]
        h = F.silu(torch.bmm(xs, self.gate.transpose(1, 2).to(xs.dtype))) * torch.bmm(
            xs, self.up.transpose(1, 2).to(xs.dtype)
        )
        ys = torch.bmm(h, self.down.transpose(1, 2).to(h.dtype))  # [E, C, D]
        y = ys[sorted_e, slot].float() * weights.flatten()[order][:, None]
        out = torch.zeros(n, shape[-1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)

        probs = logits.softmax(-1)
        load = counts.float() / (n * self.k)
        stats = RouterStats(
            balance_loss=self.n_expert * (load.detach() * probs.mean(0)).sum(),
            z_loss=torch.logsumexp(logits, -1).pow(2).mean(),
            load=load.detach(),
        )
        return out.reshape(shape).to(x.dtype), stats


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``h + ffn(norm(h))``."""

    def __init__(self, s: TinySpec) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(s.n_embd, s.rms_eps)
        self.attn = Attention(s)
        self.ffn_norm = RMSNorm(s.n_embd, s.rms_eps)
        self.ffn: MoEFFN | DenseFFN = MoEFFN(s) if s.is_moe else DenseFFN(s.n_embd, s.n_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        h = x + self.attn(self.attn_norm(x))
        y, stats = self.ffn(self.ffn_norm(h))
        return h + y, stats


class TinyLM(nn.Module):
    """A llama-architecture language model (MoE if ``spec.n_expert > 0``) with tied embeddings."""

    def __init__(self, spec: TinySpec) -> None:
        super().__init__()
        if spec.arch != "llama":
            raise ValueError(f"TinyLM implements the llama architecture only, not {spec.arch!r}")
        self.spec = spec
        self.tok_embd = nn.Embedding(spec.n_vocab, spec.n_embd)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.output_norm = RMSNorm(spec.n_embd, spec.rms_eps)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), norms 1."""
        std = 0.02
        res_std = std / math.sqrt(2 * self.spec.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "ffn.down", "ffn.down.weight")):
                nn.init.normal_(p, 0.0, res_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[RouterStats]]:
        """Logits [batch, seq, n_vocab] (float32) of ``tokens`` [batch, seq], and per-MoE-layer router stats."""
        x = self.tok_embd(tokens)
        stats: list[RouterStats] = []
        for block in self.blocks:
            x, st = block(x)
            if st is not None:
                stats.append(st)
        x = self.output_norm(x)
        return F.linear(x, self.tok_embd.weight.to(x.dtype)).float(), stats

    # ----------------------------------------------------------------------------------------
    # GGUF tensors

    def gguf_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Every tensor under its llama.cpp name, float32, numpy shape order (ggml ``ne`` reversed)."""
        return [(name, p.detach().float().cpu().numpy().copy()) for name, p in self.gguf_params().items()]

    def load_gguf_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Set every parameter from ``tensors`` (as :meth:`gguf_tensors` names and shapes them)."""
        params = self.gguf_params()
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ValueError(f"missing tensors: {', '.join(missing[:5])}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.from_numpy(np.array(tensors[name], dtype=np.float32).reshape(p.shape)))

    def gguf_params(self) -> dict[str, torch.Tensor]:
        """The parameters under their llama.cpp tensor names, in GGUF file order."""
        out: dict[str, torch.Tensor] = {
            "token_embd.weight": self.tok_embd.weight,
            "output_norm.weight": self.output_norm.weight,
        }
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}."
            out |= {
                p + "attn_norm.weight": b.attn_norm.weight,
                p + "attn_q.weight": b.attn.wq.weight,
                p + "attn_k.weight": b.attn.wk.weight,
                p + "attn_v.weight": b.attn.wv.weight,
                p + "attn_output.weight": b.attn.wo.weight,
                p + "ffn_norm.weight": b.ffn_norm.weight,
            }
            if isinstance(b.ffn, MoEFFN):
                out |= {
                    p + "ffn_gate_inp.weight": b.ffn.router.weight,
                    p + "ffn_gate_exps.weight": b.ffn.gate,
                    p + "ffn_up_exps.weight": b.ffn.up,
                    p + "ffn_down_exps.weight": b.ffn.down,
                }
            else:
                out |= {
                    p + "ffn_gate.weight": b.ffn.gate.weight,
                    p + "ffn_up.weight": b.ffn.up.weight,
                    p + "ffn_down.weight": b.ffn.down.weight,
                }
        return out


@torch.no_grad()
def sample_text(model: TinyLM, prompt_ids: list[int], n: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """``n`` tokens generated after ``prompt_ids`` (greedy at ``temperature`` 0), without a KV cache."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids[-model.spec.n_ctx_train :]]))
        last = logits[0, -1]
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial((last / temperature).softmax(-1), 1, generator=gen))
        ids.append(nxt)
    model.train(was_training)
    return ids[len(prompt_ids) :]
