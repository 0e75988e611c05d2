"""``spac chat``: an interactive chat with a model in the terminal, with the model's chat template, streamed
replies and a live status line (tok/s, expert hit rate, resident expert bytes) rendered with rich.

Lines read from stdin are user messages, except the commands ``/stats`` (the tier's stats and routing
summary as JSON), ``/reset`` (forget the conversation), ``/help`` and ``/quit`` (or end of input). On a
terminal the reply streams inside a rich ``Live`` display with the status line under it; with stdin or stdout
piped, the reply streams as plain text to stdout and the status line goes to stderr after each reply.
The conversation is trimmed from its oldest turns when it would leave less than the reply's tokens of the
context.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from spac_llamacpp.base.sizes import format_size

COMMANDS = "/stats (tier stats and routing), /reset (new conversation), /help, /quit"
_STATS_EVERY = 0.5  # seconds between tier stats queries while a reply streams


@dataclass
class ReplyStats:
    """One reply's tokens and timing."""

    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    ended: float | None = None
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token is None or self.tokens < 2:
            return None
        end = self.ended if self.ended is not None else time.perf_counter()
        return (self.tokens - 1) / max(end - self.first_token, 1e-9)


def status_line(llm: Any, reply: ReplyStats | None, tier_stats: dict[str, Any] | None = None) -> str:
    """``12 tokens · 41.3 tok/s · hit rate 87.5% · resident 6.00 MiB of experts · tier flash``."""
    st = tier_stats if tier_stats is not None else llm.stats()
    parts = []
    if reply is not None:
        tps = reply.tokens_per_second
        parts += [f"{reply.tokens} tokens", "-- tok/s" if tps is None else f"{tps:.1f} tok/s"]
    hit = st.get("hit_rate")
    tier = st.get("tier") or "none"
    if tier == "none":
        parts.append("hit rate 100% (all experts resident)" if llm.moe_info.n_expert else "dense model")
        parts.append(f"resident {format_size(llm.moe_info.total_tensor_bytes)} (whole model)")
    else:
        parts.append("hit rate n/a" if hit is None else f"hit rate {100 * hit:.1f}%")
        if "resident_expert_bytes" in st:
            parts.append(f"resident {format_size(st['resident_expert_bytes'])} of experts "
                         f"(budget {format_size(st['budget_bytes'])})")
        elif "pool_bytes" in st:
            parts.append(f"pool {format_size(st['pool_bytes'])}, {st.get('resident_experts', 0)} experts resident")
    parts.append(f"tier {tier}")
    return " · ".join(parts)


def context_tokens(llm: Any) -> int:
    """The context the conversation must fit: ``llm.n_ctx()``, or the token buffer llama-cpp-python allocated when
    smaller (llama.cpp pads a requested ``n_ctx`` up to a multiple of 256; the Python side keeps the request)."""
    n = int(llm.n_ctx())
    ids = getattr(llm, "input_ids", None)
    return min(n, len(ids)) if ids is not None and len(ids) else n


def _chat_formatter(llm: Any) -> Any:
    """The model's own chat template as a formatter (what create_chat_completion renders), or None."""
    template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode(errors="replace") if token >= 0 else ""

    return Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))


