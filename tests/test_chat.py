"""``spac chat``: the model's chat template, streamed replies, /stats and /quit, the status line (stdin piped)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from spac_llamacpp.models.default import default_model_path
from spac_llamacpp.native.machine import FACTS_ENV


def chat(stdin: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != FACTS_ENV}
    return subprocess.run([sys.executable, "-c", "from spac_llamacpp.tools.cli import spac; spac()", "chat", *args],
                          input=stdin, capture_output=True, text=True, timeout=300, env={**base, **(env or {})})


def test_chat_with_the_default_model_piped():
    proc = chat("Speak of love.\n/stats\n/bogus\n\nAnd of war.\n/quit\nnot read\n", "--temp", "0", "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert "embedded default" in proc.stderr and "auto placement: all in RAM" in proc.stderr
    status = [line for line in proc.stderr.splitlines() if "tok/s" in line]
    assert len(status) == 2 and all("12 tokens" in s and "hit rate" in s and "resident" in s for s in status)
    assert "unknown command /bogus" in proc.stderr and "Traceback" not in proc.stderr
    out = proc.stdout
    start, end = out.index("{\n"), out.index("\n}\n") + 2
    stats = json.loads(out[start:end])
    assert stats["last_reply"]["tokens"] == 12 and stats["routing"]["tokens"] > 12
    assert stats["conversation_messages"] == 2 and stats["fit"]["flags"] == "--tier none"
    assert out[:start].strip() and out[end:].strip()  # a reply before /stats and one after


def test_chat_flash_tier_status_and_eof():
    proc = chat("Hello\n", str(default_model_path()), "--tier", "flash", "--budget", "8MiB", "--temp", "0", "-n", "6")
    assert proc.returncode == 0, proc.stderr
    status = [line for line in proc.stderr.splitlines() if "tok/s" in line]
    assert len(status) == 1 and "tier flash" in status[0] and "budget 8.00 MiB" in status[0]
    assert "auto placement" not in proc.stderr  # the flags decided


def test_chat_replies_match_create_chat_completion_and_history_is_trimmed():
    from spac_llamacpp.llama import Llama
    from spac_llamacpp.tools.chat import Chat, run_chat

    llm = Llama(str(default_model_path()), n_ctx=256, verbose=False, seed=0)
    try:
        want = llm.create_chat_completion([{"role": "user", "content": "Good morrow"}], max_tokens=40,
                                          temperature=0)["choices"][0]["message"]["content"]
        c = Chat(llm, max_tokens=40, temperature=0)
        assert "".join(c.stream("Good morrow")) == want
        out, err = io.StringIO(), io.StringIO()
        # long turns: the conversation keeps at most what leaves 40 tokens of the 256-token context
        text = "\n".join(["the quick brown fox jumps over the lazy dog " * 3] * 6) + "\n/quit\n"
        assert run_chat(c, stdin=io.StringIO(text), stdout=out, stderr=err) == 6
        assert c.last_prompt_tokens + c.max_tokens <= llm.n_ctx() and len(c.messages) < 12
        assert "error" not in err.getvalue()
        too_long = "word " * 300 + "\n/quit\n"
        assert run_chat(c, stdin=io.StringIO(too_long), stdout=out, stderr=err) == 0
        assert "error: the message needs" in err.getvalue() and c.messages[-1]["role"] == "assistant"
        c.reset()
        assert c.messages == []
    finally:
        llm.close()
