"""`bench run`: prefill and decode tok/s per engine, memory limit, residency and cache state, beside the bounds.

Owns the plan (which rows to measure, which to skip and why), one fresh child process per row (inside its own
cgroup v1 memory limit when asked; page cache dropped first when the row is cold or limited), the machine's
figures measured in the same run, and the bounds per row:
  I/O bound     = 1 / (decode bytes from disk / disk GB/s + other missed expert bytes / page-cache GB/s) tok/s
  compute bound = memory copy GB/s / active bytes per token (dense weights + top-k experts of every layer) tok/s
On a GPU, memory copy is the device's, and requested expert bytes also cross host->device at the measured rate.
Disk and page-cache GB/s are raw parallel preads of the model's own expert records (4 threads).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..layout import flashmoe_layouts
from ..loader import human_bytes, parse_size
from .cgroup import MemoryLimit
from .disk import (
    DROP_CACHES,
    CacheError,
    copy_gbps,
    device_copy_gbps,
    drop_caches,
    pread_gbps,
    upload_gbps,
)

PROCESS_OVERHEAD = 0.6e9  # interpreter, mlx and mlx-lm, KV cache and activations of a short run
LLAMA_WORKER = Path(__file__).with_name("worker_llama.py")


@dataclass(frozen=True)
class Engine:
    name: str
    weights: str  # where in the make-synthetic directory its weights live
    streams: bool  # has a residency knob (else one row per cache state and limit)

    @property
    def llama(self) -> bool:
        return self.name.startswith("llama.cpp")

    def command(self, spec_path: Path, llama_python: str | None) -> list[str]:
        if self.llama:
            return [llama_python, str(LLAMA_WORKER), str(spec_path)]
        return [sys.executable, "-m", "flashmoe_mlx.bench.worker", str(spec_path)]


ENGINES = {e.name: e for e in (Engine("flashmoe", "flashmoe", True), Engine("mlx-lm", "mlx-lm", False),
                               Engine("llama.cpp", "gguf", False), Engine("llama.cpp-mapped", "gguf", False))}


@dataclass(frozen=True)
class Row:
    engine: str
    limit: int | None
    residency: float | None
    cache: str


class Model:
    """The make-synthetic directory's figures the plan and the bounds need."""

    def __init__(self, root: Path):
        self.root = root
        flashmoe = root / "flashmoe"
        if not (flashmoe / "config.json").is_file():
            raise ValueError(f"{flashmoe}: missing; --model takes a directory written by `bench make-synthetic`")
        self.config = json.loads((flashmoe / "config.json").read_text())
        self.layouts = flashmoe_layouts(flashmoe)
        hints = self.config["flashmoe"]["memory_hints"]
        self.dense_bytes = hints["dense_bytes"]
        self.expert_bytes = sum(l.num_experts * sum(t.nbytes for t in l.tensors) for l in self.layouts)
        top_k = self.config["num_experts_per_tok"]
        self.active_bytes = self.dense_bytes + top_k * sum(sum(t.nbytes for t in l.tensors) for l in self.layouts)

    def weights(self, engine: Engine, gguf_type: str = "Q4_0") -> Path | None:
        """The engine's weights (a directory, or the GGUF file), None when make-synthetic did not write them."""
        path = self.root / engine.weights
        if engine.llama:
            path = path / f"model-{gguf_type}.gguf"
            return path if path.is_file() else None
        return path if (path / "config.json").is_file() else None

    def tokens(self, count: int) -> list[int]:
        from tokenizers import Tokenizer

        from ..eval import default_text

        ids = Tokenizer.from_file(str(self.root / "flashmoe" / "tokenizer.json")).encode(default_text().read_text()).ids
        if len(ids) < count:
            raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than the {count} asked for")
        return ids[:count]


def plan(model: Model, engines: list[str], residencies: list[float], caches: list[str],
         limits: list[int | None], gguf_type: str) -> list[tuple[Row, str | None]]:
    """Every row with the reason it is skipped (None: measure it)."""
    from .worker import flashmoe_budget

    rows = []
    for limit in limits:
        for name in engines:
            engine = ENGINES[name]
            for residency in residencies if engine.streams else [None]:
                for cache in caches:
                    row, reason = Row(name, limit, residency, cache), None
                    if model.weights(engine, gguf_type) is None:
                        reason = f"no {model.root / engine.weights} {gguf_type if engine.llama else ''}(make-synthetic did not write it)"
                    elif limit and not engine.llama:  # llama.cpp maps its weights: let the limit decide
                        pool = flashmoe_budget(str(model.root / "flashmoe"), residency if engine.streams else 1.0)
                        need = pool + model.dense_bytes + PROCESS_OVERHEAD
                        if need > limit:
                            reason = f"needs ~{human_bytes(int(need))} resident, over the {human_bytes(limit)} limit"
                    rows.append((row, reason))
    return rows


