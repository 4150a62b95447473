"""Training data: tokenizers for training, `prepare` (text / JSONL -> packed token shards on disk),
and a deterministic, resumable batch loader over memory-mapped shards.

Shape legend: B batch, T sequence length.

A prepared dataset is a folder:

    meta.json                       format, tokenizer, dtype, domains, per-split token/document counts
    <split>/<domain>.tokens.bin     every document of that domain, concatenated: [bos] ids [eos] ...
    <split>/<domain>.docs.bin       int64 start offset of each document in tokens.bin

Token files are raw little-endian uint16 (vocabularies up to 65,536) or uint32, read with
`numpy.memmap`, so a dataset of any size costs no RAM and nothing is ever unpickled. One file pair per
(split, domain) gives every document its domain, and lets validation report loss per domain.

Packing: a training example is a window of T+1 consecutive tokens of one domain's stream (documents
concatenated, as GPT-2 / nanoGPT pretraining does); windows never straddle two domains. Attention
crosses document boundaries inside a window; the BOS/EOS tokens mark them.

Tokenizers: `bytes` (the default: UTF-8 bytes shifted by 3, ids 0 = pad, 1 = BOS, 2 = EOS, vocabulary
259; nothing to download, and a tiny embedding keeps small models small), `mixtral` (Mixtral's
32,000-piece SentencePiece model shipped with mistral-common), or a path to any SentencePiece `.model`
or `tokenizer.json`, read through `mixlab.tokenizer`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mixlab.atomic import atomic_folder, check_destination
from mixlab.errors import DataError

FORMAT = "mixlab.tokens"
VERSION = 1
VALID_STEMS = ("valid", "validation", "val", "dev", "test")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex")



# -- tokenizers ------------------------------------------------------------------------------------


class TrainTokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; 0 pad, 1 BOS, 2 EOS. Vocabulary 259."""

    OFFSET = 3
    vocab_size = 256 + OFFSET
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_array(text, bos=bos, eos=eos).tolist()

    def encode_array(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + self.OFFSET
        parts = ([np.array([self.bos_id])] if bos else []) + [ids] + ([np.array([self.eos_id])] if eos else [])
        return np.concatenate(parts)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"type": "bytes", "offset": self.OFFSET, "vocab_size": self.vocab_size}


class FileTokenizer:
    """A tokenizer file read by `mixlab.tokenizer` (SentencePiece `.model` or `tokenizer.json`)."""

    def __init__(self, path: str | Path | None, *, name: str | None = None) -> None:
        from mixlab.tokenizer import default_tokenizer_path, load_tokenizer

        p = default_tokenizer_path() if path is None else Path(path)
        if not p.exists():
            raise DataError(f"tokenizer {p} does not exist")
        self.path = p
        self.name = name or str(p)
        self.tok = load_tokenizer(p)
        self.vocab_size, self.bos_id, self.eos_id = self.tok.vocab_size, self.tok.bos_id, self.tok.eos_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.tok.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        return {"type": "file", "name": self.name, "path": str(self.path), "vocab_size": self.vocab_size}


def get_tokenizer(spec: str | dict[str, Any]) -> TrainTokenizer:
    """`"bytes"`, `"mixtral"`, a path to a SentencePiece `.model` or `tokenizer.json` (or a checkpoint
    folder holding one), or a `spec()` dict from meta.json."""
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "file":
            name = spec.get("name", "")
            return get_tokenizer("mixtral" if name == "mixtral" else str(spec.get("path")))
        raise DataError(f"unknown tokenizer type {kind!r} in dataset metadata (expected 'bytes' or 'file')")
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "mixtral":
        return FileTokenizer(None, name="mixtral")
    return FileTokenizer(spec)


# -- reading documents -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    domain: str
    split: str  # "train", "valid", or "" (not yet assigned)
    text: str
    where: str  # file[:line], for error messages


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "convert it to UTF-8 first") from None


