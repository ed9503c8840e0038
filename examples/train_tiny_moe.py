#!/usr/bin/env python3
"""Train the tiny Mixture-of-Experts model that flashmoe-mlx ships as its offline default.

Everything is made here from text that is already on the machine: the corpus is the Python
documentation installed by Debian's ``python3-doc`` package (PSF license), stripped from HTML to
plain text; a byte-level BPE tokenizer is trained on it with ``tokenizers``; a ``Qwen3MoeForCausalLM``
(``model_type: qwen3_moe``, which mlx-lm runs) is trained with transformers + torch; the result is
saved as an ordinary Hugging Face checkpoint in bfloat16, sharded into safetensors files of at most
16 MB, with tokenizer files and generation_config.json.

The shipped flashmoe_mlx/default_model came from the three steps below (see its SOURCE.md). The
defaults are step 2's recipe. Preparation and training can run on different machines::

    # 1. corpus + tokenizer + token ids (needs python3-doc; about 15 s on a CPU)
    python examples/train_tiny_moe.py --prepare-only --data build/tiny-moe-data

    # 2. pre-training on the plain text (CUDA when available, else CPU; about 3 minutes on one H200)
    python examples/train_tiny_moe.py --data build/tiny-moe-data --out build/tiny-moe-base

    # 3. chat-format stage: continue with 3 of every 8 rows drawn from ChatML conversations built
    #    from the docs' sections (section heading as the question, its first paragraphs as the answer)
    python examples/train_tiny_moe.py --data build/tiny-moe-data --init-from build/tiny-moe-base \
        --out flashmoe_mlx/default_model --chat-frac 0.375 --batch-size 8 --lr 2e-4 --warmup 50 \
        --aux-coef 0.05 --steps 1000 --stop-after 502 --threads 2

Without ``--prepare-only`` and with a ``--data`` folder that does not hold prepared files yet, the
preparation runs first, then the training. On a CPU pass ``--threads`` and ``--max-minutes`` (training then shortens its
schedule to fit, after timing 20 steps). The weights with the lowest validation loss are the ones saved. With chat data, that loss
is the sum of the plain-text and chat validation losses.
Runs are deterministic given ``--seed`` as far as torch allows (CUDA kernels and thread counts can
still change the last bits). The script writes no SOURCE.md; the training summary (perplexities,
expert loads, history) goes to ``<out>.train_summary.json`` beside the checkpoint unless ``--summary``
says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import random
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DOC_DIRS = ["/usr/share/doc/python3-doc/html", "/usr/share/doc/python3/html"]
SKIP_PAGES = {"genindex", "search", "py-modindex", "contents", "glossary"}  # indexes and link lists

DOC_SEP = "\n\x1e\n"  # record separator between documents in corpus text files


# ----------------------------------------------------------------------------------------------
# corpus


class _MainText(HTMLParser):
    """Collects the text of a Sphinx page's ``<div role="main">``; drops scripts, styles, ¶ links."""

    BLOCK = {"p", "div", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
             "table", "ul", "ol", "dl", "blockquote", "section", "figure", "caption"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # div nesting inside the main div (0 = outside)
        self.skip = 0           # inside script/style/headerlink
        self.pre = 0
        self.parts: list[str] = []
        self.heading = None     # [level, start index in parts, text pieces] while inside <h1>..<h3>
        self.headings: list[tuple[int, int, str]] = []  # (start, end index in parts, heading text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in ("h1", "h2", "h3") and self.heading is None:
            self.heading = [tag, len(self.parts), []]
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in ("script", "style") or (tag == "a" and self.skip):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.parts.append("\n")
        if self.heading is not None and tag == self.heading[0]:
            self.headings.append((self.heading[1], len(self.parts), "".join(self.heading[2])))
            self.heading = None
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0 or self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
        self.parts.append(data)
        if self.heading is not None:
            self.heading[2].append(data)


def html_to_text(raw: str) -> str:
    p = _MainText()
    p.feed(raw)
    p.close()
    return _clean("".join(p.parts))


def html_to_sections(raw: str) -> list[tuple[str, str]]:
    """(heading, body text) for each h1-h3 section of the page's main text."""
    p = _MainText()
    p.feed(raw)
    p.close()
    out = []
    for i, (_, end, title) in enumerate(p.headings):
        stop = p.headings[i + 1][0] if i + 1 < len(p.headings) else len(p.parts)
        title = re.sub(r"^[\d.]+\s+", "", _clean(title)).strip()
        body = _clean("".join(p.parts[end:stop]))
        if title and body:
            out.append((title, body))
    return out


def _clean(text: str) -> str:
    text = html.unescape(text).replace("\u00b6", "").replace("\xa0", " ")
    out, blank = [], 0
    for ln in text.split("\n"):
        ln = ln.rstrip()
        if ln.startswith(" ") and not ln.startswith("  "):  # a collapsed leading space, not code indent
            ln = ln[1:]
        if ln:
            out.append(ln)
            blank = 0
        else:
            blank += 1
            if blank == 1 and out:
                out.append("")
    return "\n".join(out).strip()


def find_docs_dir(explicit: str | None) -> Path:
    cands = [explicit] if explicit else DOC_DIRS
    for c in cands:
        p = Path(c)
        if (p / "index.html").exists() or any(p.glob("*/index.html")):
            return p.resolve()
    sys.exit(
        "error: the Python documentation (Debian package python3-doc) is not installed.\n"
        "Install it with:  apt-get update && apt-get install -y python3-doc\n"
        "(or pass --docs-dir to a folder of Sphinx HTML pages, or --data to prepared data).")


def build_corpus(docs_dir: Path) -> list[tuple[str, str, list]]:
    """(relative path, plain text, [(heading, section text)]) for each HTML page, sorted by path."""
    docs = []
    for path in sorted(docs_dir.rglob("*.html")):
        rel = path.relative_to(docs_dir).as_posix()
        if rel.startswith("_") or path.stem in SKIP_PAGES or path.stem.startswith("genindex"):
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = html_to_text(raw)
        if len(text) >= 200:
            docs.append((rel, text, html_to_sections(raw)))
    return docs


def split_docs(docs, val_frac: float, seed: int):
    """Hold out whole pages, about ``val_frac`` of the characters: pages are taken in the order of a
    seeded hash of their path until the held-out share is reached (skipping pages that would overshoot)."""
    def h(rel):
        return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()

    target = val_frac * sum(len(d[1]) for d in docs)
    val_ids, got = set(), 0
    for i in sorted(range(len(docs)), key=lambda i: h(docs[i][0])):
        if got >= target:
            break
        if got + len(docs[i][1]) <= 1.25 * target:
            val_ids.add(i)
            got += len(docs[i][1])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


CHAT_PROMPTS = ["Tell me about {t}.", "What is {t}?", "Explain {t}.", "{t}", "Can you describe {t}?",
                "Write a short note on {t}.", "How does {t} work?", 'Summarize the section "{t}".']
CHAT_SYSTEMS = ["You are a helpful assistant.", "You answer questions about Python.",
                "You are a concise technical writer."]


def chat_examples(docs, seed: int, max_chars: int = 1200) -> list[str]:
    """ChatML conversations made from the docs' sections: the user names a section's heading, the
    assistant answers with the section's first paragraphs. They teach the model the chat format
    (``<|im_start|>``, ``<|im_end|>``) so that chat-templated prompts get sensible continuations."""
    rng = random.Random(seed)
    out = []
    for _, _, sections in docs:
        for title, body in sections:
            if len(body) < 80 or len(title) > 120:
                continue
            ans = ""
            for para in body.split("\n\n"):
                if ans and len(ans) + len(para) + 2 > max_chars:
                    break
                ans = f"{ans}\n\n{para}" if ans else para
            ans = ans[: 2 * max_chars]
            q = rng.choice(CHAT_PROMPTS).format(t=title)
            system = f"{IM_START}system\n{rng.choice(CHAT_SYSTEMS)}{IM_END}\n" if rng.random() < 0.25 else ""
            out.append(f"{system}{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{ans}{IM_END}\n")
    return out


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(train_texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None, bos_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # keep the template inside tokenizer_config.json too, for loaders that only read that file
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # also understood by transformers 4.x
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare(args) -> None:
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    docs_dir = find_docs_dir(args.docs_dir)
    t0 = time.time()
    docs = build_corpus(docs_dir)
    train_docs, val_docs = split_docs(docs, args.val_frac, args.seed)
    train, val = [d[1] for d in train_docs], [d[1] for d in val_docs]
    (data / "train.txt").write_text(DOC_SEP.join(train), encoding="utf-8")
    (data / "val.txt").write_text(DOC_SEP.join(val), encoding="utf-8")
    tok = train_tokenizer(train, args.vocab_size, data / "tokenizer")
    tr, va = encode_docs(tok, train), encode_docs(tok, val)
    np.save(data / "train_ids.npy", tr)
    np.save(data / "val_ids.npy", va)
    chat_tr = encode_docs(tok, chat_examples(train_docs, args.seed))
    chat_va = encode_docs(tok, chat_examples(val_docs, args.seed + 1))
    np.save(data / "chat_train_ids.npy", chat_tr)
    np.save(data / "chat_val_ids.npy", chat_va)
    meta = {
        "docs_dir": str(docs_dir), "pages_train": len(train), "pages_val": len(val),
        "chars_train": sum(map(len, train)), "chars_val": sum(map(len, val)),
        "tokens_train": int(tr.size), "tokens_val": int(va.size), "vocab_size": tok.get_vocab_size(),
        "chat_tokens_train": int(chat_tr.size), "chat_tokens_val": int(chat_va.size),
        "seed": args.seed, "val_frac": args.val_frac,
    }
    (data / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"prepared {data} in {time.time() - t0:.1f}s: {json.dumps(meta)}", flush=True)


# ----------------------------------------------------------------------------------------------
# model and training


def make_config(args, vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    for name, v in [("hidden_size", args.hidden), ("num_heads*head_dim", args.heads * args.head_dim),
                    ("moe_intermediate_size", args.moe_intermediate)]:
        if v % 64:
            sys.exit(f"error: {name}={v} must be divisible by 64 (the converter quantizes in groups of 64)")
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_dropout=args.attn_dropout,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=args.aux_coef,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, initializer_range=0.02)


def add_dropout(model, p: float):
    """Training-time dropout on the embedding output and on each block's attention and MoE outputs
    (Qwen3-MoE has none of its own besides attention dropout); inactive in eval mode, nothing saved."""
    import torch

    if p <= 0:
        return

    def hook(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, p, True)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def pick_experts_impl(model, device, dtype):
    """Fastest transformers experts kernel that runs forward+backward here."""
    import torch

    if not hasattr(model, "set_experts_implementation"):
        return getattr(model.config, "_experts_implementation", None) or "default"
    # (batched_mm gathers one weight matrix per routed token: far too much memory for training)
    choices = ["grouped_mm", "eager"] if device.type == "cuda" else ["eager", "grouped_mm"]
    x = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    for impl in choices:
        try:
            model.set_experts_implementation(impl)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return impl
        except Exception as e:  # noqa: BLE001 - any failure means "try the next one"
            print(f"experts implementation {impl!r} unavailable: {type(e).__name__}: {e}", flush=True)
            model.zero_grad(set_to_none=True)
    raise RuntimeError("no experts implementation works")


def evaluate(model, ids: np.ndarray, seq_len: int, batch: int, device, dtype):
    """Mean next-token NLL over non-overlapping windows of the held-out ids; returns (nll, targets)."""
    import torch

    n = (ids.size - 1) // seq_len
    tot, count, targets = 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for s in range(0, n, batch):
            rows = [ids[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64) for i in range(s, min(n, s + batch))]
            t = torch.from_numpy(np.stack(rows)).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=t[:, :-1]).logits
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), t[:, 1:].reshape(-1), reduction="sum")
            tot += nll.item()
            count += t[:, 1:].numel()
            targets.append(t[:, 1:].reshape(-1).cpu().numpy())
    model.train()
    return tot / count, np.concatenate(targets)