def run_row(row: Row, spec: dict, engine: Engine, llama_python: str | None, timeout: float) -> dict:
    """One child process; its result, or {"error": ...}."""
    if row.cache == "cold" or row.limit:
        drop_caches()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        group = MemoryLimit(row.limit, f"flashmoe-bench-{os.getpid()}") if row.limit else nullcontext()
        with group as g:
            try:
                proc = subprocess.run(engine.command(Path(f.name), llama_python), capture_output=True, text=True,
                                      check=False, timeout=timeout, preexec_fn=g.join if g else None)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout:.0f} s"}
            peak = g.peak() if g else None
            oom = g.oom_kills() if g else 0
    if proc.returncode != 0:
        if oom:
            return {"error": "killed by the OOM killer under the memory limit"}
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": last[:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "cgroup_peak": peak}


def figures(row: Row, result: dict, model: Model, machine: dict, prompt: int, decode: int) -> dict:
    """The table's figures for one measured row."""
    pre, dec = result["prefill"], result["decode"]
    store = dec["store"]
    lookups = store.get("hits", 0) + store.get("misses", 0)
    requested = store.get("bytes_read", 0) / decode
    from_disk = dec["disk_bytes"] / decode
    # With warm rows only the disk is not timed, yet bytes may still come from it (the page cache evicted under
    # memory pressure): they count at the page cache's rate, faster than any disk, so the bound stays a bound.
    disk_gbps = machine["disk_gbps"] or machine["cache_gbps"]
    io_seconds = from_disk / (disk_gbps * 1e9) if from_disk else 0.0
    if requested > from_disk:
        io_seconds += (requested - from_disk) / (machine["cache_gbps"] * 1e9)
    if machine.get("upload_gbps"):  # a GPU: every requested byte then crosses to the device too
        io_seconds += requested / (machine["upload_gbps"] * 1e9)
    decode_tps = decode / dec["seconds"]
    io_bound = 1 / io_seconds if io_seconds else None
    compute_bound = machine["memory_gbps"] * 1e9 / model.active_bytes
    bound = min(b for b in (io_bound, compute_bound) if b is not None)
    per_token = {k: store.get(f"{k}_seconds", 0.0) / decode * 1e3 for k in ("sync", "fetch", "read")}
    return {
        "engine": row.engine, "memory_limit": row.limit, "residency": row.residency, "cache": row.cache,
        "prefill_tps": prompt / pre["seconds"], "decode_tps": decode_tps,
        "hit_rate": store["hits"] / lookups if lookups else None,
        "gb_per_token_requested": requested / 1e9 if store else None,
        "gb_per_token_disk": from_disk / 1e9,
        "read_gbps": store["bytes_read"] / store["read_seconds"] / 1e9 if store.get("read_seconds") else None,
        "peak_rss": result["peak_rss"], "cgroup_peak": result.get("cgroup_peak"),
        "io_bound_tps": io_bound, "compute_bound_tps": compute_bound, "achieved_vs_bound": decode_tps / bound,
        "ms_per_token": {"total": 1e3 / decode_tps, **per_token,
                         "rest": 1e3 / decode_tps - per_token["sync"] - per_token["fetch"]} if store else None,
        "prefill_store": pre["store"], "decode_store": store, "load_seconds": result["load_seconds"],
        **{k: result[k] for k in ("pool_bytes", "slots_per_layer") if k in result},
    }


