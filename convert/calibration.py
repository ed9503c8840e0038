"""Calibration for `--calibrate`: what GPTQ (gptq.py) needs to know about each expert's inputs.

The converter goes one decoder layer at a time, and so does calibration. The text's token windows are
embedded once by the source's embedding; then each layer's source (unquantized) weights carry the hidden
states on to the next layer, and on the way each MoE block's inputs and router choices are kept. From
those, each expert matrix gets H = X^T X / n over the tokens routed to it (for down_proj, X is the expert's
SwiGLU output), plus a small share of the layer-wide H so that experts the text rarely reaches still get
a sensible one. Memory: the hidden states ([tokens, hidden] float32, 268 MB for 16k tokens at hidden
4096) and one layer's MoE inputs; each H is built when its expert is quantized.

Each layer runs inside the model's own forward (its masks and layer types stay the model's business):
every decoder layer is replaced by a probe that passes its input through, except the layer being
calibrated, which runs on the carried hidden states, keeps its output and stops the forward.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from flashmoe_mlx.architecture import ExpertBlock, ExpertCallHook, layer_of, module_at, swap_module
from flashmoe_mlx.eval import encode_document

WINDOW = 512  # tokens per calibration sequence
BATCH_TOKENS = 4096  # tokens per forward
PRIOR = 0.1  # weight of the layer-wide H in each expert's (measured on the demo MoE; see docs/QUALITY.md)


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class CalibrationText:
    """What the user asked for: a UTF-8 text file, and how many of its tokens to use."""

    path: str
    tokens: int = 16384

    def read(self) -> str:
        path = Path(self.path)
        if self.tokens < WINDOW:
            raise CalibrationError(f"--calibrate-tokens {self.tokens}: at least {WINDOW} (one window) are needed")
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CalibrationError(f"{path}: calibration text not found") from None
        except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
            raise CalibrationError(f"{path}: not a readable UTF-8 text file ({e.__class__.__name__})") from None

    def job(self) -> dict:
        """Identity of the calibration, for --resume checks and the output's config."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:  # in pieces: the text may be a large document collection
            while piece := f.read(16 << 20):
                digest.update(piece)
        return {"method": "gptq", "text_sha256": digest.hexdigest(), "tokens": self.tokens}


LONG_TEXT_CHARS = 32 << 20  # longer texts are tokenized piecewise (all at once, 1 GB is ~250M ids in lists)
SAMPLE_CHARS = 1 << 20  # text measured for its characters per token before a long text is cut into pieces


def token_windows(tokenizer, text: str, tokens: int, where: str) -> np.ndarray:
    """[windows, WINDOW] token ids: up to tokens // WINDOW whole windows, spread evenly over the text. A text
    over LONG_TEXT_CHARS (a user's document collection) is tokenized only where windows are taken: at evenly
    spaced pieces long enough for one window each."""
    wanted = tokens // WINDOW
    if len(text) > LONG_TEXT_CHARS:
        sample = text[:SAMPLE_CHARS]
        chars_per_token = len(sample) / max(1, len(encode_document(tokenizer, sample)))
        piece = int(2 * WINDOW * chars_per_token) + 1  # twice what one window takes, on the sample's measure
        starts = np.linspace(0, len(text) - piece, wanted).astype(np.int64)
        windows = [ids[:WINDOW] for ids in (encode_document(tokenizer, text[s : s + piece]) for s in starts)
                   if len(ids) >= WINDOW]
        if not windows:
            raise CalibrationError(f"{where}: no piece of {piece} characters holds {WINDOW} tokens")
        return np.array(windows, np.int64)
    ids = np.asarray(encode_document(tokenizer, text), np.int64)
    available = len(ids) // WINDOW
    if available == 0:
        raise CalibrationError(f"{where}: {len(ids)} tokens; calibration needs at least {WINDOW}")
    count = min(available, wanted)
    starts = np.unique(np.linspace(0, available - 1, count).round().astype(np.int64)) * WINDOW
    return np.stack([ids[s : s + WINDOW] for s in starts])


