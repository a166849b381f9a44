"""Multi30k (English -> German), read from the standard local text files.

Files: one sentence per line, line i of the ``.en`` file translating line i of the ``.de`` file,
plain or ``.gz``, in ``<root>/multi30k/`` or in ``<root>/`` itself:
``train.{en,de}``, ``val.{en,de}`` and ``test_2016_flickr.{en,de}`` (the names in
https://github.com/multi30k/dataset, ``data/task1/raw``; ``test.{en,de}`` is accepted too).

Tokenization: lowercase, then the regular expression ``\\w+|[^\\w\\s]`` (runs of Unicode letters and
digits are words; every other non-space character is a token of its own), so
"A man's T-shirt." -> ``a man ' s t - shirt .``. The paper used torchtext with spaCy tokenizers
(vocabulary 9,521 tokens); this needs no model download, but its vocabulary size on the real files
will differ somewhat from 9,521 and has not been measured here (the files cannot be downloaded on
this machine). Models should take the size from ``len(dataset.vocab)``.

Vocabulary: one shared vocabulary for source and target (the paper's Table 9 shares the
9,521 x 512 embedding): the special tokens ``<unk>`` = 0, ``<pad>`` = 1 (the padding index of
Table 9), ``<bos>`` = 2, ``<eos>`` = 3, then every token seen at least ``MIN_FREQ`` = 2 times in the
English and German training sentences together, most frequent first (ties alphabetical), so the
ids are the same on every machine. It is always built from the training split, also when the test
split is loaded. Every sentence is encoded as ``<bos> tokens <eos>``; unknown tokens map to ``<unk>``.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from collections import Counter
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["tokenize", "Vocab", "TranslationDataset", "load_multi30k", "find_multi30k_dir", "collate",
           "UNK", "PAD", "BOS", "EOS", "SPECIALS", "MIN_FREQ", "SRC_LANG", "TGT_LANG", "SPLITS"]

SPECIALS = ("<unk>", "<pad>", "<bos>", "<eos>")
UNK, PAD, BOS, EOS = range(4)
MIN_FREQ = 2
SRC_LANG, TGT_LANG = "en", "de"
SPLITS = {"train": ("train",), "val": ("val",), "test": ("test_2016_flickr", "test")}  # split -> file stems
HOW = ("get the files from https://github.com/multi30k/dataset (data/task1/raw: train, val, test_2016_flickr "
       ".en/.de, .gz is fine) and put them in <root>/multi30k/, then set data.root=<root>")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(sentence: str) -> list[str]:
    """Lowercase + regex split into words and single punctuation marks (see the module docstring)."""
    return _TOKEN_RE.findall(sentence.lower())


class Vocab:
    """A token <-> id map: ``itos`` (list of tokens, index = id) and ``stoi`` (dict token -> id)."""

    def __init__(self, itos: list[str]):
        if tuple(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with the special tokens {SPECIALS}, got {itos[:4]}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences, min_freq: int = MIN_FREQ) -> "Vocab":
        """Specials, then tokens with count >= min_freq, most frequent first, ties alphabetical."""
        counts = Counter(tok for sent in sentences for tok in sent)
        for s in SPECIALS:
            counts.pop(s, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the tokens in id order: two vocabularies with the same fingerprint map every id to
        the same token (checkpoints keep it as ``dataset.vocabulary``)."""
        return hashlib.sha256("\n".join(self.itos).encode()).hexdigest()[:16]

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, UNK)

    def encode(self, tokens: list[str]) -> list[int]:
        """``<bos>`` + ids + ``<eos>``."""
        return [BOS, *(self.stoi.get(t, UNK) for t in tokens), EOS]

    def decode(self, ids) -> list[str]:
        """Tokens of ``ids`` without ``<bos>``, ``<pad>``, and from ``<eos>`` on."""
        out = []
        for i in (int(i) for i in ids):
            if i == EOS:
                break
            if i not in (BOS, PAD):
                out.append(self.itos[i])
        return out