class Chat:
    """A conversation with ``llm`` (a ``spac_llamacpp.Llama``)."""

    def __init__(self, llm: Any, *, system: str | None = None, max_tokens: int | None = None,
                 temperature: float = 0.7, seed: int = 0) -> None:
        self.llm = llm
        self.system = system
        self.n_ctx = context_tokens(llm)
        self.max_tokens = max(1, min(max_tokens or 256, self.n_ctx // 2))
        self._formatter = _chat_formatter(llm)
        self.temperature = temperature
        self.seed = seed
        self.messages: list[dict[str, str]] = []
        self.reset()
        self.last: ReplyStats | None = None
        self.last_prompt_tokens = 0

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_tokens(self) -> int:
        """Tokens of the conversation as the chat template renders it (estimated without a template)."""
        if self._formatter is not None:
            try:
                prompt = self._formatter(messages=self.messages).prompt
                return len(self.llm.tokenize(prompt.encode(), add_bos=True, special=True))
            except Exception:  # noqa: BLE001 - a template this cannot render: estimate instead
                pass
        return sum(len(self.llm.tokenize(f"{m['role']}\n{m['content']}".encode(), add_bos=False)) + 16
                   for m in self.messages) + 8

    def _trim(self) -> int:
        """Drop the oldest turns until the conversation leaves ``max_tokens`` of the context; returns how many
        messages were dropped."""
        dropped = 0
        first = 1 if self.system else 0
        while len(self.messages) - first > 1 and self.prompt_tokens() + self.max_tokens > self.n_ctx:
            del self.messages[first]
            dropped += 1
        return dropped

    def stream(self, text: str) -> Any:
        """Add a user message; yields the reply's text pieces and keeps the reply in the conversation."""
        message = {"role": "user", "content": text}
        kept, self.messages = self.messages, [*self.messages[:1 if self.system else 0], message]
        alone = self.prompt_tokens()  # the message alone (after the system message): it must fit
        self.messages = [*kept, message]
        if alone >= self.n_ctx:
            self.messages.pop()
            raise ValueError(f"the message needs {alone} tokens with the template, more than the context of "
                             f"{self.n_ctx}")
        self._trim()
        self.last_prompt_tokens = self.prompt_tokens()
        reply = ReplyStats()
        self.last = reply
        pieces: list[str] = []
        try:
            chunks = self.llm.create_chat_completion(self.messages, stream=True, max_tokens=self.max_tokens,
                                                     temperature=self.temperature, seed=self.seed)
            for chunk in chunks:
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content")
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
                if piece:
                    if reply.first_token is None:
                        reply.first_token = time.perf_counter()
                    reply.tokens += 1
                    pieces.append(piece)
                    yield piece
        except ValueError:  # the message alone exceeds the context
            self.messages.pop()
            raise
        finally:
            reply.ended = time.perf_counter()
            if pieces or self.messages[-1:] == [{"role": "user", "content": text}]:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def stats_json(self) -> dict[str, Any]:
        llm = self.llm
        out: dict[str, Any] = {"stats": llm.stats(settle=0.5)}
        fit = getattr(llm, "fit", None)
        if fit is not None:
            out["fit"] = {"flags": fit.plan.flags(), "reason": fit.reason} if fit.plan is not None else fit.to_json()
        if llm.routing is not None:
            summary = llm.routing.summary()
            out["routing"] = {k: summary[k] for k in ("tokens", "steps", "moe_layers", "n_expert", "selections")}
            out["routing"]["hottest"] = {str(layer["layer"]): " ".join(f"e{e}:{c}" for e, c in layer["top_experts"][:4])
                                         for layer in summary["layers"] if layer.get("selections")}
        if self.last is not None:
            out["last_reply"] = {"tokens": self.last.tokens, "tokens_per_second": self.last.tokens_per_second,
                                 "finish_reason": self.last.finish_reason}
        out["conversation_messages"] = len(self.messages)
        return out


def run_chat(chat: Chat, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
             stderr: IO[str] | None = None, banner: str = "") -> int:
    """Read messages until ``/quit`` or end of input; returns the number of replies."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    err = Console(file=stderr or sys.stderr, highlight=False, soft_wrap=True)
    interactive = stdin.isatty() and stdout.isatty()
    out = Console(file=stdout, highlight=False) if interactive else None
    if banner:
        err.print(banner, markup=False)
    err.print(f"commands: {COMMANDS}", markup=False)
    replies = 0
    while True:
        try:
            if interactive:
                assert out is not None
                line = out.input("[bold cyan]you>[/] ")
            else:
                raw = stdin.readline()
                if not raw:
                    break
                line = raw.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/help":
            err.print(f"commands: {COMMANDS}", markup=False)
            continue
        if text == "/reset":
            chat.reset()
            err.print("conversation reset", markup=False)
            continue
        if text == "/stats":
            print(json.dumps(chat.stats_json(), indent=2), file=stdout, flush=True)
            continue
        if text.startswith("/"):
            err.print(f"unknown command {text.split()[0]}; {COMMANDS}", markup=False)
            continue
        try:
            if interactive:
                _reply_live(chat, text, out)
            else:
                _reply_plain(chat, text, stdout, err)
            replies += 1
        except ValueError as exc:  # the message alone is longer than the context
            err.print(f"error: {' '.join(str(exc).split())}; send a shorter message", markup=False)
        except KeyboardInterrupt:
            err.print("[interrupted]", markup=False)
    return replies


def _reply_plain(chat: Chat, text: str, stdout: IO[str], err: Console) -> None:
    for piece in chat.stream(text):
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    stdout.flush()
    err.print(status_line(chat.llm, chat.last), markup=False)


def _reply_live(chat: Chat, text: str, out: Console | None) -> None:
    assert out is not None
    reply = Text()
    tier_stats = chat.llm.stats()
    last_query = time.perf_counter()

    def render() -> Group:
        return Group(reply, Text(status_line(chat.llm, chat.last, tier_stats), style="dim"))

    with Live(render(), console=out, refresh_per_second=8, vertical_overflow="visible") as live:
        gen = chat.stream(text)
        try:
            for piece in gen:
                reply.append(piece)
                if time.perf_counter() - last_query > _STATS_EVERY:
                    tier_stats, last_query = chat.llm.stats(), time.perf_counter()
                live.update(render())
        finally:
            gen.close()
        tier_stats = chat.llm.stats()
        live.update(render())
