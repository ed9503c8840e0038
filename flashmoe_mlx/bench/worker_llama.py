"""The llama.cpp engines of `bench run`, measured in their own process by the interpreter that has
llama-cpp-python (`--llama-python`): `PYTHON worker_llama.py SPEC`. Standard library, numpy, llama_cpp and the
protocol module beside this file only: that interpreter has no mlx.

`llama.cpp`: llama.cpp's defaults (weights mmap'ed; Q4_0/Q4_K weights repacked into anonymous memory at load,
so they are all resident). `llama.cpp-mapped`: repacking off, so every weight is served from the mapping and
the page cache, which a memory limit can squeeze. Greedy choice from the last position's logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from protocol import main


def _without_repacking():
    # Llama() has no argument for it; it builds its parameters with this submodule function.
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


class LlamaEngine:
    def __init__(self, spec: dict):
        if spec["engine"] == "llama.cpp-mapped":
            _without_repacking()
        prompt = len(spec["prompt"])
        self.llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=max(512, prompt + len(spec["decode"]) + 8),
                                   n_batch=max(512, prompt), n_threads=spec["threads"],
                                   n_threads_batch=spec["threads"], use_mmap=True, use_mlock=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def reset(self):
        self.llm.reset()  # the next eval starts a new sequence

    def _choose(self) -> int:
        # eval() leaves llm.scores empty unless logits_all: read the last logits from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))
        return int(logits.argmax())

    def prefill(self, ids):
        self.llm.eval(ids)
        self._choose()

    def step(self, token):
        self.llm.eval([token])
        self._choose()

    def counters(self) -> dict:
        return {}


if __name__ == "__main__":
    sys.exit(main(lambda spec: (LlamaEngine(spec), {})))