def unigram_nll(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def expert_load(model, ids: np.ndarray, seq_len: int, batch: int, device, dtype):
    """Fraction of the routed (token, slot) pairs each expert gets, per layer, over the held-out ids."""
    import torch

    n = ids.size // seq_len
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    counts = None
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for s in range(0, n, batch):
            t = torch.from_numpy(ids[s * seq_len:min(n, s + batch) * seq_len].astype(np.int64))
            out = model(input_ids=t.reshape(-1, seq_len).to(device), output_router_logits=True)
            c = torch.stack([torch.bincount(rl.float().topk(k, dim=-1).indices.reshape(-1), minlength=e)
                             for rl in out.router_logits]).cpu().numpy()
            counts = c if counts is None else counts + c
    model.train()
    return counts / counts.sum(axis=1, keepdims=True)


def save_checkpoint(model, out: Path, tok_dir: Path, shard: str):
    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    model.config.output_router_logits = False
    model.config.use_cache = True
    attn_dropout, model.config.attention_dropout = model.config.attention_dropout, 0.0
    model.to(torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size=shard)
    model.to(torch.float32)
    model.config.output_router_logits = True
    model.config.attention_dropout = attn_dropout
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # fields other readers (mlx-lm's ModelArgs, older transformers, our converter) look for
    cfg["num_experts"] = model.config.num_experts
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    eos = model.config.eos_token_id
    im_end = json.loads((tok_dir / "tokenizer.json").read_text())
    im_end_id = next(t["id"] for t in im_end["added_tokens"] if t["content"] == IM_END)
    GenerationConfig(eos_token_id=[eos, im_end_id], pad_token_id=eos, do_sample=True, temperature=0.8,
                     top_p=0.95, max_new_tokens=256).save_pretrained(str(out))
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)


