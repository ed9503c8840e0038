"""The measured protocol every benchmark engine runs, in its own process; standard library only, so that
engines living in another interpreter (worker_llama.py) import it too.

One pass: a fresh KV cache, the prompt prefilled in one call, then the decode tokens fed one at a time
(teacher-forced: every engine routes the same tokens), each step evaluated to its next-token choice. With
`warm`, an identical pass runs first. Disk bytes come from /proc/self/io (what the kernel fetched from
storage for this process, page faults of mmap included, page-cache hits not).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux


def disk_read_bytes() -> int:
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return 0
    return next(int(l.split()[1]) for l in lines if l.startswith("read_bytes:"))


def peak_rss() -> int:
    """This program's peak resident set. Not ru_maxrss on Linux: that survives exec, so a child would report
    its parent's peak."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def one_pass(engine, prompt: list[int], decode: list[int]) -> dict:
    """`engine` has reset(), prefill(ids), step(id) (each evaluated before it returns) and counters() -> dict."""
    engine.reset()
    marks = []
    for phase in ("start", "prefill", "decode"):
        if phase == "prefill":
            engine.prefill(prompt)
        elif phase == "decode":
            for token in decode:
                engine.step(token)
        marks.append((time.perf_counter(), disk_read_bytes(), engine.counters()))
    out = {}
    for phase, (t0, io0, c0), (t1, io1, c1) in zip(("prefill", "decode"), marks, marks[1:]):
        out[phase] = {"seconds": t1 - t0, "disk_bytes": io1 - io0, "store": _delta(c1, c0)}
    return out


def measure(engine, spec: dict) -> dict:
    if spec["warm"]:
        one_pass(engine, spec["prompt"], spec["decode"])
    return one_pass(engine, spec["prompt"], spec["decode"])


def main(make_engine) -> int:
    """`python WORKER SPEC.json`: build the engine, measure, print one JSON line (the last line of stdout)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    engine, info = make_engine(spec)
    load_seconds = time.perf_counter() - t0
    result = measure(engine, spec)
    print(json.dumps({**result, **info, "load_seconds": load_seconds, "peak_rss": peak_rss()}), flush=True)
    return 0
