"""An offline byte-level BPE tokenizer for Perch's tiny presets and trained fixtures.

No model hub is needed: the corpus is English text that ships with Python (the `pydoc_data.topics`
help pages and the docstrings of a fixed list of pure-Python standard-library modules, read from
their source with `ast`, never imported), so every machine with the same Python version builds
the same tokenizer. The text differs between Python versions; `corpus_sha256()` names the exact
corpus a tokenizer came from, and fixture caches key on it.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from perch.errors import PerchError

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
# Every HELDOUT_EVERY-th distinct paragraph of the corpus is held out (see split_documents).
HELDOUT_EVERY = 10
MIN_VOCAB = 300  # 256 byte symbols + the special token + a few merges
MIN_FREQUENCY = 2
# Pure-Python modules whose docstrings join the corpus (~330k characters on Python 3.11). With the
# help pages alone (~80k train tokens, each seen ~2-4 times in training) the fixtures overfit more.
DOCSTRING_MODULES = (
    "abc argparse ast base64 bisect calendar collections configparser contextlib copy csv "
    "dataclasses datetime difflib enum fractions functools glob heapq html inspect ipaddress "
    "json logging pathlib pickle pprint queue random shlex shutil statistics string "
    "tarfile tempfile textwrap threading timeit typing urllib.parse uuid warnings zipfile"
).split()


def corpus_documents() -> list[str]:
    """The corpus as documents: the `pydoc_data.topics` pages in sorted key order, then one
    document of docstrings per module of DOCSTRING_MODULES (in that order)."""
    return list(_corpus_documents())


@functools.lru_cache(maxsize=1)
def _corpus_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    return tuple(docs + [d for d in map(_module_docstrings, DOCSTRING_MODULES) if d])


def _module_docstrings(name: str) -> str:
    """A module's public docstrings in source order, each under its dotted name.

    Parsed from the source file rather than imported: importing runs code, and a live module's
    attributes can be patched by whoever imported it first (pytest does), which would change the text.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""  # no source shipped (a frozen or stripped install): the corpus hash records it
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    parts = [ast.get_docstring(tree) or ""]
    for node, qualname in _public_defs(tree, name):
        doc = ast.get_docstring(node)
        parts.append(f"{qualname}\n\n{doc}" if doc else "")
    return "\n\n".join(p for p in parts if p).strip()


def _public_defs(node: ast.AST, prefix: str) -> Iterator[tuple[ast.AST, str]]:
    """(node, dotted name) for public functions and classes, descending into classes."""
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if child.name.startswith("_"):
                continue
            yield child, f"{prefix}.{child.name}"
            if isinstance(child, ast.ClassDef):
                yield from _public_defs(child, f"{prefix}.{child.name}")


def corpus_text() -> str:
    """The whole corpus as one string: the documents joined by blank lines. Deterministic."""
    return "\n\n".join(corpus_documents())


def corpus_sha256() -> str:
    """sha256 of `corpus_text()`: changes when the Python version ships different help text."""
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()


def split_documents() -> tuple[list[str], list[str]]:
    """(train, held-out) documents, one per corpus document that keeps any text, in corpus order.

    The topics repeat themselves (the "compound" topic contains "if", "while", ...: ~20% of the
    text), so each blank-line paragraph is kept only at its first occurrence; of the paragraphs
    left, every 10th (index % 10 == 9) is held out. No paragraph is in both splits.
    """
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    n_kept = 0
    for doc in corpus_documents():
        parts: tuple[list[str], list[str]] = ([], [])
        for para in doc.split("\n\n"):
            if not para.strip() or para in seen:
                continue
            seen.add(para)
            parts[n_kept % HELDOUT_EVERY == HELDOUT_EVERY - 1].append(para)
            n_kept += 1
        train.extend(["\n\n".join(parts[0])] if parts[0] else [])
        heldout.extend(["\n\n".join(parts[1])] if parts[1] else [])
    return train, heldout


def split_corpus() -> tuple[str, str]:
    """(train_text, heldout_text): the split of `split_documents`, each joined by blank lines."""
    train, heldout = split_documents()
    return "\n\n".join(train), "\n\n".join(heldout)


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the train split; `<|endoftext|>` is id 0 (eos/bos/pad).

    The same `vocab_size` gives the same vocabulary and merges on every run (measured in a fresh
    process each time). Built once per size per process; each call returns an independent copy.
    """
    if vocab_size < MIN_VOCAB:
        raise PerchError(
            f"tokenizer vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB} (256 bytes + {EOS_TOKEN} + merges); pass a larger vocab_size"
        )
    # A copy, so a caller that enables padding or truncation does not change the cached one.
    return Tokenizer.from_str(_build_tokenizer_json(vocab_size))


@functools.lru_cache(maxsize=8)
def _build_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[EOS_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_docs, _ = split_documents()
    tok.train_from_iterator(train_docs, trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID, "the special token must be id 0"
    return tok.to_str()


def tokenizer_settings(vocab_size: int) -> dict:
    """Everything that determines `build_tokenizer(vocab_size)`; used in cache keys."""
    return {
        "kind": "byte_level_bpe",
        "vocab_size": vocab_size,
        "min_frequency": MIN_FREQUENCY,
        "eos_token": EOS_TOKEN,
        "heldout_every": HELDOUT_EVERY,
        "corpus_sha256": corpus_sha256(),
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then loads it offline as a fast tokenizer
    with eos, bos and pad all set to `<|endoftext|>`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": 2048,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out