def train(args) -> None:
    import torch
    from transformers import Qwen3MoeForCausalLM

    data = Path(args.data)
    tok_dir = data / "tokenizer"
    train_ids = np.load(data / "train_ids.npy")
    val_ids = np.load(data / "val_ids.npy")
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = max(tj["model"]["vocab"].values()) + 1
    vocab = max(vocab, max(t["id"] for t in tj["added_tokens"]) + 1)
    eos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == EOS)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.bfloat16 if device.type == "cuda" else torch.float32

    chat_ids = chat_val = None
    if args.chat_frac > 0:
        chat_ids = np.load(data / "chat_train_ids.npy")
        chat_val = np.load(data / "chat_val_ids.npy")
    if args.init_from:  # continue from a checkpoint (e.g. the chat-format stage after pre-training)
        model = Qwen3MoeForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        assert model.config.vocab_size == vocab, "checkpoint and tokenizer disagree on the vocabulary"
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = args.aux_coef
        model.config.attention_dropout = args.attn_dropout
    else:
        config = make_config(args, vocab, eos_id)
        model = Qwen3MoeForCausalLM(config).to(device)
    add_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    impl = pick_experts_impl(model, device, amp)
    print(f"device={device} experts_impl={impl} params={n_params:,} expert_params={n_expert:,} "
          f"train_tokens={train_ids.size:,} val_tokens={val_ids.size:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")

    total = args.steps  # may shrink once to fit --max-minutes (then the schedule follows it)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = np.random.default_rng(args.seed)
    L, B = args.seq_len, args.batch_size
    starts_max = train_ids.size - L - 1
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    n_chat = int(round(B * args.chat_frac)) if chat_ids is not None else 0
    chat_t = torch.from_numpy(chat_ids.astype(np.int64)) if n_chat else None

    best = (float("inf"), -1, None)
    history = []
    t0 = t_mark = time.time()
    aux_coef = args.aux_coef
    step = -1
    while step + 1 < total:
        step += 1
        if step in (5, 25) and device.type == "cuda":
            torch.cuda.synchronize()
        if args.max_minutes and step == 25:
            per_step = (time.time() - t_mark) / 20
            fit = int(args.max_minutes * 60 * 0.92 / (per_step * (1 + 0.02)))  # ~2% for evals
            if fit < total:
                total = max(step + 1, fit)
                print(f"--max-minutes {args.max_minutes}: {per_step * 1000:.0f} ms/step, "
                      f"training {total} steps instead of {args.steps}", flush=True)
        if step == 5:
            t_mark = time.time()
        starts = torch.from_numpy(rng.integers(0, starts_max, size=B - n_chat))
        batch = train_t[starts[:, None] + torch.arange(L + 1)[None, :]]
        if n_chat:  # rows from the ChatML conversations
            cs = torch.from_numpy(rng.integers(0, chat_t.numel() - L - 1, size=n_chat))
            batch = torch.cat([batch, chat_t[cs[:, None] + torch.arange(L + 1)[None, :]]])
        batch = batch.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            out = model(input_ids=batch[:, :-1])
            logits = out.logits
        lm = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                               batch[:, 1:].reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
        loss = lm + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()

        last = step == total - 1
        out_of_time = (args.max_minutes and (time.time() - t0) > args.max_minutes * 60) or \
            (args.stop_after and step + 1 >= args.stop_after)
        if step % args.log_every == 0 or last or out_of_time:
            print(f"step {step:5d} lm {lm.item():.4f} aux {aux.item():.4f} gn {gn.item():.2f} "
                  f"lr {lr_at(step):.2e} {time.time() - t0:7.1f}s", flush=True)
        if (step % args.eval_every == 0 and (step > 0 or args.init_from)) or last or out_of_time:
            nll, _ = evaluate(model, val_ids, L, args.eval_batch, device, amp)
            history.append({"step": step, "val_nll": nll, "val_ppl": math.exp(nll), "time_s": time.time() - t0})
            msg = f"  eval step {step}: val nll {nll:.4f} ppl {math.exp(nll):.2f}"
            if chat_val is not None:
                cnll, _ = evaluate(model, chat_val, L, args.eval_batch, device, amp)
                history[-1]["chat_val_ppl"] = math.exp(cnll)
                msg += f" | chat val ppl {math.exp(cnll):.2f}"
            print(msg, flush=True)
            score = nll + (cnll if chat_val is not None else 0.0)  # with chat data: both must stay good
            if score < best[0]:
                best = (score, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if out_of_time:
            print(f"stopping at step {step}: --max-minutes / --stop-after reached", flush=True)
            break
    train_time = time.time() - t0

    # final numbers, with the best (lowest validation loss) weights, rounded to bf16 as shipped
    model.load_state_dict(best[2])
    model.to(torch.bfloat16).to(torch.float32)
    nll, targets = evaluate(model, val_ids, L, args.eval_batch, device, torch.float32)
    uni = unigram_nll(train_ids, targets, vocab)
    chat_ppl = math.exp(evaluate(model, chat_val, L, args.eval_batch, device, torch.float32)[0]) \
        if chat_val is not None else None
    loads = expert_load(model, val_ids, L, args.eval_batch, device, torch.float32)
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "experts_impl": impl, "steps_planned": args.steps, "steps_run": step + 1, "best_step": best[1], "train_time_s": round(train_time, 1),
        "tokens_seen": (step + 1) * B * L, "params": n_params, "expert_params": n_expert,
        "active_params_per_token": n_params - n_expert + n_expert * args.top_k // args.experts,
        "val_tokens_scored": int(targets.size), "val_ppl_bf16": math.exp(nll),
        "unigram_val_ppl": math.exp(uni), "chat_val_ppl_bf16": chat_ppl, "expert_load_min": float(loads.min()),
        "expert_load_max": float(loads.max()), "expert_load_per_layer": loads.round(4).tolist(),
        "history": history, "args": vars(args),
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "expert_load_per_layer")}),
          flush=True)
    out = Path(args.out)
    model.to(torch.float32)
    save_checkpoint(model, out, tok_dir, args.max_shard_size)
    (Path(args.summary) if args.summary else out.parent / f"{out.name}.train_summary.json").write_text(
        json.dumps(summary, indent=2) + "\n")
    sample(model, tok_dir, device)