def _flat(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([i for s in sequences for i in s], dtype=torch.long)
    return ids, offsets


class TranslationDataset(Dataset):
    """(src_ids (S,) long, tgt_ids (T,) long) pairs, each ``<bos> ... <eos>``; ``.vocab`` is shared.

    Stored as two flat id tensors plus offsets (a few MB for Multi30k, not 29k small tensors).
    """

    def __init__(self, src: list[list[int]], tgt: list[list[int]], vocab: Vocab, split: str = "train"):
        if len(src) != len(tgt):
            raise ValueError(f"multi30k: {len(src)} source but {len(tgt)} target sentences")
        self.vocab, self.split = vocab, split
        self._src, self._src_off = _flat(src)
        self._tgt, self._tgt_off = _flat(tgt)

    @property
    def train(self) -> bool:
        return self.split == "train"

    def __len__(self) -> int:
        return self._src_off.shape[0] - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sentence pairs")
        i = i % len(self)
        return (self._src[self._src_off[i]:self._src_off[i + 1]],
                self._tgt[self._tgt_off[i]:self._tgt_off[i + 1]])

    def head(self, n: int) -> "TranslationDataset":
        """The first ``n`` pairs (same vocabulary); all of them where ``n`` exceeds their number."""
        n = min(n, len(self))
        out = TranslationDataset.__new__(TranslationDataset)
        out.vocab, out.split = self.vocab, self.split
        out._src, out._src_off = self._src[:int(self._src_off[n])], self._src_off[:n + 1]
        out._tgt, out._tgt_off = self._tgt[:int(self._tgt_off[n])], self._tgt_off[:n + 1]
        return out

    def __repr__(self) -> str:
        return f"TranslationDataset(multi30k {self.split}, n={len(self)}, vocab={len(self.vocab)})"


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of (src, tgt) pairs with ``<pad>`` = 1: (src (B, S), tgt (B, T)) long tensors."""
    src = torch.nn.utils.rnn.pad_sequence([s for s, _ in batch], batch_first=True, padding_value=PAD)
    tgt = torch.nn.utils.rnn.pad_sequence([t for _, t in batch], batch_first=True, padding_value=PAD)
    return src, tgt


def find_multi30k_dir(root: Path) -> Path:
    """The folder holding ``train.en`` (or ``train.en.gz``): ``<root>/multi30k`` or ``<root>``."""
    candidates = [root / "multi30k", root]
    for c in candidates:
        if any((c / f"train.{SRC_LANG}{gz}").is_file() for gz in ("", ".gz")):
            return c
    raise FileNotFoundError(f"multi30k: no train.{SRC_LANG}[.gz] in {' or '.join(map(str, candidates))}. "
                            f"Multi30k cannot be downloaded here: {HOW}.")


def _split_file(folder: Path, split: str, lang: str) -> Path:
    tried = []
    for stem in SPLITS[split]:
        for gz in ("", ".gz"):
            path = folder / f"{stem}.{lang}{gz}"
            if path.is_file():
                return path
            tried.append(path.name)
    raise FileNotFoundError(f"multi30k: no {split} file for {lang!r} in {folder} (looked for {', '.join(tried)}); "
                            f"{HOW}.")


def _read_lines(path: Path) -> list[str]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a token
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8-sig")
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt, truncated or not UTF-8 text ({type(e).__name__}: {e}); "
                         f"replace it: {HOW}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file
    return [line.rstrip("\r") for line in lines]


def _tokenized(folder: Path, split: str) -> tuple[list[list[str]], list[list[str]]]:
    src_path, tgt_path = _split_file(folder, split, SRC_LANG), _split_file(folder, split, TGT_LANG)
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"multi30k: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; line i of one "
                         f"must translate line i of the other (truncated or mismatched files): {HOW}")
    if not src:
        raise ValueError(f"multi30k: {src_path} is empty: {HOW}")
    return [tokenize(s) for s in src], [tokenize(t) for t in tgt]


@lru_cache(maxsize=4)
def build_vocab(folder: Path, min_freq: int = MIN_FREQ) -> Vocab:
    """The shared vocabulary of the training split in ``folder`` (see the module docstring); cached, but the
    token lists are not (as Python strings they would take ~40 MB for Multi30k's training split)."""
    src, tgt = _tokenized(folder, "train")
    return Vocab.build([*src, *tgt], min_freq)


def load_multi30k(root: Path, split: str = "train") -> TranslationDataset:
    """The ``split`` ("train", "val" or "test") of Multi30k under ``root``, encoded with the training vocabulary."""
    if split not in SPLITS:
        raise ValueError(f"multi30k: unknown split {split!r}; choose one of {list(SPLITS)}")
    folder = find_multi30k_dir(root)
    vocab = build_vocab(folder)
    src, tgt = _tokenized(folder, split)
    return TranslationDataset([vocab.encode(s) for s in src], [vocab.encode(t) for t in tgt], vocab, split)