def jsonl_texts(lines: Iterable[str], path: Path, *, strict: bool = True) -> Iterator[tuple[str, dict, str]]:
    """(text, row, "file:line") of each JSONL line whose `text` is a non-empty string; the one JSONL
    reader of the project (training, routing analysis). Invalid JSON is always an error naming the
    line. A line without a string `text` is an error when `strict` (training data must be what it
    claims) and skipped otherwise (analysis reads whatever a corpus holds, e.g. chat files)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            if not strict:
                continue
            if not isinstance(obj, dict) or "text" not in obj:
                keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{where}: expected a JSON object with a 'text' field, found: {keys}")
            raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        if text:
            yield text, obj, where


def read_file(path: Path, *, domain: str, split: str) -> Iterator[Document]:
    """Documents of one file: a `.jsonl` file gives one per line (its `text` field), any other file
    is one document."""
    text = _read_text(path)
    if path.suffix != ".jsonl":
        yield Document(domain, split, text, str(path))
        return
    n = 0
    for body, _, where in jsonl_texts(text.split("\n"), path):
        n += 1
        yield Document(domain, split, body, where)
    if n == 0:
        raise DataError(f"{path}: no non-empty 'text' documents")


def _split_of(path: Path) -> str:
    return "valid" if path.stem.lower() in VALID_STEMS else "train"


def discover(source: Path) -> list[tuple[Path, str, str]]:
    """(file, domain, split) for a source: a file, a folder in the shared corpus layout
    (`<domain>/train.jsonl`, `<domain>/valid.jsonl`), or any folder of text / JSONL files, where the
    domain is the top-level subfolder name ("default" for files directly in the folder)."""
    if source.is_file():
        return [(source, "default", _split_of(source))]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    corpus = sorted(d for d in source.iterdir() if d.is_dir() and (d / "train.jsonl").is_file())
    if corpus:  # the shared corpus layout; other folders (chat/, LICENSES/) are not pretraining text
        return [(f, d.name, _split_of(f)) for d in corpus for f in sorted(d.glob("*.jsonl"))]
    out = []
    for f in sorted(source.rglob("*")):
        if f.is_file() and (f.suffix == ".jsonl" or f.suffix in TEXT_SUFFIXES):
            rel = f.relative_to(source)
            out.append((f, rel.parts[0] if len(rel.parts) > 1 else "default", _split_of(f)))
    if not out:
        raise DataError(f"{source}: no .jsonl or text files ({', '.join(TEXT_SUFFIXES)}) found")
    return out


def read_documents(sources: Iterable[str | Path], *, domains: Iterable[str] | None = None) -> Iterator[Document]:
    keep = set(domains) if domains else None
    for s in sources:
        for f, domain, split in discover(Path(s)):
            if keep is None or domain in keep:
                yield from read_file(f, domain=domain, split=split)


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
    documents keeps its splits; otherwise a seeded `valid_fraction` of its documents is held out.
    """
    if not (isinstance(valid_fraction, int | float) and 0 <= valid_fraction < 1):
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    tok = get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    check_destination(out, sources=sources, overwrite=overwrite)  # fail before reading the corpus
    by_domain: dict[str, list[Document]] = {}
    for d in documents:
        by_domain.setdefault(d.domain, []).append(d)
    if not by_domain:
        raise DataError("no documents to prepare")
    splits: dict[str, dict[str, dict[str, int]]] = {"train": {}, "valid": {}}
    with atomic_folder(out, sources=sources, overwrite=overwrite, kind="dataset") as tmp:
        for domain, docs in sorted(by_domain.items()):
            if not any(d.split == "valid" for d in docs):
                order = list(range(len(docs)))
                random.Random(f"{seed}-{domain}").shuffle(order)
                n_valid = max(1, round(valid_fraction * len(docs))) if valid_fraction > 0 and len(docs) > 1 else 0
                held = set(order[:n_valid])
                docs = [Document(d.domain, "valid" if i in held else "train", d.text, d.where)
                        for i, d in enumerate(docs)]
            for split in ("train", "valid"):
                chosen = [d for d in docs if d.split == split]
                if not chosen:
                    continue
                ids, starts = [], []
                n = 0
                it: Iterable[Document] = chosen
                if progress:
                    from tqdm import tqdm

                    it = tqdm(chosen, desc=f"{split}/{domain}", unit="doc", leave=False)
                for d in it:
                    if isinstance(tok, ByteTokenizer):
                        a = tok.encode_array(d.text, bos=True, eos=True)
                    else:
                        a = np.asarray(tok.encode(d.text, bos=True, eos=True), dtype=np.int64)
                    starts.append(n)
                    ids.append(a)
                    n += len(a)
                (tmp / split).mkdir(exist_ok=True)
                np.concatenate(ids).astype(dtype).tofile(tmp / split / f"{domain}.tokens.bin")
                np.asarray(starts, dtype=np.int64).tofile(tmp / split / f"{domain}.docs.bin")
                splits[split][domain] = {"tokens": n, "docs": len(chosen)}
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
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# -- reading a prepared dataset --------------------------------------------------------------------


class TokenDataset:
    """A prepared dataset folder, memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / "meta.json"
        if not mf.is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no meta.json); run `mixlab data prepare` first")
        try:
            self.meta: dict[str, Any] = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mf}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{mf}: format {self.meta.get('format')!r} v{self.meta.get('version')} "
                            f"is not {FORMAT!r} v{VERSION}")
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.domains: list[str] = list(self.meta["domains"])
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
            want = int(info["tokens"]) * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != want:
                have = f.stat().st_size if f.is_file() else "no file"
                raise DataError(f"{f}: expected {want} bytes ({info['tokens']} tokens), found {have}; "
                                "the dataset is incomplete, prepare it again")
            self._maps[key] = np.memmap(f, dtype=self.dtype, mode="r")
        return self._maps[key]

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
        toks = self.ds.tokens(self.split, self.domains[d])
        return np.asarray(toks[j * self.seq_len: (j + 1) * self.seq_len + 1], dtype=np.int64), d

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


def eval_windows(dataset: TokenDataset, *, split: str, domain: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` windows `[N, T+1]` spread evenly over one domain's stream (fixed, no RNG)."""
    toks = dataset.tokens(split, domain)
    n = (len(toks) - 1) // seq_len
    if n == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(np.int64))
    rows = [np.asarray(toks[j * seq_len: (j + 1) * seq_len + 1], dtype=np.int64) for j in picks]
    return torch.from_numpy(np.stack(rows))
