"""`python -m flashmoe_mlx.generate`: the command line over `load` and `stream_generate`.

Owns the flags (those shared with `mlx_lm.generate` mean the same), their validation, the chat template,
the interactive `--chat` loop, and one-line errors for bad input. Samplers, logits processors and chat
templates are mlx-lm's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_PROMPT, DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .eval import record_routing, save_routing
from .generation import generate, stats_line, stream_generate


class UsageError(ValueError):
    pass


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashmoe_mlx.generate",
        description="Generate text with a MoE model whose routed experts stream from disk. Flags shared with "
        "mlx_lm.generate mean the same; without --model it runs the project's small bundled MoE.",
    )
    p.add_argument("--model", help="flashmoe or mlx-lm checkpoint: local path or hub repo id (default: the bundled demo MoE)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt text, or - to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="maximum tokens to generate")
    p.add_argument("--temp", type=float, default=None,
                   help=f"sampling temperature (default {DEFAULT_TEMP}: greedy; the bundled demo model: 0.7)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling probability mass")
    p.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, help="minimum probability relative to the top token")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty for repeated tokens, e.g. 1.1 (default none; the bundled demo model: 1.1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (the bundled demo model: 0)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--chat-template-config", default=None, help="JSON of extra chat-template arguments")
    p.add_argument("--verbose", type=_str2bool, default=True, help="stream text and print the stats line (default true)")
    p.add_argument("--memory-budget", default=None,
                   help="bytes for the expert pool, e.g. 8GB (default: memory less dense weights, KV reserve, margin)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="quantize the KV cache to 4 or 8 bits (group 64); decode attention then runs the "
                   "attention_decode kernel on Metal/CUDA")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (/reset, /stats, /quit)")
    p.add_argument("--record-trace", type=Path, default=None, metavar="PATH",
                   help="write the routing trace (layer, token, expert ids) of the run to PATH (.npz), for "
                        "`python -m flashmoe_mlx.bench policy-sim`")
    return p


# A 10M-parameter model repeats itself when decoded greedily: its demo samples, reproducibly, unless told not to.
DEMO_SAMPLING = {"temp": 0.7, "repetition_penalty": 1.1, "seed": 0}


def _resolve_defaults(args):
    for name, demo in DEMO_SAMPLING.items():
        if getattr(args, name) is None and args.model is None:
            setattr(args, name, demo)
    if args.temp is None:
        args.temp = DEFAULT_TEMP


def _check_args(args):
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise UsageError("--max-tokens must be positive (or -1 for no limit)")
    if args.temp < 0:
        raise UsageError("--temp must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if not 0 <= args.min_p <= 1:
        raise UsageError("--min-p must be in [0, 1]")
    if args.top_k < 0:
        raise UsageError("--top-k must be >= 0")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError("--repetition-penalty must be > 0")
    if args.chat_template_config is not None:
        try:
            config = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--chat-template-config is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UsageError("--chat-template-config must be a JSON object")


def _template(tokenizer, args, messages: list[dict]) -> list[int]:
    kwargs = json.loads(args.chat_template_config) if args.chat_template_config else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


def _prompt_tokens(tokenizer, args, text: str, first_turn: bool = True) -> list[int]:
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt and first_turn else []
    return _template(tokenizer, args, messages + [{"role": "user", "content": text}])


def _context_length(config: dict) -> int | None:
    text = config.get("text_config", config)
    return text.get("max_position_embeddings")


def _rewind_to_consistent(cache) -> bool:
    """After an interrupted step some layers may hold one token more than others: trim all to the shortest.
    False when the cache cannot be trimmed (recurrent layers), so the caller starts over."""
    if not can_trim_prompt_cache(cache):
        return False
    shortest = min(c.offset for c in cache)
    for c in cache:
        c.trim(c.offset - shortest)
    return True


def _chat(model, tokenizer, args, options: dict, context: int | None):
    cache, first = make_prompt_cache(model), True
    print("chat: /reset clears the conversation, /stats shows expert-store stats, /quit ends; "
          "Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        query = line.strip()
        if not query:
            continue
        if query in ("/quit", "/exit"):
            return
        if query == "/reset":
            cache, first = make_prompt_cache(model), True
            print("[conversation cleared]", flush=True)
            continue
        if query == "/stats":
            print(json.dumps(model.expert_store.stats(), indent=1), flush=True)
            continue
        tokens = _prompt_tokens(tokenizer, args, query, first_turn=first)
        used = cache[0].offset if hasattr(cache[0], "offset") else 0
        if context and used + len(tokens) >= context:
            print(f"[the conversation would exceed the model's context of {context} tokens; /reset to start over]")
            continue
        first, last = False, None
        try:
            for last in stream_generate(model, tokenizer, tokens, prompt_cache=cache, **options):
                print(last.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
            if not _rewind_to_consistent(cache):
                cache, first = make_prompt_cache(model), True
                print(" [this model's cache cannot be rewound: conversation cleared]", end="")
        print(flush=True)
        if last is not None and args.verbose:
            print(stats_line(last), flush=True)


def _save_trace(path: Path | None, model, routes):
    if path is not None:
        num_experts = max(pool.layout.num_experts for pool in model.expert_store.pools.values())
        layers = save_routing(path, routes, num_experts)
        print(f"routing trace: {path} ({len(layers)} layers x {next(iter(layers.values())).shape[0]} tokens)",
              file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .default import ensure_default_model
    from .loader import LoadError, load, parse_size
    from .format import FormatError
    from .architecture import UnsupportedModel

    try:
        _resolve_defaults(args)
        _check_args(args)
        budget = parse_size(args.memory_budget) if args.memory_budget is not None else None
        if args.model is None:
            path, default_budget = ensure_default_model()
            budget = budget if budget is not None else default_budget
        else:
            path = args.model
        if args.seed is not None:
            mx.random.seed(args.seed)
        model, tokenizer, config = load(path, memory_budget=budget, return_config=True)
        sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
        processors = make_logits_processors(repetition_penalty=args.repetition_penalty)
        options = {"max_tokens": args.max_tokens, "sampler": sampler, "logits_processors": processors}
        if args.kv_bits:
            options.update(kv_bits=args.kv_bits, kv_group_size=64, quantized_kv_start=0)
        context = _context_length(config)
        routes = record_routing(model) if args.record_trace else None
        if args.chat:
            _chat(model, tokenizer, args, options, context)
            _save_trace(args.record_trace, model, routes)
            return 0
        text = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
        tokens = _prompt_tokens(tokenizer, args, text)
        if context and len(tokens) >= context:
            raise UsageError(f"the prompt is {len(tokens)} tokens; the model's context is {context}")
        result = generate(model, tokenizer, tokens, verbose=args.verbose, **options)
        if not args.verbose:
            print(result)
        _save_trace(args.record_trace, model, routes)
        return 0
    except (UsageError, LoadError, FormatError, UnsupportedModel, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
