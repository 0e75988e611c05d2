"""Command line: ``spac-run`` (generate text) and ``spac`` (inspect, trace, build-native)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from spac_llamacpp.base.errors import SpacError

DEFAULT_CTX = 2048


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and exit status 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpacError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (ValueError, RuntimeError, OSError) as exc:  # llama_cpp's load/decode failures
            _fail(" ".join(f"{type(exc).__name__}: {exc}".split()))

    return wrapper


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that loads a model."""
    opts = [
        click.option("--ctx", "n_ctx", type=int, default=None,
                     help=f"Context length [default: {DEFAULT_CTX}, or the model's training context if shorter]."),
        click.option("--threads", "n_threads", type=int, default=None, help="CPU threads (default: llama.cpp's)."),
        click.option("--gpu-layers", "n_gpu_layers", type=int, default=None,
                     help="Layers offloaded to the GPU (-1: all) [default: 0, or what --tier auto chooses]."),
        click.option("-ot", "--override-tensor", "override_tensor", default=None,
                     help="Tensor placement, llama.cpp syntax: 'REGEX=DEVICE,...' e.g. '\\.ffn_.*_exps=CPU'."),
        click.option("--no-repack", is_flag=True,
                     help="Keep CPU weights file-backed (use_extra_bufts=False): no repacking into anonymous memory."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
        click.option("--draft", "draft", type=click.Path(dir_okay=False), default=None,
                     help="Speculative decoding with this draft GGUF (same tokenizer as MODEL)."),
        click.option("--lookup", is_flag=True, help="Speculative decoding with prompt lookup (n-gram) drafts."),
        click.option("--self-draft", is_flag=True,
                     help="Speculative decoding with the model itself drafting on its resident experts only."),
        click.option("--self-draft-experts", type=int, default=None,
                     help="With --self-draft: experts per token while drafting (default: the model's)."),
        click.option("--n-draft", type=int, default=4, show_default=True, help="Draft tokens per step (start value)."),
        click.option("--fixed-draft", is_flag=True, help="Keep the draft length fixed (default: adaptive)."),
        click.option("--tier", type=click.Choice(["auto", "none", "flash", "vram"]), default=None,
                     help="Manage expert placement: 'flash' keeps at most --budget of routed experts in RAM and "
                          "streams the rest from the GGUF; 'vram' (patched llama.cpp) puts non-expert weights on "
                          "the GPU and the hottest experts in a GPU pool sized from --vram-budget; 'auto' chooses "
                          "from the header and this machine's free memory (`spac fit`; the default of spac-run, "
                          "serve and chat; explicit --budget, --vram-budget, --gpu-layers or -ot win); 'none': "
                          "llama.cpp as is (the default of the other commands)."),
        click.option("--budget", default=None,
                     help="RAM for routed experts with --tier flash, e.g. 6GiB, or 50% of the model's routed "
                          "expert bytes."),
        click.option("--vram-budget", default=None,
                     help="GPU memory for the model with --tier vram (non-expert weights, KV cache, compute "
                          "reserve; the rest is the expert pool), e.g. 6GiB; 50%: a pool of half the routed expert "
                          "bytes plus the rest."),
        click.option("--pool-on-host", is_flag=True,
                     help="With --tier vram: put the expert pool in host memory (testing without a GPU)."),
        click.option("--policy", default=None, metavar="NAME",
                     help="Who places the experts of --tier flash or vram: spac (ours, the default), or a baseline "
                          "on the same engine and budget: lru (per-layer LRU admission of demand, llama.cpp PR "
                          "#27861), lfu, pin (a static hot set from --warm-profile or the first 16 steps), "
                          "hysteresis (MoE-SpAc's rule)."),
        click.option("--flash-threads", type=int, default=2, show_default=True,
                     help="Flash-tier engine worker threads."),
        click.option("--pin-fraction", type=float, default=0.0, show_default=True,
                     help="Share of the budget locked in RAM (mlock) for the hottest experts."),
        click.option("--cache-prior", "cache_prior", type=float, default=None,
                     help="Cache-aware routing (opt-in, changes outputs): prefer resident experts with this "
                          "lambda, e.g. 0.15."),
        click.option("--cache-experts", type=int, default=None,
                     help="With --cache-prior and no tier: simulated LRU cache size per layer (default: half)."),
        click.option("--warm-profile", default=None, type=click.Path(dir_okay=False, exists=True),
                     help="Start the flash or vram tier's residency from a saved profile (`spac profile`) or trace."),
        click.option("--replay", "replay", default=None, type=click.Path(dir_okay=False),
                     help="Force every MoE layer's expert selection to this routing trace's (.npz; token t of the "
                          "context takes token t of the trace): real routing on any model of the same shape. "
                          "Output text is meaningless, timings are real."),
        click.option("--replay-end", type=click.Choice(["cycle", "stop"]), default="cycle", show_default=True,
                     help="With --replay, past the trace's end: cycle over its tokens after the prompt step, or "
                          "stop generating."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def default_ctx(model: str, n_ctx: int | None) -> int:
    """``n_ctx`` as given, else ``DEFAULT_CTX`` clamped to the model's training context."""
    if n_ctx is not None:
        if n_ctx < 1:
            raise SpacError(f"--ctx must be at least 1, not {n_ctx}")
        return n_ctx
    from spac_llamacpp.gguf.info import read_model_header

    trained = read_model_header(model).context_length
    return min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX


def _load(model: str, n_ctx: int | None, n_threads: int | None, n_gpu_layers: int | None, override_tensor: str | None,
          no_repack: bool, verbose: bool, draft: str | None, lookup: bool, n_draft: int, fixed_draft: bool,
          self_draft: bool = False, self_draft_experts: int | None = None, tier: str | None = None,
          budget: str | None = None, vram_budget: str | None = None, pool_on_host: bool = False,
          policy: str | None = None, flash_threads: int = 2, pin_fraction: float = 0.0,
          warm_profile: str | None = None, cache_prior: float | None = None, cache_experts: int | None = None,
          seed: int = 0, routing_history: int | None = 1024, note: Callable[[str], None] | None = None,
          speculation_history: int | None = 256, replay: str | None = None, replay_end: str = "cycle",
          on_fit: Callable[[Any], None] | None = None):
    from spac_llamacpp.llama import Llama
    from spac_llamacpp.speculation.drafts import PromptLookupDraft

    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    fit = None
    if tier == "auto":  # issue 17: tools/fit.py; explicit flags win
        from spac_llamacpp.tools.fit import resolve_cli_auto

        fit = resolve_cli_auto(model, default_ctx(model, n_ctx), budget, vram_budget, n_gpu_layers, override_tensor)
        tier, budget, vram_budget = fit.tier, fit.budget, fit.vram_budget
        n_gpu_layers = fit.n_gpu_layers if n_gpu_layers is None else n_gpu_layers
    elif tier == "none":
        tier = None
    n_gpu_layers = n_gpu_layers or 0
    if sum([bool(draft), lookup, self_draft]) > 1:
        raise SpacError("choose one draft source: --draft PATH, --lookup or --self-draft")
    if self_draft_experts is not None and not self_draft:
        raise SpacError("--self-draft-experts needs --self-draft")
    if n_draft < 1:
        raise SpacError(f"--n-draft must be at least 1, not {n_draft}")
    if tier == "flash" and budget is None:
        raise SpacError("--tier flash needs --budget SIZE (RAM for routed experts, e.g. 6GiB)")
    if budget is not None and tier is None:
        raise SpacError("--budget needs --tier flash")
    if tier == "flash" and not no_repack:
        no_repack = True  # experts must stay file-backed
    if tier == "vram" and vram_budget is None:
        raise SpacError("--tier vram needs --vram-budget SIZE (GPU memory for the model, e.g. 6GiB)")
    if vram_budget is not None and tier != "vram":
        raise SpacError("--vram-budget needs --tier vram")
    if pool_on_host and tier != "vram":
        raise SpacError("--pool-on-host needs --tier vram")
    if warm_profile and tier not in ("flash", "vram"):
        raise SpacError("--warm-profile needs --tier flash or --tier vram")
    if replay is not None and cache_prior is not None:
        raise SpacError("--replay and --cache-prior both rewrite the router probabilities; use one")
    if policy is not None:
        from spac_llamacpp.planning.policies import check_policy

        check_policy(policy)
        if tier not in ("flash", "vram"):
            why = "--tier auto chose none: the model fits in RAM" if fit is not None else "--tier none has none"
            raise SpacError(f"--policy {policy} needs --tier flash (with --budget) or --tier vram (with "
                            f"--vram-budget); {why}")
    flash = vram = None
    if tier == "flash":
        flash = {"threads": flash_threads, "pin_fraction": pin_fraction, "profile": warm_profile}
    if tier == "vram":
        vram = {"on_host": pool_on_host, "profile": warm_profile}
    llm = Llama(
        model,
        draft_model_path=draft,
        draft_model=PromptLookupDraft(n_draft) if lookup else None,
        n_draft=n_draft,
        adaptive_draft=not fixed_draft,
        speculation_history=speculation_history,
        n_ctx=default_ctx(model, n_ctx),
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        tensor_buft_overrides=override_tensor,
        use_extra_bufts=False if no_repack else None,
        seed=seed,
        verbose=verbose,
        routing_history=routing_history,
        tier=tier,
        budget=budget,
        flash_options=flash,
        vram_budget=vram_budget,
        vram_options=vram,
        policy=policy,
        cache_prior=cache_prior,
        cache_prior_options={"cache_experts": cache_experts} if cache_experts is not None else None,
        self_draft=(self_draft_experts or True) if self_draft else False,
        routing_replay=replay,
        replay_end=replay_end,
    )
    if replay is not None:
        line = f"routing replayed from {replay}: output text is meaningless"
        if note is not None:
            note(line)  # spac-run --stats json: into the JSON's notes
        else:
            click.echo(line, err=True)
    llm.fit = fit
    if fit is not None and on_fit is not None:  # once loaded: every expected failure stays one error line
        on_fit(fit)
    return llm


def _echo_fit(choice: Any) -> None:
    """What --tier auto chose, on stderr (nothing when an explicit flag decided: the flags say it)."""
    if choice.plan is not None:
        for line in choice.lines():
            click.echo(line, err=True)


def _vram_line(st: dict[str, Any]) -> str:
    from spac_llamacpp.base.sizes import format_size

    hit = "n/a" if st["hit_rate"] is None else f"{100 * st['hit_rate']:.1f}%"
    where = "host memory" if st["pool_on_host"] else "VRAM"
    return (f"vram tier: expert pool {format_size(st['pool_bytes'])} in {where} ({'+'.join(map(str, st['slots']))} "
            f"slots, {st['resident_experts']} experts resident) of a {format_size(st['vram_budget_bytes'])} budget; "
            f"pool hit rate {hit}; {st['copies_done']} copies ({format_size(st['bytes_copied'])}){_policy_note(st)}")


def _policy_note(st: dict[str, Any]) -> str:
    """``; policy NAME`` for a baseline policy (nothing for ours, the default)."""
    policy = st.get("policy")
    return f"; policy {policy}" if policy and policy != "spac" else ""


def _replay_line(rp: dict[str, Any]) -> str:
    end = f"cycled from token {rp['cycle_start']}" if rp["end"] == "cycle" else "stop"
    return (f"routing replay: {rp['rows_forced']} (token, layer) rows forced from {rp['trace']} "
            f"({rp['trace_tokens']} tokens; past its end: {end}; {rp['rows_wrapped']} rows past it, "
            f"{rp['rows_free']} left to the model, {rp['mismatched_rows']} mismatched); {rp['note']}")


def _routing_lines(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"routing: {summary['tokens']} tokens in {summary['steps']} steps through {summary['moe_layers']} MoE layers "
        f"x {summary['n_expert']} experts ({summary['selections']} expert selections, "
        f"{summary['bad_ids']} bad ids)"
    ]
    for layer in summary["layers"]:
        if not layer.get("selections"):
            continue
        hot = ", ".join(f"e{e}:{c}" for e, c in layer["top_experts"])
        lines.append(
            f"  layer {layer['layer']:>3}: {layer['experts_used']:>4} experts used, "
            f"balance {layer['normalized_entropy']:.2f}, hottest {hot}"
        )
    return lines


def _flash_line(st: dict[str, Any], tokens: int) -> str:
    from spac_llamacpp.base.sizes import format_size

    hit = "n/a" if st["hit_rate"] is None else f"{100 * st['hit_rate']:.1f}%"
    read = st["read_bytes"]
    per_token = f" ({format_size(read / max(tokens, 1))}/token)" if read is not None else ""
    return (f"flash tier: {format_size(st['resident_expert_bytes'])} of routed experts resident "
            f"(budget {format_size(st['budget_bytes'])}, max at a step boundary "
            f"{format_size(st['max_resident_at_check'])}; {st['resident_experts']} experts; non-expert weights "
            f"{format_size(st['non_expert_bytes'])}); expert hit rate {hit}; read from disk "
            f"{format_size(read or 0)}{per_token}{_policy_note(st)}")


@click.command(name="spac-run")
@click.argument("model", required=False)
@click.option("-p", "--prompt", default="Once upon a time", show_default=True, help="Prompt text.")
@click.option("-n", "--n-predict", "n_predict", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--stats", type=click.Choice(["text", "json"]), is_flag=False, flag_value="text", default=None,
              help="After the text, print tokens/s and a routing summary to stderr ('--stats json': as JSON).")
@click.option("--stats-file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON stats to this file.")
@model_options
@friendly_errors
def spac_run(model: str | None, prompt: str, n_predict: int, seed: int, temp: float, stats: str | None,
             stats_file: str | None, **load_kw: Any) -> None:
    """Generate text from MODEL (a MoE GGUF), streaming it to stdout.

    Placement is automatic (--tier auto: all in RAM, the flash or the vram tier, from the header and this
    machine's free memory, as `spac fit` shows); --tier none runs llama.cpp as is. Without MODEL, runs the
    embedded default model.
    """
    from spac_llamacpp.models.default import DEFAULT_LABEL, default_model_path
    from spac_llamacpp.tools.generate import GenerationStats, stream_generate

    notes: list[str] = []  # stderr lines; with --stats json they go into the JSON, so that stderr is JSON

    def note(line: str) -> None:
        if stats == "json":
            notes.append(line)
        else:
            click.echo(line, err=True)

    if model is None:
        note(f"spac-run: no model given; using the {DEFAULT_LABEL}")
        model = str(default_model_path())
    if n_predict < 1:
        raise SpacError(f"--n-predict must be at least 1, not {n_predict}")
    load_kw["tier"] = load_kw.get("tier") or "auto"  # issue 17: automatic placement by default
    with _warnings_into(notes if stats == "json" else None):
        t_load = time.perf_counter()
        llm = _load(model, seed=seed, note=note, **load_kw)
        load_seconds = time.perf_counter() - t_load

        gen = GenerationStats()
        click.echo(prompt, nl=False)
        # what --tier auto chose goes to stderr once the prompt was accepted (a prompt the context cannot
        # hold stays a one-line error); with --stats json it is the report's "fit"
        fit_pending = stats != "json" and llm.fit is not None
        try:
            for piece in stream_generate(llm, prompt, n_predict, temperature=temp, seed=seed, stats=gen):
                if fit_pending:
                    fit_pending = False
                    _echo_fit(llm.fit)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:  # Ctrl-C: keep what was generated, say what it was, exit 130
            gen.stop_reason = "interrupted"
        click.echo()
        if fit_pending:
            _echo_fit(llm.fit)
        if llm.replay is not None and llm.replay.ended:
            gen.stop_reason = "trace end"
        if gen.stop_reason == "context":
            trained = llm.moe_info.context_length
            note(f"spac-run: stopped after {gen.generated_tokens} of {n_predict} tokens: the context window "
                 f"({llm.n_ctx()} tokens, the prompt's {gen.prompt_tokens} included) is full; pass --ctx to raise "
                 "it" + (f" (the model was trained on {trained})" if trained else ""))
        if gen.stop_reason == "interrupted":
            note(f"spac-run: interrupted: {gen.generated_tokens} tokens generated in "
                 f"{gen.prompt_seconds + gen.decode_seconds:.2f} s after a {gen.prompt_tokens}-token prompt")
        _report(llm, model, load_seconds, gen, stats, stats_file, notes)
    llm.close()
    if gen.stop_reason == "interrupted":
        sys.exit(130)


class _NoteHandler(logging.Handler):
    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(f"{record.levelname.lower()}: {record.getMessage()}")


@contextlib.contextmanager
def _warnings_into(notes: list[str] | None) -> Iterator[None]:
    """Log warnings go into ``notes`` (not to stderr) while the block runs; nothing changes for None."""
    if notes is None:
        yield
        return
    handler = _NoteHandler(notes)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _report(llm: Any, model: str, load_seconds: float, gen: Any, stats: str | None, stats_file: str | None,
            notes: list[str]) -> None:
    """spac-run's stats: stderr (text or JSON) and ``--stats-file``."""
    report: dict[str, Any] = {"model": model, "load_seconds": round(load_seconds, 3), **gen.to_json()}
    if llm.fit is not None:
        report["fit"] = llm.fit.to_json()
    if llm.routing is not None:
        report["routing"] = llm.routing.summary()
    if llm.speculation is not None:
        report["speculation"] = llm.speculation.summary()
    if llm.flash is not None:
        report["flash"] = llm.stats(settle=5.0)
    if llm.vram is not None:
        report["vram"] = llm.stats(settle=1.0)
    if llm.cache_prior is not None:
        report["cache_prior"] = llm.cache_prior.stats()
    if llm.replay is not None:
        report["replay"] = llm.replay.stats()
    report["notes"] = notes
    if stats == "json":
        click.echo(json.dumps(report), err=True)
    elif stats == "text":
        click.echo(
            f"\n{gen.prompt_tokens} prompt tokens in {gen.prompt_seconds:.3f} s "
            f"({gen.prompt_tokens_per_second:.1f} tok/s); {gen.generated_tokens} generated in "
            f"{gen.decode_seconds:.3f} s ({gen.decode_tokens_per_second:.1f} tok/s decode); stop: {gen.stop_reason}",
            err=True,
        )
        if "speculation" in report:
            sp = report["speculation"]
            click.echo(f"speculation ({sp['provider']}): {sp['accepted']}/{sp['drafted']} drafts accepted "
                       f"({100 * sp['acceptance_rate']:.1f}%) in {sp['verifications']} verifications; "
                       f"draft length now {sp['n_draft_now']}", err=True)
        if "flash" in report:
            click.echo(_flash_line(report["flash"], gen.generated_tokens), err=True)
        if "vram" in report:
            click.echo(_vram_line(report["vram"]), err=True)
        if "cache_prior" in report:
            cp = report["cache_prior"]
            miss = "n/a" if cp["miss_rate"] is None else f"{100 * cp['miss_rate']:.1f}%"
            changed = "n/a" if cp["changed_rate"] is None else f"{100 * cp['changed_rate']:.1f}%"
            click.echo(f"cache-aware routing: lambda {cp['lambda']}, expert miss rate {miss}, "
                       f"selections changed {changed}", err=True)
        if "replay" in report:
            click.echo(_replay_line(report["replay"]), err=True)
        if "routing" in report:
            for line in _routing_lines(report["routing"]):
                click.echo(line, err=True)
        else:
            click.echo("routing: model has no routed experts", err=True)
    if stats_file:
        Path(stats_file).write_text(json.dumps(report, indent=2) + "\n")


@click.group()
@click.version_option(package_name="spac-llamacpp")
@click.option("-v", "--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def spac(log_level: str) -> None:
    """spac-llamacpp tools for Mixture-of-Experts GGUF models."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


@spac.command(name="inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@friendly_errors
def inspect_cmd(model: str, as_json: bool) -> None:
    """Show the MoE structure of MODEL from its GGUF header (no weights are read)."""
    from spac_llamacpp.gguf.info import format_report, inspect_model

    info = inspect_model(model)
    click.echo(json.dumps(info.to_json(), indent=2) if as_json else format_report(info))


def prompt_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """-p (repeatable), -f prompts.txt and -n, for commands that run a list of prompts."""
    fn = click.option("-n", "--n-predict", "n_predict", type=int, default=64, show_default=True,
                      help="Tokens generated per prompt.")(fn)
    fn = click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="File with one prompt per line.")(fn)
    return click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt (repeatable).")(fn)


def _gather_prompts(prompts: tuple[str, ...], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        out += [line.strip() for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    if not out:
        raise SpacError("no prompt given; pass -p PROMPT or -f prompts.txt")
    return out


class _CommandWithSubcommands(click.Group):
    """A command that also has subcommands: ``spac trace import FILE ...`` runs the subcommand ``import``,
    anything else (``spac trace MODEL -p ...``, ``spac trace --help``) goes to the command itself."""

    def __init__(self, command: click.Command) -> None:
        super().__init__(name=command.name, help=command.help, short_help=command.short_help)
        self.own_command = command

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if args and args[0] in self.commands:
            return super().make_context(info_name, args, parent, **extra)
        return self.own_command.make_context(info_name, args, parent, **extra)


@click.command(name="trace")
@click.argument("model")
@prompt_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trace file (.npz).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True)
@model_options
@friendly_errors
def trace_cmd(model: str, prompts: tuple[str, ...], prompt_file: str | None, n_predict: int, output: str,
              seed: int, temp: float, **load_kw: Any) -> None:
    """Record a routing trace of MODEL: per-step, per-layer expert ids of every token.

    `spac trace import FILE -o OUT.npz --format route-csv|jsonl` imports a trace recorded elsewhere.
    """
    from spac_llamacpp.observe.trace import RoutingTrace
    from spac_llamacpp.tools.generate import GenerationStats, stream_generate
    from spac_llamacpp.tools.progress import token_progress

    all_prompts = _gather_prompts(prompts, prompt_file)
    llm = _load(model, seed=seed, routing_history=None, speculation_history=None, **load_kw)
    if llm.routing is None:
        raise SpacError(f"{model} has no routed experts; `spac trace` needs a Mixture-of-Experts model")
    runs = []
    bar = token_progress(len(all_prompts) * n_predict, "trace")
    for i, prompt in enumerate(all_prompts):
        gen = GenerationStats()
        first_step = llm.routing.n_steps
        for _ in stream_generate(llm, prompt, n_predict, temperature=temp, seed=seed + i, stats=gen):
            bar.update(1)
        if llm.replay is not None and llm.replay.ended:
            gen.stop_reason, llm.replay.ended = "trace end", False
        runs.append({"prompt": prompt, "first_step": first_step, **gen.to_json()})
    bar.close()
    meta = {"model": str(Path(model).resolve()), "architecture": llm.moe_info.architecture, "runs": runs}
    if llm.replay is not None:  # the routing is the input trace's, the text meaningless
        meta["replay"] = llm.replay.stats()
    if llm.speculation is not None:
        meta["speculation"] = llm.speculation.summary()
    if llm.moe_info.expert_order:  # a `spac patch`ed model: ids are positions; this maps them back
        meta["expert_order"] = {str(b): list(o) for b, o in llm.moe_info.expert_order.items()}
    trace = RoutingTrace.from_log(llm.routing, meta, llm.speculation)
    trace.save(output)
    full = sum(r["stop_reason"] == "context" for r in runs)
    if full:
        click.echo(f"spac trace: {full} of {len(runs)} prompts stopped before -n {n_predict}: the context window "
                   f"({llm.n_ctx()} tokens, prompt included) is full; pass --ctx to raise it", err=True)
    click.echo(f"wrote {output}: {trace.n_tokens} tokens, {trace.n_steps} steps, "
               f"{len(trace.moe_layers)} MoE layers x {trace.n_expert} experts", err=True)
    llm.close()


trace_group = _CommandWithSubcommands(trace_cmd)
spac.add_command(trace_group)


@trace_group.command(name="import")
@click.argument("source", metavar="FILE")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trace file (.npz) to write.")
@click.option("--format", "fmt", type=click.Choice(["route-csv", "jsonl"]), default=None,
              help="Source format (default: from the extension: .csv route-csv, .jsonl jsonl).")
@click.option("--n-expert", type=int, default=None,
              help="Experts per layer where the source does not say (default: the largest id + 1).")
@click.option("--expert-bytes", default=None,
              help="Size of one expert (every MoE layer), e.g. 84MiB: replaces the sizes the source records.")
@click.option("--layers", type=int, default=None,
              help="Keep only the first N MoE layers (to replay on a model made by `spac synth --layers N`).")
@friendly_errors
def trace_import_cmd(source: str, output: str, fmt: str | None, n_expert: int | None,
                     expert_bytes: str | None, layers: int | None) -> None:
    """Import a public routing trace FILE into a trace (.npz) for eval-utility, plot and simulate.

    route-csv: `#` header lines (n_layer, n_expert, n_expert_used, per-layer expert_bytes), then
    turn,phase,step,layer,slot,expert,...: each turn a prompt, its prompt tokens one step, each decoded
    token a step. jsonl: one {problem_id, layer, experts, token_idx} object per token and layer; every
    token is a decode step of its own (the format records no prompt).
    """
    from spac_llamacpp.base.sizes import format_size, parse_size
    from spac_llamacpp.observe.trace_import import format_for, import_trace

    fmt = fmt or format_for(source)
    if fmt is None:
        raise SpacError(f"cannot tell the format of {source} from its name; pass --format route-csv or jsonl")
    size = parse_size(expert_bytes) if expert_bytes is not None else None
    trace = import_trace(source, fmt, n_expert=n_expert, expert_bytes=size)
    if layers is not None:
        trace = trace.first_layers(layers)
    trace.save(output)
    layout = trace.layout
    runs = trace.meta["runs"]
    sizes = "no expert sizes (pass --expert-bytes)"
    if layout is not None and layout.expert_bytes:
        lo, hi = min(layout.expert_bytes), max(layout.expert_bytes)
        sizes = f"{format_size(lo)} per expert" if lo == hi else f"{format_size(lo)}..{format_size(hi)} per expert"
    missing = trace.meta["imported"]["missing_cells"]
    click.echo(f"wrote {output}: {trace.n_tokens} tokens, {trace.n_steps} steps, {len(runs)} prompts, "
               f"{len(trace.moe_layers)} MoE layers x {trace.n_expert} experts (top-{trace.ids.shape[2]}), {sizes}"
               + (f"; {missing} (token, layer) without a row" if missing else ""), err=True)


@spac.command(name="build-native")
@click.option("--force", is_flag=True, help="Rebuild even if a matching build exists.")
@friendly_errors
def build_native_cmd(force: bool) -> None:
    """Compile the native module against the installed llama-cpp-python."""
    from spac_llamacpp.native import module as native

    click.echo(str(native.build(force=force)))


@spac.command(name="eval-utility")
@click.argument("trace_path", metavar="TRACE")
@click.option("--budget-experts", "budget", type=int, required=True, help="Experts kept per MoE layer.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write all scores as JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False), default=None,
              help="Plot hit rate vs budget (all budgets 1..experts) to this PNG.")
@friendly_errors
def eval_utility_cmd(trace_path: str, budget: int, json_out: str | None, png_out: str | None) -> None:
    """Score utility estimators on TRACE: hit rate of keeping the top-N experts per layer."""
    from spac_llamacpp.observe.trace import RoutingTrace
    from spac_llamacpp.sim.utility_eval import evaluate, plot_sweep, sweep

    trace = RoutingTrace.load(trace_path)
    scores = evaluate(trace, budget)
    click.echo(f"{trace_path}: {trace.n_steps} steps, {trace.n_tokens} tokens, {len(trace.moe_layers)} MoE layers "
               f"x {trace.n_expert} experts; keeping {budget} per layer")
    click.echo(f"{'policy':<12} {'hit rate':>9} {'loads/step':>11} {'moves/step':>11}")
    for s in scores:
        click.echo(f"{s.policy:<12} {s.hit_rate:>9.4f} {s.loads_per_step:>11.2f} {s.moves_per_step:>11.2f}")
    results = None
    if png_out or json_out:
        budgets = sorted({*range(1, trace.n_expert + 1, max(1, trace.n_expert // 16)), budget, trace.n_expert})
        results = sweep(trace, budgets)
    if png_out:
        plot_sweep(results, png_out, title=Path(trace_path).name)
        click.echo(f"wrote {png_out}", err=True)
    if json_out:
        Path(json_out).write_text(json.dumps({
            "trace": trace_path, "budget_experts": budget, "scores": [s.to_json() for s in scores],
            "sweep": {str(b): [s.to_json() for s in v] for b, v in (results or {}).items()},
        }, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@spac.command(name="lookahead")
@click.argument("model")
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt (repeatable).")
@click.option("-n", "--n-predict", "n_predict", type=int, default=64, show_default=True)
@click.option("--node", type=click.Choice(["l_out", "ffn_inp"]), default="l_out", show_default=True,
              help="l_out: predict layer l+1 from layer l's output; ffn_inp: each layer's own input (exact check).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--no-repack", is_flag=True, help="use_extra_bufts=False (K-quant models on AMX machines).")
@friendly_errors
def lookahead_cmd(model: str, prompts: tuple[str, ...], n_predict: int, node: str, json_out: str | None,
                  no_repack: bool) -> None:
    """Measure layer lookahead: how well layer l's output predicts layer l+1's experts."""
    from spac_llamacpp.tools.lookahead import measure

    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    report = measure(model, list(prompts) or ["Once upon a time"], n_predict, node=node, n_ctx=default_ctx(model, None),
                     verbose=False, **({"use_extra_bufts": False} if no_repack else {}))
    click.echo(f"{'layer':>5} {'lookahead recall':>17} {'previous-token recall':>22}")
    for layer, r in sorted(report.per_layer.items()):
        click.echo(f"{layer:>5} {r:>17.3f} {report.per_layer_previous_token[layer]:>22.3f}")
    click.echo(f" mean {report.mean:>17.3f} {report.mean_previous_token:>22.3f}   ({report.tokens} tokens)")
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_json(), indent=2) + "\n")


spac.add_command(spac_run, name="run")


# --- balancer: calibrate, simulate (issue 5) -------------------------------------------------------


def _measure_and_cache(model: str | Path | None, types: list[str] | None = None) -> Any:
    """Calibrate this machine for ``model`` (None: the generic calibration) now and cache it (``spac simulate``
    without a calibration); ``types``: weight types to measure besides the defaults."""
    from spac_llamacpp.planning.calibration import calibration_path
    from spac_llamacpp.tools.calibrate import DEFAULT_TYPES, calibratable_types, calibrate
    from spac_llamacpp.tools.progress import phase_progress

    want = [*DEFAULT_TYPES, *(t for t in types or [] if t not in DEFAULT_TYPES and t in calibratable_types())]
    click.echo("calibrate: no calibration cached for this machine; measuring it now (about 20 s)", err=True)
    with phase_progress("calibrate") as progress:
        cm = calibrate(model, types=want if types else None, progress=progress)
    cm.source = str(cm.save(calibration_path(model)))
    return cm


def _nominal_costs(model: str | Path) -> Any:
    """``spac simulate`` without a calibration and without ``--calibrate``: nominal costs, said on stderr."""
    from spac_llamacpp.planning.costmodel import CostModel

    click.echo("spac simulate: no calibration cached for this machine; simulating with nominal costs (pass "
               "--calibrate to measure this machine first, about 20 s, or run `spac calibrate`)", err=True)
    return CostModel.nominal()


@spac.command(name="calibrate")
@click.option("--show", is_flag=True, help="Print the cached calibration of this machine (and --model) instead.")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="Calibrate for this GGUF: its expert weight types and read sizes; flash test file next to it.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: llama-cpp-python's default).")
@click.option("--types", default=None,
              help="Comma-separated weight types to measure (default: F16,Q8_0,Q4_0 and the model's).")
@click.option("--flash-dir", type=click.Path(file_okay=False), default=None,
              help="Directory on the flash device to test (default: the model's directory or the cache).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the summary.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
@friendly_errors
def calibrate_cmd(show: bool, model: str | None, threads: int | None, types: str | None, flash_dir: str | None,
                  as_json: bool, output: str | None) -> None:
    """Measure this machine's cost model (CPU expert matmuls, flash reads, RAM->VRAM, memory) and cache it."""
    from spac_llamacpp.planning.calibration import calibration_path, load_cached
    from spac_llamacpp.tools.calibrate import calibrate, dumps, format_calibration

    if model is not None and not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    if show:
        cm = load_cached(model)
        if cm is None:
            raise SpacError(f"no calibration cached for this machine at {calibration_path(model)}; "
                            "run `spac calibrate`")
    else:
        type_list = [t.strip().upper() for t in types.split(",") if t.strip()] if types else None
        from spac_llamacpp.tools.progress import phase_progress

        with phase_progress("calibrate") as progress:
            cm = calibrate(model, threads=threads, types=type_list, flash_dir=flash_dir, progress=progress)
        cm.source = str(cm.save(calibration_path(model)))
    if output:
        Path(output).write_text(dumps(cm) + "\n")
    click.echo(dumps(cm) if as_json else format_calibration(cm))


@spac.command(name="simulate")
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False))
@click.option("--budget", required=True,
              help="The tier's budget, as the tier means it (123456, 512KiB, 6GiB): flash, RAM for routed experts "
                   "(`spac-run --tier flash --budget`; the plan gets it less the staging and lookahead reserves); "
                   "vram, GPU memory for the model (`--vram-budget`; the pool gets it less the non-expert weights, "
                   "the KV cache of --n-ctx tokens and --compute-reserve). Without a model file (the trace's "
                   "recorded layout) it counts routed expert bytes only, at the recorded sizes: flash, less the same "
                   "reserves; vram, all of it for the pool.")
@click.option("--tier", type=click.Choice(["flash", "vram"]), default="flash", show_default=True,
              help="flash: fast = resident RAM, slow = read from flash; vram: fast = GPU, slow = CPU compute.")
@click.option("--policy", default="ours", show_default=True,
              help="none, static, lru, lfu, pin, hysteresis (MoE-SpAc's rule), ours (also spac: the tier's own), "
                   "min, belady.")
@click.option("--compare", is_flag=True, help="Run every policy, print them side by side and write a PNG.")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="GGUF the trace was recorded from (default: the path in the trace when that file is here, "
                   "else the layout the trace records).")
@click.option("--expert-bytes", default=None,
              help="No model file: the size of one expert (every MoE layer, e.g. 94.5MiB), replacing the sizes the "
                   "trace records (needed when it records none).")
@click.option("--weight-type", default=None,
              help="No model file: the experts' ggml weight type for the CPU cost model (e.g. Q4_K; default "
                   "F16, the cost model's fallback).")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False),
              help="Calibration JSON (default: this machine's cached one, else nominal costs; without a model the "
                   "generic one).")