def _fmt(v, spec=".2f", none="—"):
    return none if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| engine | limit | residency | cache | prefill tok/s | decode tok/s | hit rate | GB/token requested "
            "| GB/token from disk | read GB/s | peak RSS | I/O bound | compute bound | achieved / bound |")
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        cells = [r["engine"], human_bytes(r["memory_limit"]) if r["memory_limit"] else "none",
                 f"{100 * r['residency']:g}%" if r["residency"] is not None else "all",
                 r["cache"]]
        if "skipped" in r or "error" in r:
            lines.append("| " + " | ".join(cells) + f" | {r.get('skipped') or r['error']} |" + " |" * 9)
            continue
        cells += [_fmt(r["prefill_tps"], ".1f"), _fmt(r["decode_tps"]), _fmt(r["hit_rate"], ".3f"),
                  _fmt(r["gb_per_token_requested"], ".3f"), _fmt(r["gb_per_token_disk"], ".3f"),
                  _fmt(r["read_gbps"]), f"{r['peak_rss'] / 1e9:.2f} GB", _fmt(r["io_bound_tps"], ".2f", "∞"),
                  _fmt(r["compute_bound_tps"]), _fmt(r["achieved_vs_bound"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(rows: list[dict]) -> str:
    """Where a decode token's time goes, for the streamed engine."""
    lines = ["| limit | residency | cache | ms/token | sync wait (graph up to each router) | fetch (of which reads) | rest |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("ms_per_token")
        if not t:
            continue
        lines.append(f"| {human_bytes(r['memory_limit']) if r['memory_limit'] else 'none'} | {100 * r['residency']:g}% "
                     f"| {r['cache']} | {t['total']:.1f} | {t['sync']:.1f} | {t['fetch']:.1f} ({t['read']:.1f}) "
                     f"| {t['rest']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    """Decode tok/s vs residency, one panel per memory limit, log scale; resident engines at 100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "decode_tps" in r]
    limits = sorted({r["memory_limit"] or 0 for r in measured})
    fig, axes = plt.subplots(1, len(limits), figsize=(5.5 * len(limits), 4.5), sharey=True, squeeze=False)
    for ax, limit in zip(axes[0], limits):
        series: dict[str, list] = {}
        for r in measured:
            if (r["memory_limit"] or 0) == limit:
                series.setdefault(f"{r['engine']}, {r['cache']}", []).append(
                    (100 * (r["residency"] if r["residency"] is not None else 1.0), r["decode_tps"]))
        for label, points in sorted(series.items()):
            x, y = zip(*sorted(points))
            ax.plot(x, y, marker="o", linestyle="--" if "cold" in label else "-", label=label)
        bound = next(r["compute_bound_tps"] for r in measured)
        ax.axhline(bound, color="gray", linewidth=0.8, label="compute bound (memory bandwidth)")
        ax.set_title(f"memory limit {human_bytes(limit)}" if limit else "no memory limit")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({x for pts in series.values() for x, _ in pts})
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.set_xlabel("expert residency (resident engines: 100%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decode tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    model = Model(args.model)
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine {unknown[0]!r}; known: {', '.join(ENGINES)}")
    if any(ENGINES[e].llama for e in engines) and not args.llama_python:
        raise ValueError("the llama.cpp engine needs --llama-python (the interpreter that has llama_cpp)")
    caches = args.cache.split(",")
    if set(caches) - {"cold", "warm"}:
        raise ValueError(f"--cache takes cold and/or warm, not {args.cache!r}")
    residencies = [float(r) for r in args.residency.split(",")]
    if any(not 0 < r <= 1 for r in residencies):
        raise ValueError(f"--residency takes fractions in (0, 1], not {args.residency!r}")
    limits = [None if v.lower() == "none" else parse_size(v) for v in args.memory_limit.split(",")]
    rows = plan(model, engines, residencies, caches, limits, args.gguf_type)
    needs_drop = any(reason is None and (row.cache == "cold" or row.limit) for row, reason in rows)
    if needs_drop and not os.access(DROP_CACHES, os.W_OK):
        raise CacheError("cold and memory-limited runs drop the page cache first, which needs root")

    tokens = model.tokens(args.prompt_tokens + args.decode_tokens)
    prompt, decode = tokens[: args.prompt_tokens], tokens[args.prompt_tokens :]
    machine = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
                          f"{human_bytes(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))} RAM"}
    machine["disk_gbps"] = pread_gbps(model.layouts, max_bytes=args.disk_sample) if needs_drop else None
    pread_gbps(model.layouts, max_bytes=args.disk_sample, cold=False)  # bring the sample into the page cache
    machine["cache_gbps"] = pread_gbps(model.layouts, max_bytes=args.disk_sample, cold=False)
    gpu = mx.default_device() == mx.gpu  # the workers compute there too: the bounds are the GPU's
    machine["device"] = mx.device_info().get("device_name", "gpu") if gpu else "cpu"
    machine["memory_gbps"] = device_copy_gbps() if gpu else copy_gbps()
    machine["upload_gbps"] = upload_gbps() if gpu else None
    print(f"{machine['machine']}, {machine['device']}: disk {_fmt(machine['disk_gbps'])} GB/s, page cache "
          f"{machine['cache_gbps']:.2f} GB/s, memory copy {machine['memory_gbps']:.2f} GB/s, host->device "
          f"{_fmt(machine['upload_gbps'])} GB/s; model: {human_bytes(model.expert_bytes)} of experts, "
          f"{human_bytes(model.active_bytes)} active per token", file=sys.stderr)

    results = []
    for row, reason in rows:
        base = {"engine": row.engine, "memory_limit": row.limit, "residency": row.residency, "cache": row.cache}
        if reason:
            results.append({**base, "skipped": reason})
            continue
        engine = ENGINES[row.engine]
        spec = {"engine": row.engine, "model": str(model.weights(engine, args.gguf_type)), "residency": row.residency,
                "warm": row.cache == "warm", "prompt": prompt, "decode": decode,
                "threads": args.llama_threads if engine.llama else args.threads}
        result = run_row(row, spec, engine, args.llama_python, args.timeout)
        results.append({**base, **result} if "error" in result else
                       figures(row, result, model, machine, len(prompt), len(decode)))
        results[-1]["loadavg"] = os.getloadavg()[0]  # other tenants' load: this box is shared
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    out = {"command": args.command_line,
           "machine": machine,
           "model": {"path": str(model.root), "expert_bytes": model.expert_bytes, "dense_bytes": model.dense_bytes,
                     "active_bytes_per_token": model.active_bytes,
                     "synthetic": json.loads((model.root / "synthetic.json").read_text())
                     if (model.root / "synthetic.json").exists() else None},
           "prompt_tokens": len(prompt), "decode_tokens": len(decode), "rows": results}
    print(table(results))
    print()
    print(time_table(results))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0
