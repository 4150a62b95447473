"""Training data: `prepare` (text / JSONL -> packed token shards on disk) and a deterministic,
resumable batch loader over memory-mapped shards. The tokenizers and the text / JSONL reader live
below training, in `mixlab.corpus` (routing analysis and evaluation read corpora too); their names
are re-exported here.

Shape legend: B batch, T sequence length.

A prepared dataset is a folder:

    meta.json                       format, tokenizer, dtype, domains, per-split token/document counts,
                                    per-split UTF-8 byte counts of the text (`bytes`: bits per byte)
    <split>/<domain>.tokens.bin     every document of that domain, concatenated: [bos] ids [eos] ...
    <split>/<domain>.docs.bin       int64 start offset of each document in tokens.bin

Token files are raw little-endian uint16 (vocabularies up to 65,536) or uint32, read with
`numpy.memmap`, so a dataset of any size costs no RAM and nothing is ever unpickled. One file pair per
(split, domain) gives every document its domain, and lets validation report loss per domain.

Packing: a training example is a window of T+1 consecutive tokens of one domain's stream (documents
concatenated, as GPT-2 / nanoGPT pretraining does); windows never straddle two domains. Attention
crosses document boundaries inside a window; the BOS/EOS tokens mark them.

Tokenizers (`mixlab.corpus.get_tokenizer`): `bytes` (the default), `mixtral`, or a path to a
SentencePiece `.model` or `tokenizer.json`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab.atomic import atomic_folder, check_destination
from mixlab.corpus import (
    ByteTokenizer,
    Document,
    FileTokenizer,
    TrainTokenizer,
    get_tokenizer,
    jsonl_texts,
    read_documents,
)
from mixlab.errors import DataError

__all__ = [  # with mixlab.corpus's names that training code, scripts and tests import from here
    "BatchLoader", "ByteTokenizer", "DataError", "Document", "FileTokenizer", "TokenDataset", "TrainTokenizer",
    "eval_windows", "get_tokenizer", "jsonl_texts", "prepare", "read_documents",
]

FORMAT = "mixlab.tokens"
VERSION = 1
ID_CHUNK = 1 << 24  # tokens `check_ids` reads at a time (32 MiB of uint16)


# -- prepare ---------------------------------------------------------------------------------------


def prepare(
    documents: Iterable[Document],
    out: str | Path,
    *,
    tokenizer: str = "bytes",
    valid_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    sources: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `documents` and write a dataset folder at `out` (atomically, mixlab.atomic); returns
    its metadata. An existing `out` is replaced only if mixlab wrote everything in it (or
    `overwrite`); an `out` that is or contains one of `sources` is refused.

    Documents whose split is not given ("") are assigned by domain: a domain that has any "valid"
    documents keeps its splits; otherwise a seeded `valid_fraction` of its documents is held out (at
    least one, never all: a domain of one document is all training text).
    """
    if not (isinstance(valid_fraction, int | float) and 0 <= valid_fraction < 1):
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    tok = get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    check_destination(out, sources=sources, overwrite=overwrite, writes="dataset")  # fail before reading the corpus
    by_domain: dict[str, list[Document]] = {}
    for d in documents:
        by_domain.setdefault(d.domain, []).append(d)
    if not by_domain:
        raise DataError("no documents to prepare")
    splits: dict[str, dict[str, dict[str, int]]] = {"train": {}, "valid": {}}
    # UTF-8 bytes of the text, per split and domain: the trainer's validation reports bits per byte
    # with them. Kept apart from `splits` (the data fingerprint checked on resume stays as it was).
    n_bytes: dict[str, dict[str, int]] = {"train": {}, "valid": {}}
    with atomic_folder(out, sources=sources, overwrite=overwrite, kind="dataset") as tmp:
        for domain, docs in sorted(by_domain.items()):
            if not any(d.split == "valid" for d in docs):
                order = list(range(len(docs)))
                random.Random(f"{seed}-{domain}").shuffle(order)
                # at least one held out, and one kept for training (0.8 of 2 documents held out both)
                n_valid = (min(len(docs) - 1, max(1, round(valid_fraction * len(docs))))
                           if valid_fraction > 0 and len(docs) > 1 else 0)
                held = set(order[:n_valid])
                docs = [Document(d.domain, "valid" if i in held else "train", d.text, d.where)
                        for i, d in enumerate(docs)]
            for split in ("train", "valid"):
                chosen = [d for d in docs if d.split == split]
                if not chosen:
                    continue
                ids, starts = [], []
                n = nb = 0
                it: Iterable[Document] = chosen
                if progress:
                    from tqdm import tqdm

                    it = tqdm(chosen, desc=f"{split}/{domain}", unit="doc", leave=False, disable=None)  # terminal only
                for d in it:
                    if isinstance(tok, ByteTokenizer):
                        a = tok.encode_array(d.text, bos=True, eos=True)
                    else:
                        a = np.asarray(tok.encode(d.text, bos=True, eos=True), dtype=np.int64)
                    starts.append(n)
                    ids.append(a)
                    n += len(a)
                    nb += len(d.text.encode("utf-8"))
                (tmp / split).mkdir(exist_ok=True)
                # write_bytes, not ndarray.tofile: a full disk is then ENOSPC, not "N requested and M written"
                (tmp / split / f"{domain}.tokens.bin").write_bytes(np.concatenate(ids).astype(dtype).data)
                (tmp / split / f"{domain}.docs.bin").write_bytes(np.asarray(starts, dtype=np.int64).data)
                splits[split][domain] = {"tokens": n, "docs": len(chosen)}
                n_bytes[split][domain] = nb
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tok.spec(),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "dtype": np.dtype(dtype).name,
            "domains": sorted(by_domain),
            "splits": splits,
            "bytes": n_bytes,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# -- reading a prepared dataset --------------------------------------------------------------------