@click.option("--calibrate", "calibrate_now", is_flag=True,
              help="Without a cached calibration, measure this machine now (about 20 s) and cache it.")
@click.option("--png", default=None, type=click.Path(dir_okay=False),
              help="Chart of --compare (default: TRACE's name with -compare-TIER.png).")
@click.option("--n-ctx", default=512, show_default=True, type=int,
              help="vram: the context length whose KV cache the budget holds (as the model would be loaded; needs the "
                   "model file).")
@click.option("--compute-reserve", default="256MiB", show_default=True,
              help="vram: GPU memory kept for llama.cpp's compute buffers (vram_options compute_reserve; needs the "
                   "model file).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON results.")
@friendly_errors
def simulate_cmd(trace_path: str, budget: str, tier: str, policy: str, compare: bool, model: str | None,
                 expert_bytes: str | None, weight_type: str | None, calibration: str | None, calibrate_now: bool,
                 png: str | None, n_ctx: int, compute_reserve: str, as_json: bool) -> None:
    """Replay a routing TRACE through placement policies under the measured cost model.

    `ours` is the tier's own planning loop with the tier's placement configuration, and the budget means what
    the tier's budget means, so its result is what the tier would do on this trace.

    Without the model file (an imported public trace, `spac trace import`), expert sizes and top-k come from the
    layout the trace records (--expert-bytes where it records none): each expert is 3 tensors (gate, up,
    down) of --weight-type, and the budget counts routed expert bytes only."""
    from click.core import ParameterSource

    from spac_llamacpp.base.sizes import format_size, parse_size
    from spac_llamacpp.planning.costmodel import ExpertLayout
    from spac_llamacpp.sim.policies import POLICIES
    from spac_llamacpp.sim.simulator import compare as run_compare
    from spac_llamacpp.sim.simulator import format_table, load_inputs, make_setup, plot, simulate, weight_type_name

    if not compare and policy not in POLICIES:
        raise SpacError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    size = parse_size(budget)
    per_expert = parse_size(expert_bytes) if expert_bytes is not None else None
    wtype = weight_type_name(weight_type) if weight_type is not None else None
    def measure(m: str | Path | None) -> Any:
        return _measure_and_cache(m, [wtype] if wtype else None) if calibrate_now else _nominal_costs(m)

    trace, info, cost = load_inputs(trace_path, model, calibration, measure=measure,
                                    expert_bytes=per_expert, weight_type=wtype)
    recorded = isinstance(info, ExpertLayout)
    if recorded and tier == "vram":
        ctx = click.get_current_context()
        given = [f"--{p.replace('_', '-')}" for p in ("n_ctx", "compute_reserve")
                 if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT]
        if given:
            raise SpacError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} the model file (its KV "
                            "cache and non-expert weights); without one the vram budget is the expert pool's bytes")
    setup = make_setup(trace, tier, size, cost, info, n_ctx=n_ctx, compute_reserve=parse_size(compute_reserve))
    layout = setup.layout
    results = run_compare(trace, setup) if compare else [simulate(trace, policy, setup)]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
    else:
        source = ""
        if recorded:
            types = sorted({ty for ts in layout.tensors for ty, _ in ts})
            source = (f"; layout {layout.model} (no model file: {layout.n_ranges(0)} tensors per expert, "
                      f"{'/'.join(types)}{'' if wtype else ' assumed'}; the budget counts routed expert bytes only)")
        click.echo(f"{trace_path}: {trace.n_tokens} tokens, {trace.n_steps} steps, {layout.n_layer} MoE layers x "
                   f"{layout.n_expert} experts ({format_size(layout.total_expert_bytes)} of experts); tier {tier}, "
                   f"budget {format_size(size)} ({format_size(setup.budget)} for planned experts); cost model "
                   f"{cost.source or 'measured now'}" + ("" if tier == "flash" or cost.gpu.measured else
                                                        "; GPU not measured: assumed GPU numbers") + source)
        click.echo(format_table(results))
    if compare:
        out = Path(png) if png else Path(trace_path).with_name(f"{Path(trace_path).stem}-compare-{tier}.png")
        plot(results, out, title=f"{Path(trace_path).name}: {tier} tier, budget {format_size(size)}")
        click.echo(f"wrote {out}", err=True)