class _Stop(Exception):
    """Ends a calibration forward once the layer of interest has run."""


class _LayerProbe:
    """Stands in for a decoder layer: the model's forward calls it like the layer (and may read the layer's
    attributes, e.g. which kind of attention it has)."""

    def __init__(self, layer, run):
        self.layer, self.run = layer, run

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def __call__(self, x, *args, **kwargs):
        return self.run(self.layer, x, args, kwargs)


class _Zeros:
    """Stands in for an embedding (by then perhaps quantized and freed): the probed layer ignores its input."""

    def __init__(self, dims: int):
        self.dims = dims

    def __call__(self, ids):
        return mx.zeros((*ids.shape, self.dims))


@dataclass
class ExpertInputs:
    """One MoE layer's calibration inputs: x [N, hidden] (float32), the experts chosen for each token
    [N, k], and the layer's expert block holding the source weights (for down_proj's inputs)."""

    x: mx.array
    indices: np.ndarray
    block: nn.Module

    def __post_init__(self):
        flat = self.indices.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.block.gate_proj.num_experts + 1))
        k = self.indices.shape[1]
        self._tokens = [order[bounds[e] : bounds[e + 1]] // k for e in range(len(bounds) - 1)]
        self._priors = {}  # kind of input -> the layer-wide H

    def _down_inputs(self, expert: int) -> mx.array:
        """The expert's SwiGLU outputs on its tokens, [n, intermediate] (what down_proj multiplies), from this
        expert's weights alone: a gather over the stack would convert all of its experts to float32 per call."""
        x = self.x[mx.array(self._tokens[expert])]

        def project(proj):  # SwitchLinear's arithmetic for one expert
            y = x @ proj.weight[expert].astype(mx.float32).T
            return y + proj.bias[expert].astype(mx.float32) if "bias" in proj else y

        return self.block.activation(project(self.block.up_proj), project(self.block.gate_proj))

    def _gram(self, proj: str, expert: int) -> tuple[mx.array, int]:
        """(X^T X, n) over the tokens routed to `expert`, X being what `proj` multiplies."""
        tokens = self._tokens[expert]
        if not len(tokens):
            dims = getattr(self.block, proj).weight.shape[-1]
            return mx.zeros((dims, dims)), 0
        x = self._down_inputs(expert) if proj == "down_proj" else self.x[mx.array(tokens)]
        return x.T @ x, len(tokens)

    def _prior(self, proj: str) -> mx.array:
        """The layer-wide H, over every (token, chosen expert) pair; made once per kind of input (each call of
        `hessians` takes a chunk of experts, and at hidden 4096 x^T x alone is 0.3 TFLOP for 16k tokens)."""
        kind = "down" if proj == "down_proj" else "x"
        if kind not in self._priors:
            if kind == "x":
                prior = self.x.T @ self.x / self.x.shape[0]
            else:
                prior, count = 0.0, 0
                for e in range(len(self._tokens)):
                    gram, n = self._gram(proj, e)
                    prior, count = prior + gram, count + n
                    mx.eval(prior)
                prior = prior / max(count, 1)
            mx.eval(prior)
            self._priors[kind] = prior
        return self._priors[kind]

    def hessians(self, proj: str, experts: range) -> mx.array:
        """H [len(experts), in, in] for `proj` (gate_proj, up_proj or down_proj) of these experts."""
        prior = PRIOR * self._prior(proj)
        out = []
        for e in experts:
            gram, n = self._gram(proj, e)
            out.append(gram / max(n, 1) + prior)
        return mx.stack(out)


def _compute_dtype(layer: nn.Module) -> mx.Dtype:
    """float32 on the CPU (as everywhere there); elsewhere the layer's own floating dtype, so that its stacked
    experts are not converted to float32 as a whole (twice their size) in each forward."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return next((v.dtype for _, v in tree_flatten(layer.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                mx.float32)


class Calibrator:
    """Carries the calibration windows' hidden states through the model, one decoder layer at a time."""

    def __init__(self, model: nn.Module, windows: np.ndarray):
        self.model = model
        self.windows = windows
        self.hidden: mx.array | None = None  # input of the next decoder layer, [windows, WINDOW, hidden]
        self.layer_paths = {}
        self.embeddings = []  # (path, dims) of the token embeddings
        rows = []
        for path, module in model.named_modules():
            index = layer_of(path + ".")
            if index is not None and path.endswith(f"layers.{index}"):
                self.layer_paths[index] = path
            elif index is None and isinstance(module, nn.Embedding):
                self.embeddings.append((path, module.weight.shape[-1]))
                rows.append(module.weight.shape[0])
        if rows and windows.max() >= min(rows):  # a gather past the embedding's end reads arbitrary memory
            raise CalibrationError(f"the tokenizer gives token id {windows.max()}, but the model's embedding has "
                                   f"{min(rows)} rows: tokenizer and weights do not belong together")

    def _run(self, layer: int, on_layer, *, zero_embeddings: bool, swaps=()):
        """The model's forward over every batch of windows, with decoder layers before `layer` passing their
        input through, and `on_layer(batch_start, layer_module, x, args, kwargs)` in place of `layer`."""
        start = 0

        def probe(index):
            def run(module, x, args, kwargs):
                if index != layer:
                    return x
                on_layer(start, module, x, args, kwargs)
                raise _Stop
            return run

        swaps = [*swaps, *((p, _LayerProbe(module_at(self.model, p), probe(i))) for i, p in self.layer_paths.items())]
        swaps += [(p, _Zeros(dims)) for p, dims in self.embeddings] if zero_embeddings else []
        replaced = []
        try:
            for path, module in swaps:
                replaced.append((path, swap_module(self.model, path, module)))
            step = max(1, BATCH_TOKENS // WINDOW)
            for start in range(0, len(self.windows), step):
                try:
                    self.model(mx.array(self.windows[start : start + step]))
                except _Stop:
                    continue
                raise CalibrationError(f"calibration: the model's forward never reached decoder layer {layer}")
        finally:
            for path, module in reversed(replaced):
                swap_module(self.model, path, module)

    def embed(self):
        """Start: the hidden states entering the first decoder layer (call with the embeddings loaded)."""
        captured = []

        def keep_input(start, module, x, args, kwargs):
            captured.append(x.astype(mx.float32))
            mx.eval(captured[-1])

        self._run(min(self.layer_paths), keep_input, zero_embeddings=False)
        self.hidden = mx.concatenate(captured)

    def advance(self, layer: int, block: ExpertBlock | None) -> ExpertInputs | None:
        """Run decoder layer `layer` (its source weights loaded) on the hidden states; keep its output as the
        next layer's input, and return what its expert block saw."""
        outputs, xs, ids = [], [], []

        def run_layer(start, module, x, args, kwargs):
            h = self.hidden[start : start + x.shape[0]].astype(_compute_dtype(module))
            outputs.append(module(h, *args, **kwargs).astype(mx.float32))
            mx.eval(outputs[-1], xs[-1:])

        def keep_expert_inputs(x, indices):
            xs.append(x.reshape(-1, x.shape[-1]).astype(mx.float32))
            ids.append(np.array(indices).reshape(-1, indices.shape[-1]))

        swaps = [] if block is None else [(block.path, ExpertCallHook(module_at(self.model, block.path), keep_expert_inputs))]
        self._run(layer, run_layer, zero_embeddings=True, swaps=swaps)
        self.hidden = mx.concatenate(outputs)
        if block is None:
            return None
        return ExpertInputs(mx.concatenate(xs), np.concatenate(ids), module_at(self.model, block.path))
