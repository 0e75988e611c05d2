"""Token-exact text generation with timing, shared by ``spac-run``, ``spac trace`` and the benchmarks.

``Llama.create_completion`` streams text chunks but not token counts or phase timings; benchmarks
need both, so we drive ``Llama.generate`` directly and decode tokens incrementally.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import llama_cpp

from spac_llamacpp.base.errors import SpacError


@dataclass
class GenerationStats:
    """Counts and timings of one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    """Time to the first generated token (prompt evaluation plus one sample)."""
    decode_seconds: float = 0.0
    """Time from the first to the last generated token."""
    stop_reason: str = "length"
    """``length`` (``max_tokens``), ``eos``, ``context`` (the context window is full; fewer than ``max_tokens``)
    or ``interrupted`` (set by the caller)."""
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens after the first, per second of decoding."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_seconds": round(self.prompt_seconds, 6),
            "decode_seconds": round(self.decode_seconds, 6),
            "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 3),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            "stop_reason": self.stop_reason,
        }


def stream_generate(
    llm: llama_cpp.Llama,
    prompt: str,
    max_tokens: int = 64,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    stats: GenerationStats | None = None,
    **sample_kwargs: float,
) -> Iterator[str]:
    """Yield the generated text piece by piece (whole UTF-8 characters), filling ``stats``.

    ``temperature <= 0`` is greedy decoding. Stops at an end-of-generation token, ``max_tokens`` or when the
    context window is full (``stop_reason`` ``context``); a prompt the window cannot hold is a one-line
    :class:`SpacError`.
    """
    stats = stats if stats is not None else GenerationStats()
    if seed is not None:
        llm.set_seed(seed)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    stats.prompt_tokens = len(tokens)
    n_ctx = llm.n_ctx()
    if len(tokens) >= n_ctx:
        raise SpacError(f"the prompt is {len(tokens)} tokens and the context window {n_ctx}, with no room to "
                        "generate: shorten the prompt or raise the context window (--ctx, n_ctx=)")
    room = n_ctx - len(tokens)  # prompt and generated tokens together fill at most the window
    limit = min(max_tokens, room)
    llm.reset()

    pending = b""
    t0 = time.perf_counter()
    t_first = t0
    kwargs = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0, **sample_kwargs}
    if temperature <= 0:
        kwargs.update(top_k=1, top_p=1.0, min_p=0.0)
    for tok in llm.generate(tokens, temp=max(temperature, 0.0), reset=False, **kwargs):
        now = time.perf_counter()
        if stats.generated_tokens == 0:
            t_first = now
            stats.prompt_seconds = now - t0
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            stats.stop_reason = "eos"
            break
        stats.generated_tokens += 1
        stats.token_ids.append(tok)
        stats.decode_seconds = now - t_first
        pending += llm.detokenize([tok], prev_tokens=stats.token_ids[:-1])
        text, pending = _split_complete_utf8(pending)
        if text:
            yield text
        if stats.generated_tokens >= limit:
            if limit < max_tokens:
                stats.stop_reason = "context"
            break
    if pending:
        yield pending.decode("utf-8", errors="replace")


def _split_complete_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the longest prefix of whole UTF-8 characters; return (text, undecoded rest)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def greedy_continuation(llm: llama_cpp.Llama, prompt: str | bytes, n: int) -> list[int]:
    """The first ``n`` tokens greedy decoding (top-k 1, temperature 0) produces after ``prompt``
    (fewer if the model stops), through ``llm.generate``: the path speculative decoding also takes."""
    text = prompt.encode() if isinstance(prompt, str) else prompt
    out: list[int] = []
    if n <= 0:
        return out
    for tok in llm.generate(llm.tokenize(text), top_k=1, temp=0.0):
        out.append(tok)
        if len(out) == n:
            break
    return out