# --- profiles, patched layout, plots (issue 8) -------------------------------------------------------


@spac.command(name="compare-policies")
@click.argument("traces", metavar="TRACE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--share", "shares", multiple=True,
              help="Share of the routed experts (repeatable; default 12.5%, 25%, 50%): eval-utility keeps that share "
                   "of each layer's experts, the simulated plan holds that share of the expert bytes.")
@click.option("--tier", type=click.Choice(["flash", "vram"]), default="flash", show_default=True)
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="GGUF the traces were recorded from (default: the path in each trace, else its recorded layout).")
@click.option("--expert-bytes", default=None, help="No model file: the size of one expert (as `spac simulate`).")
@click.option("--weight-type", default=None, help="No model file: the experts' ggml weight type (as `spac simulate`).")
@click.option("--calibration", default=None, type=click.Path(dir_okay=False),
              help="Calibration JSON (default: this machine's cached one, else nominal costs).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
@friendly_errors
def compare_policies_cmd(traces: tuple[str, ...], shares: tuple[str, ...], tier: str, model: str | None,
                         expert_bytes: str | None, weight_type: str | None, calibration: str | None,
                         json_out: str | None) -> None:
    """Ours next to LRU and MIN per TRACE and share of the experts: eval-utility hit rate and simulated time.

    Per share s: the eval-utility hit rate of keeping round(s x experts) per layer (the spac estimator's top-N
    against the LRU and MIN demand caches of N), and `spac simulate`'s hit rate and modelled ms/token of ours (the
    tier's own loop and defaults), lru and min when the plan holds s of the expert bytes (flash: the budget is s
    plus the staging and lookahead reserves). ours/lru below 1 is faster than LRU."""
    from spac_llamacpp.base.sizes import parse_size
    from spac_llamacpp.sim.compare import DEFAULT_SHARES, compare_shares, format_rows, parse_share
    from spac_llamacpp.sim.simulator import load_inputs, weight_type_name

    share_list = [parse_share(s) for s in shares] or list(DEFAULT_SHARES)
    per_expert = parse_size(expert_bytes) if expert_bytes is not None else None
    wtype = weight_type_name(weight_type) if weight_type is not None else None
    rows = []
    for path in traces:
        trace, info, cost = load_inputs(path, model, calibration, measure=_nominal_costs, expert_bytes=per_expert,
                                        weight_type=wtype)
        click.echo(f"{path}: {trace.n_steps} steps, {trace.n_tokens} tokens, {len(trace.moe_layers)} MoE layers x "
                   f"{trace.n_expert} experts; cost model {cost.source or 'given'}", err=True)
        rows += compare_shares(trace, info, cost, tier=tier, shares=share_list, name=Path(path).stem)
    click.echo(format_rows(rows))
    if json_out:
        Path(json_out).write_text(json.dumps({"tier": tier, "rows": [r.to_json() for r in rows]}, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@spac.command(name="profile")
@click.argument("model")
@prompt_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Profile JSON to write.")
@click.option("--estimator", default="spac", show_default=True, help="Utility estimator whose state is saved.")
@model_options
@friendly_errors
def profile_cmd(model: str, prompts: tuple[str, ...], prompt_file: str | None, n_predict: int, output: str,
                estimator: str, **load_kw: Any) -> None:
    """Run prompts through MODEL (drafting if asked) and save per-layer expert counts and utilities."""
    import numpy as np

    from spac_llamacpp.observe.profile import Profile
    from spac_llamacpp.planning.estimators import Observation, make_estimator
    from spac_llamacpp.tools.generate import GenerationStats, stream_generate
    from spac_llamacpp.tools.progress import token_progress

    all_prompts = _gather_prompts(prompts, prompt_file)
    llm = _load(model, routing_history=None, **load_kw)
    if llm.routing is None:
        raise SpacError(f"{model} has no routed experts; `spac profile` needs a Mixture-of-Experts model")
    layers = list(llm.moe_info.moe_layers)
    demand = make_estimator(estimator, len(layers), llm.moe_info.n_expert)
    bar = token_progress(len(all_prompts) * n_predict, "profile")
    for prompt in all_prompts:
        llm.reset()
        for _ in stream_generate(llm, prompt, n_predict, stats=GenerationStats()):
            bar.update(1)
    bar.close()
    steps = list(llm.routing.steps)
    maps = {m.step: m for m in llm.speculation.maps} if llm.speculation is not None else {}
    for step in steps:
        fmap = maps.get(step.index)
        accepted = fmap.accepted_counts() if fmap is not None else None
        demand.update(Observation(step.counts[layers], step.n_tokens,
                                  None if accepted is None else accepted[layers]))
    counts = np.zeros((len(layers), llm.moe_info.n_expert), np.int64)
    for step in steps:
        counts += step.counts[layers]
    extra = {"estimator": estimator, "prompts": len(all_prompts)}
    if llm.speculation is not None:
        extra["speculation"] = llm.speculation.summary()
    prof = Profile(tuple(layers), llm.moe_info.n_expert, counts, demand.utility(),
                   int(sum(s.n_tokens for s in steps)), len(steps), Path(model).name, extra)
    prof.save(output)
    llm.close()
    click.echo(f"wrote {output}: {prof.tokens} tokens in {prof.steps} steps, {len(layers)} MoE layers x "
               f"{prof.n_expert} experts", err=True)


@spac.command(name="patch")
@click.argument("model")
@click.option("--profile", "profile_path", required=True, type=click.Path(dir_okay=False),
              help="A profile JSON (`spac profile`) or a routing trace (.npz, `spac trace`).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Patched GGUF to write.")
@click.option("--no-verify", is_flag=True, help="Skip re-reading the output to check it.")
@friendly_errors
def patch_cmd(model: str, profile_path: str, output: str, no_verify: bool) -> None:
    """Rewrite MODEL with each layer's experts ordered hot-first by a profile (same outputs)."""
    from spac_llamacpp.observe.profile import load_profile
    from spac_llamacpp.tools.patch_model import patch_model

    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    summary = patch_model(model, load_profile(profile_path), output, verify=not no_verify)
    click.echo(f"wrote {summary['output']}: {summary['experts_moved']} experts moved in {summary['layers']} layers"
               + ("" if no_verify else "; verified"), err=True)


@spac.command(name="plot")
@click.argument("source", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--budget-experts", type=int, default=None,
              help="For a trace: experts kept per layer (default: half of them).")
@click.option("--estimator", default="spac", show_default=True, help="For a trace: the estimator next to LRU.")
@friendly_errors
def plot_cmd(source: str, output: str, budget_experts: int | None, estimator: str) -> None:
    """Heat map (layer x expert) of a profile JSON, hit rate over time of a trace (.npz), or tok/s per budget of
    a benchmark result (the last JSON line of scripts/bench_flash.py, bench_vram.py, bench_speculation.py)."""
    from spac_llamacpp.observe.profile import load_profile
    from spac_llamacpp.tools.plots import benchmark_series, plot_benchmark, plot_heatmap, plot_hit_rate, read_benchmark

    if source.endswith(".npz"):
        from spac_llamacpp.observe.trace import RoutingTrace

        plot_hit_rate(RoutingTrace.load(source), output, budget_experts, estimator)
    elif (bench := benchmark_series(read_benchmark(source) or {})) is not None:  # issue 17
        plot_benchmark(bench, output)
    else:
        plot_heatmap(load_profile(source), output)
    click.echo(f"wrote {output}", err=True)


@spac.command(name="eval-ppl")
@click.argument("model")
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to score.")
@click.option("--cache-prior", "lambdas", type=float, multiple=True, default=(0.05, 0.1, 0.15, 0.2, 0.3),
              show_default=True, help="Lambda values to compare with exact routing (repeatable).")
@click.option("--cache-experts", type=int, default=None, help="LRU cache size per layer (default: half the experts).")
@click.option("--top-j", type=int, default=None, help="Protected original top-J (default: min(2, k-1)).")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Tokens per window (context).")
@click.option("--windows", type=int, default=4, show_default=True, help="Consecutive windows of the text scored.")
@click.option("--threads", "n_threads", type=int, default=None)
@click.option("--no-repack", is_flag=True, help="use_extra_bufts=False (K-quant models on AMX machines).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write JSON here.")
@friendly_errors
def eval_ppl_cmd(model: str, text_file: str, lambdas: tuple[float, ...], cache_experts: int | None,
                 top_j: int | None, max_tokens: int, windows: int, n_threads: int | None, no_repack: bool,
                 json_out: str | None) -> None:
    """Perplexity and expert-cache miss rate of cache-aware routing (Cache-Prior) at several lambdas."""
    from spac_llamacpp.tools.eval_ppl import eval_cache_prior, format_rows

    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    rows = eval_cache_prior(model, Path(text_file).read_text(errors="replace"), lambdas,
                            cache_experts=cache_experts, top_j=top_j, max_tokens=max_tokens, windows=windows,
                            n_threads=n_threads, no_repack=no_repack)
    click.echo(format_rows(rows))
    if json_out:
        Path(json_out).write_text(json.dumps({"model": model, "text": text_file, "rows": rows}, indent=2) + "\n")


# ---- spac synth (issue 14) -------------------------------------------------------------------------


@spac.command(name="synth")
@click.argument("preset")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF to write.")
@click.option("--type", "expert_type", default=None,
              help="Routed-expert type: q4_k, q8_0, f16 or mxfp4 [default: the preset's, mxfp4 for gpt-oss-20b, "
                   "else q4_k].")
@click.option("--layers", type=int, default=None, help="Keep only the first N blocks (shorter files for tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights seed (same seed, same bytes).")
@friendly_errors
def synth_cmd(preset: str, output: str, expert_type: str | None, layers: int | None, seed: int) -> None:
    """Write a GGUF with the architecture and tensor shapes of a real MoE model and random weights.

    PRESET: qwen3-30b-a3b, gpt-oss-20b, mixtral-8x7b, deepseek-v2-lite or olmoe-1b-7b.
    """
    from spac_llamacpp.models.synth import write_synth

    result = write_synth(output, preset, expert_type=expert_type, layers=layers, seed=seed)
    click.echo(result.summary(), err=True)


# ---- automatic placement, server, chat (issue 17) ----------------------------------------------------


@spac.command(name="fit")
@click.argument("model")
@click.option("--ctx", "n_ctx", type=int, default=None,
              help=f"Context length to plan for [default: {DEFAULT_CTX}, or the model's training context if shorter].")
@click.option("--cpu-only", is_flag=True, help="Plan without the GPU (as --gpu-layers 0 does with --tier auto).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@friendly_errors
def fit_cmd(model: str, n_ctx: int | None, cpu_only: bool, as_json: bool) -> None:
    """Choose how MODEL runs on this machine: all in RAM, the flash tier with a budget, or the vram tier.

    From the GGUF header and the free memory (MemAvailable, the cgroup limit, the GPU's free memory), leaving a
    safety margin; `spac-run MODEL` (--tier auto) uses the same choice. $SPAC_MACHINE_FACTS (a JSON object or
    @file) describes another machine instead.
    """
    from spac_llamacpp.tools.fit import fit_model, format_fit

    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    plan = fit_model(model, default_ctx(model, n_ctx), gpu=not cpu_only)
    click.echo(json.dumps(plan.to_json(), indent=2) if as_json else format_fit(plan))


def _default_model(model: str | None, tool: str) -> str:
    from spac_llamacpp.models.default import DEFAULT_LABEL, default_model_path

    if model is None:
        click.echo(f"{tool}: no model given; using the {DEFAULT_LABEL}", err=True)
        return str(default_model_path())
    return model


@spac.command(name="serve")
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--alias", default=None, help="Model name in /v1/models [default: the file name without .gguf].")
@click.option("--api-key", default=None, help="Require this bearer token (Authorization: Bearer KEY).")
@click.option("--interrupt-requests", is_flag=True,
              help="A new request ends a stream in progress (llama_cpp.server's default) instead of waiting for it.")
@click.option("--log-level", "server_log_level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
              help="uvicorn's log level (info: one line per request).")
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
@friendly_errors
def serve_cmd(model: str | None, host: str, port: int, alias: str | None, api_key: str | None,
              interrupt_requests: bool, server_log_level: str, seed: int, **load_kw: Any) -> None:
    """Serve MODEL over HTTP with the OpenAI API (llama-cpp-python's server app, spac's Llama behind it).

    /v1/completions, /v1/chat/completions (streaming), /v1/models, and /spac/stats (the tier's stats and the
    routing summary). One evaluation at a time; Ctrl+C (SIGINT) or SIGTERM stops it cleanly. Placement is
    --tier auto unless given; without MODEL, serves the embedded default model.
    """
    from spac_llamacpp.tools.serve import build_app, run_server

    model = _default_model(model, "spac serve")
    if not Path(model).is_file():
        raise SpacError(f"model file not found: {model}")
    if not 0 <= port < 65536:
        raise SpacError(f"--port must be 0..65535, not {port}")
    load_kw["tier"] = load_kw.get("tier") or "auto"
    load_kw["on_fit"] = _echo_fit
    app, served = build_app(lambda: _load(model, seed=seed, **load_kw), model, alias=alias, api_key=api_key,
                            interrupt_requests=interrupt_requests)
    run_server(app, served, host, port, log_level=server_log_level, echo=lambda m: click.echo(m, err=True))


@spac.command(name="chat")
@click.argument("model", required=False)
@click.option("--system", default=None, help="System message starting the conversation.")
@click.option("-n", "--max-tokens", "max_tokens", type=int, default=None,
              help="Tokens per reply at most [default: 256, at most half the context].")
@click.option("--temp", type=float, default=0.7, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
@friendly_errors
def chat_cmd(model: str | None, system: str | None, max_tokens: int | None, temp: float, seed: int,
             **load_kw: Any) -> None:
    """Chat with MODEL in the terminal: its chat template, streamed replies, a live status line.

    Commands: /stats, /reset, /help, /quit (or Ctrl+D). Placement is --tier auto unless given; without MODEL,
    chats with the embedded default model.
    """
    from spac_llamacpp.tools.chat import Chat, run_chat

    model = _default_model(model, "spac chat")
    if max_tokens is not None and max_tokens < 1:
        raise SpacError(f"--max-tokens must be at least 1, not {max_tokens}")
    load_kw["tier"] = load_kw.get("tier") or "auto"
    load_kw["on_fit"] = _echo_fit
    llm = _load(model, seed=seed, **load_kw)
    try:
        chat = Chat(llm, system=system, max_tokens=max_tokens, temperature=temp, seed=seed)
        run_chat(chat, banner=f"spac chat: {Path(model).name}, context {llm.n_ctx()} tokens, replies of at most "
                              f"{chat.max_tokens} tokens")
    finally:
        llm.close()