def _plain_name(name: str) -> bool:
    """A name that stays one file name inside the dataset's folder (a split's folder, a domain's files)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


class TokenDataset:
    """A prepared dataset folder, memory-mapped: each shard's sizes and document offsets checked as it
    opens (`tokens`), its ids as they are read (`read`), or all at once (`check_ids`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / "meta.json"
        if not mf.is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no meta.json); run `mixlab data prepare` first")
        try:
            self.meta: dict[str, Any] = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mf}: not valid JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{mf}: JSON nested too deeply") from None
        if not isinstance(self.meta, dict):
            raise DataError(f"{mf}: expected a JSON object, found {type(self.meta).__name__}; "
                            "prepare the dataset again")
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{mf}: format {self.meta.get('format')!r} v{self.meta.get('version')} "
                            f"is not {FORMAT!r} v{VERSION}")
        try:
            self.vocab_size = self.meta["vocab_size"]
            if type(self.vocab_size) is not int:  # "259" or 259.9 went through int()
                raise TypeError(f"'vocab_size' must be an integer, found {self.vocab_size!r}")
            self.dtype = np.dtype(self.meta["dtype"])
            self.domains: list[str] = list(self.meta["domains"])
            if not all(isinstance(d, str) and _plain_name(d) for d in self.domains):
                raise ValueError(f"domains {self.domains!r}: expected plain names (no path separators, "
                                 "not '.' or '..')")
            if not isinstance(self.meta["splits"], dict) or not isinstance(self.meta["tokenizer"], dict):
                raise TypeError("'splits' and 'tokenizer' must be objects")
            if self.vocab_size < 1 or self.dtype.kind != "u":
                raise ValueError(f"vocab_size {self.vocab_size}, dtype {self.dtype}: expected a positive size and an "
                                 "unsigned integer type")
            self.bos_id: int = self.meta["bos_id"]  # the model's: a missing one was a KeyError traceback
            self.eos_id: int = self.meta["eos_id"]
            if not all(type(i) is int and 0 <= i < self.vocab_size for i in (self.bos_id, self.eos_id)):
                raise ValueError(f"bos_id {self.bos_id!r}, eos_id {self.eos_id!r}: expected token ids below "
                                 f"vocab_size {self.vocab_size}")
            for split, per in self.meta["splits"].items():  # {"train": 5} was a TypeError traceback when read
                if not isinstance(per, dict) or not all(
                        isinstance(i, dict) and all(type(i.get(k)) is int and i[k] >= 0 for k in ("tokens", "docs"))
                        for i in per.values()):
                    raise TypeError(f"'splits.{split}' must map each domain to its 'tokens' and 'docs' counts")
                for name in (split, *per):  # names of files inside the folder: "../x" read outside it
                    if not _plain_name(name):
                        raise ValueError(f"split or domain {name!r}: expected a plain name (no path separators, "
                                         "not '.' or '..')")
        except (KeyError, TypeError, ValueError) as e:  # a damaged or hand-edited meta.json
            raise DataError(f"{mf}: missing or bad field ({e}); prepare the dataset again") from None
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def tokenizer(self) -> TrainTokenizer:
        return get_tokenizer(self.meta["tokenizer"])

    def split_domains(self, split: str) -> list[str]:
        return sorted(self.meta["splits"].get(split, {}))

    def tokens(self, split: str, domain: str) -> np.ndarray:
        key = (split, domain)
        if key not in self._maps:
            info = self.meta["splits"].get(split, {}).get(domain)
            if info is None:
                raise DataError(f"{self.path}: no {split!r} data for domain {domain!r}")
            f = self.path / split / f"{domain}.tokens.bin"
            n = int(info["tokens"])
            toks = _shard(f, self.dtype, n, "tokens")
            docs = f.with_name(f"{domain}.docs.bin")
            starts = _shard(docs, np.dtype(np.int64), int(info["docs"]), "document offsets")
            # each document is [BOS] ids [EOS], so its start is after the last one's; nothing reads the
            # offsets yet, but a docs.bin of garbage means a damaged dataset, not one to train on
            if len(starts) and (starts[0] != 0 or starts[-1] >= n or np.any(np.diff(starts) <= 0)):
                raise DataError(f"{docs}: document offsets are not increasing from 0 and below {n} "
                                "(the tokens' count); the dataset is damaged, prepare it again")
            self._maps[key] = toks
        return self._maps[key]

    def read(self, split: str, domain: str, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of one split and domain's stream, as int64, once every id is below
        `vocab_size`, which the model's vocabulary covers (`build_model_config`): a larger one was an
        IndexError deep in the embedding, or, below the model's padded vocabulary, trained on without a
        word. Checked as the loader and the evaluation read their windows (a batch, nothing next to its
        forward), not when a shard opens: that read every token in every process before the first step,
        minutes for tens of GB on each rank. `check_ids` reads a whole dataset once."""
        part = np.asarray(self.tokens(split, domain)[start:stop], dtype=np.int64)
        self._check_ids(part, split, domain, start)
        return part

    def check_ids(self, *, progress: bool = False) -> int:
        """Read every shard in full and check each id as `read` does (`mixlab data check`), in chunks of
        ID_CHUNK tokens (no RAM beyond one); returns the number of tokens read. `progress`: a bar of the
        tokens read (terminal only)."""
        from tqdm import tqdm

        shards = [(split, domain) for split in self.meta["splits"] for domain in self.split_domains(split)]
        n = sum(int(self.meta["splits"][s][d]["tokens"]) for s, d in shards)
        with tqdm(total=n, unit="tok", unit_scale=True, leave=False, disable=None if progress else True) as bar:
            for split, domain in shards:
                toks = self.tokens(split, domain)
                for i in range(0, len(toks), ID_CHUNK):
                    part = toks[i: i + ID_CHUNK]
                    self._check_ids(part, split, domain, i)
                    bar.update(len(part))
        return n

    def _check_ids(self, part: np.ndarray, split: str, domain: str, start: int) -> None:
        """`part`, tokens `start`... of a stream, all below `vocab_size`; else the first that is not is named."""
        if 1 << 8 * self.dtype.itemsize <= self.vocab_size:  # unsigned: uint16 ids under a 65,536-token vocabulary
            return
        if len(part) and part.max() >= self.vocab_size:
            j = int(np.argmax(part >= self.vocab_size))
            raise DataError(f"{self.path / split / f'{domain}.tokens.bin'}: token {start + j} is id {int(part[j])}, "
                            f"outside the dataset's vocabulary of {self.vocab_size} (meta.json's vocab_size); the "
                            "file is damaged or was written for another tokenizer: prepare the dataset again")

    def bytes_per_token(self, split: str, domain: str) -> float | None:
        """UTF-8 bytes of the text per token of one split and domain's stream (its BOS/EOS tokens
        included), from `prepare`'s byte counts; for a dataset prepared before they were recorded,
        exact for the byte tokenizer (each document is BOS, its bytes, EOS) and None otherwise."""
        info = self.meta["splits"].get(split, {}).get(domain)
        if info is None or not info["tokens"]:
            return None
        nb = self.meta.get("bytes", {}).get(split, {}).get(domain)
        if nb is None and self.meta["tokenizer"].get("type") == "bytes":
            nb = int(info["tokens"]) - 2 * int(info["docs"])
        return None if nb is None else nb / int(info["tokens"])

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records to refuse resuming on different data."""
        return {"tokenizer": self.meta["tokenizer"], "splits": self.meta["splits"]}