def sample(model, tok_dir: Path, device, prompts=("The Python", "A list is", "To open a file,")):
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    g = torch.Generator(device="cpu").manual_seed(0)
    model.eval()
    for p in prompts:
        ids = torch.tensor([tok.encode(p).ids], device=device)
        with torch.no_grad():
            for _ in range(40):
                logits = model(input_ids=ids).logits[0, -1].float() / 0.8
                nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(device)
                ids = torch.cat([ids, nxt[None]], dim=1)
        print(f"sample: {tok.decode(ids[0].tolist())!r}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="tiny-moe", help="checkpoint folder to write")
    ap.add_argument("--data", default="build/tiny-moe-data", help="folder for the prepared corpus, tokenizer and ids")
    ap.add_argument("--docs-dir", default=None, help="Sphinx HTML folder (default: python3-doc's)")
    ap.add_argument("--prepare-only", action="store_true", help="build corpus + tokenizer + ids, then stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-frac", type=float, default=0.02)
    ap.add_argument("--vocab-size", type=int, default=4096)
    # model
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--init-from", default=None, help="HF checkpoint to continue training from")
    ap.add_argument("--chat-frac", type=float, default=0.0,
                    help="fraction of each batch drawn from ChatML conversations made from the docs")
    ap.add_argument("--dropout", type=float, default=0.2, help="training-only residual-branch dropout")
    ap.add_argument("--attn-dropout", type=float, default=0.0)
    # training
    ap.add_argument("--steps", type=int, default=1277)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (0: no limit)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop after this many steps without changing the --steps schedule (0: run it all)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--max-shard-size", default="16MB")
    ap.add_argument("--summary", default=None, help="where to write the training summary JSON")
    args = ap.parse_args(argv)

    needed = ["train_ids.npy", "val_ids.npy", "tokenizer/tokenizer.json"]
    needed += ["chat_train_ids.npy", "chat_val_ids.npy"] if args.chat_frac > 0 else []
    prepared = all((Path(args.data) / f).exists() for f in needed)
    if args.prepare_only or not prepared:
        prepare(args)
        if args.prepare_only:
            return
    train(args)


if __name__ == "__main__":
    main()
