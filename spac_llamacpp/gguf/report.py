"""The plain-text report of ``spac inspect``: one table row per run of similar MoE blocks."""

from __future__ import annotations

from typing import Any

from spac_llamacpp.gguf.layout import layer_list
from spac_llamacpp.gguf.model import MoEModelInfo


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_report(info: MoEModelInfo) -> str:
    """A concise human-readable summary (plain text, one table row per run of similar blocks)."""
    total = info.total_tensor_bytes or 1
    lines = [
        f"file          {info.path}  ({_fmt_bytes(info.file_size)}, GGUF v{info.gguf_version}, "
        f"{info.tensor_count} tensors)",
        f"model         {info.architecture}" + (f"  '{info.name}'" if info.name else ""),
        f"blocks        {info.block_count}  (n_embd {info.n_embd})",
    ]
    if not info.is_moe:
        lines.append("experts       none (dense model)")
        lines.append(f"weights       {_fmt_bytes(info.non_expert_bytes)}")
        lines += [f"note          {n}" for n in info.notes]
        return "\n".join(lines)
    ks = sorted(set(info.n_expert_used[il] for il in info.moe_layers))
    k_txt = str(ks[0]) if len(ks) == 1 else f"{ks[0]}..{ks[-1]} (per layer)"
    lines += [
        f"experts       {info.n_expert} routed, top-{k_txt} used, {info.n_expert_shared} shared"
        + (f", ff {info.expert_ff_length}" if info.expert_ff_length else ""),
        f"gating        {info.gating} ({info.gating_source})"
        + ("  + selection bias (exp_probs_b)" if info.has_router_bias else ""),
        f"MoE blocks    {layer_list(info.moe_layers)}  ({len(info.moe_layers)})"
        + (f"; dense: {layer_list(info.dense_layers)}" if info.dense_layers else ""),
        f"expert bytes  {_fmt_bytes(info.expert_bytes)} ({100 * info.expert_bytes / total:.1f}%); "
        f"other {_fmt_bytes(info.non_expert_bytes)} (shared experts {_fmt_bytes(info.shared_expert_bytes)}, "
        f"routers {_fmt_bytes(info.router_bytes)})",
        "",
    ]
    header = ("blocks", "k", "tensors", "per expert", "per block")
    rows: list[tuple[str, ...]] = []
    prev_sig: tuple[Any, ...] | None = None
    run: list[int] = []

    def flush() -> None:
        if run and prev_sig is not None:
            k, tensors, per_expert = prev_sig
            rows.append(
                (
                    layer_list(run),
                    str(k),
                    tensors,
                    _fmt_bytes(per_expert),
                    _fmt_bytes(per_expert * info.n_expert),
                )
            )

    for il in info.moe_layers:
        ts = info.layer_tensors(il)
        groups: dict[str, list[str]] = {}
        for t in ts:
            if not t.is_chunk:
                groups.setdefault(t.ggml_type, []).append(t.kind)
        desc = " ".join(f"{','.join(kinds)}:{ty}" for ty, kinds in groups.items())
        sig = (info.n_expert_used[il], desc, info.layer_expert_bytes(il))
        if sig != prev_sig or (run and run[-1] != il - 1):
            flush()
            run = []
            prev_sig = sig
        run.append(il)
    flush()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (1, 3, 4) else '<'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt.format(*r) for r in rows]
    lines += [f"note          {n}" for n in info.notes]
    return "\n".join(lines)