class BatchLoader:
    """Deterministic, resumable batches of packed windows from one split.

    The windows of all domains are shuffled with a permutation seeded by (seed, epoch); the position
    is (epoch, cursor), a small dict that `state_dict()` returns and checkpoints store, so a resumed
    run sees exactly the batches the uninterrupted run would have seen.

    `shard=(rank, world)` (training over `world` processes): each batch is still the global batch of
    `batch_size` windows, in the same order, but this process reads only its rows
    `[rank * batch_size / world, (rank + 1) * batch_size / world)`; the position is the global one.
    """

    def __init__(self, dataset: TokenDataset, *, split: str = "train", seq_len: int, batch_size: int,
                 seed: int = 0, domains: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        rank, world = shard
        if batch_size % world or not 0 <= rank < world:
            raise DataError(f"batch_size {batch_size} must be a multiple of the number of processes ({world})")
        self.rows = range(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.ds, self.split, self.seq_len, self.batch_size, self.seed = dataset, split, seq_len, batch_size, seed
        self.domains = domains or dataset.split_domains(split)
        counts = [max(0, (len(dataset.tokens(split, d)) - 1) // seq_len) for d in self.domains]
        if sum(counts) == 0:
            raise DataError(f"{dataset.path}: the {split!r} split has no window of {seq_len + 1} tokens; "
                            "use a shorter seq_len or more data")
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.n_windows = int(self.offsets[-1])
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def window(self, w: int) -> tuple[np.ndarray, int]:
        """Tokens of global window `w` (T+1 of them) and its domain index."""
        d = int(np.searchsorted(self.offsets, w, side="right") - 1)
        j = w - int(self.offsets[d])
        return self.ds.read(self.split, self.domains[d], j * self.seq_len, (j + 1) * self.seq_len + 1), d

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs `[B, T]`, targets `[B, T]`, domain index `[B]`)."""
        rows, doms = [], []
        for i in range(self.batch_size):
            if self.cursor >= self.n_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            if i in self.rows:
                w, d = self.window(int(self._perm[self.cursor]))
                rows.append(w)
                doms.append(d)
            self.cursor += 1
        x = torch.from_numpy(np.stack(rows))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.tensor(doms)

    def skip(self, n_windows: int) -> None:
        """Advance by `n_windows` windows, as `n_windows / batch_size` batches would."""
        if n_windows < 0:
            raise DataError(f"cannot skip a negative number of windows ({n_windows})")
        epoch, cursor = divmod(self.cursor + n_windows, self.n_windows)
        if epoch:
            self.epoch += epoch
            self._perm = self._permutation(self.epoch)
        self.cursor = cursor

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("split", "seed", "seq_len", "batch_size"):
            if state.get(k) != getattr(self, k):
                raise DataError(f"data position in the checkpoint has {k}={state.get(k)!r}, "
                                f"but this run uses {getattr(self, k)!r}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)


def _shard(f: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """One of a dataset's files, memory-mapped, once its size is `count` items of `dtype` as meta.json says."""
    want = count * dtype.itemsize
    if not f.is_file() or f.stat().st_size != want:
        have = f.stat().st_size if f.is_file() else None
        odd = f" (not a whole number of {dtype.name} items)" if have is not None and have % dtype.itemsize else ""
        raise DataError(f"{f}: expected {want} bytes ({count} {what} of {dtype.name}, as meta.json says), found "
                        f"{'no file' if have is None else f'{have} bytes{odd}'}; the dataset is incomplete or "
                        "damaged, prepare it again")
    return np.memmap(f, dtype=dtype, mode="r") if count else np.zeros(0, dtype)


def eval_windows(dataset: TokenDataset, *, split: str, domain: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` windows `[N, T+1]` spread evenly over one domain's stream (fixed, no RNG)."""
    toks = dataset.tokens(split, domain)
    n = (len(toks) - 1) // seq_len
    if n == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(np.int64))
    rows = [dataset.read(split, domain, j * seq_len, (j + 1) * seq_len + 1) for j in picks]
    return torch.from_numpy(np.stack(rows))
