"""Text corpora below everything that reads them (training, routing analysis, evaluation): the
tokenizers a dataset is made with, named by a spec (`get_tokenizer`), the one reader of text and
JSONL files (`jsonl_texts`, `read_documents`), and the domain folders that routing analysis and
evaluation both read (`find_domains`, `iter_documents`, `check_domains`).

Tokenizers: `bytes` (UTF-8 bytes shifted by 3, ids 0 = pad, 1 = BOS, 2 = EOS, vocabulary 259;
nothing to download, and a tiny embedding keeps small models small), `mixtral` (Mixtral's
32,000-piece SentencePiece model shipped with mistral-common), or a path to any SentencePiece
`.model` or `tokenizer.json`, read through `mixlab.tokenizer`.

A corpus is a file, a folder in the shared corpus layout (`<domain>/train.jsonl`,
`<domain>/valid.jsonl`), or any folder of text / JSONL files (the domain: the top-level subfolder, or
the folder's own name for the files directly in it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mixlab.errors import DataError

VALID_STEMS = ("valid", "validation", "val", "dev", "test")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex")
DATA_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)  # every file kind a corpus is read from: prepare, analysis, eval


def is_data_file(path: Path) -> bool:
    """A corpus file mixlab reads (a `.jsonl` file, or text: one document), outside a routing report
    (`mixlab analyze --out corpus/report` writes a summary.md beside its report.json)."""
    return (path.suffix in DATA_SUFFIXES and path.is_file()
            and not (path.parent / "report.json").is_file())

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


def split_file_domain(path: Path) -> str | None:
    """The domain of a split's file given alone: its folder's name (corpus/github/valid.jsonl is
    github, as when the corpus folder is given); None for a file not named by a split."""
    return path.resolve().parent.name if path.stem.lower() in ("train", *VALID_STEMS) else None


def discover(source: Path) -> list[tuple[Path, str, str]]:
    """(file, domain, split) for a source: a file (domain "default", or its folder's name for a split's
    file: `split_file_domain`), a folder in the shared corpus
    layout (`<domain>/train.jsonl`, `<domain>/valid.jsonl`), or any folder of text / JSONL files, where
    the domain is the top-level subfolder name, and the folder's own name for files directly in it (as
    `mixlab analyze` names one domain folder): `prepare code/ prose/` makes two domains, not one."""
    if source.is_file():
        return [(source, split_file_domain(source) or "default", _split_of(source))]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    corpus = sorted(d for d in source.iterdir() if d.is_dir() and (d / "train.jsonl").is_file())
    if corpus:  # the shared corpus layout; other folders (chat/, LICENSES/) are not pretraining text
        return [(f, d.name, _split_of(f)) for d in corpus for f in sorted(d.glob("*.jsonl"))]
    out = []
    own = source.resolve().name or "default"  # `.` is the working folder's name
    for f in sorted(source.rglob("*")):
        if is_data_file(f):
            rel = f.relative_to(source)
            out.append((f, rel.parts[0] if len(rel.parts) > 1 else own, _split_of(f)))
    if not out:
        raise DataError(f"{source}: no data files ({', '.join(DATA_SUFFIXES)}) found")
    return out


def read_documents(sources: Iterable[str | Path], *, domains: Iterable[str] | None = None) -> Iterator[Document]:
    """The documents of `sources` (see `discover`), only those of `domains` when given: a domain
    that no source has is an error naming it (a misspelt `--domains` must not drop it silently), as
    is a file two sources hold (its documents would be read twice, maybe into both splits) and a
    domain two source folders give (`x/data y/data` are both `data`: one domain, silently merged).
    Files given alone may share a domain (`a.txt b.txt` are both `default`)."""
    keep = set(domains) if domains else None
    sources = list(sources)
    files, given, folder_of = [], dict[Path, str](), dict[str, str]()
    for s in sources:
        for f, domain, split in discover(Path(s)):
            if f.resolve() in given:  # `prepare a a`, `prepare corpus corpus/code`: each document twice
                raise DataError(f"{f} is in two sources ({given[f.resolve()]} and {s}); give each file once")
            given[f.resolve()] = str(s)
            if Path(s).is_dir():
                if folder_of.setdefault(domain, str(s)) != str(s):
                    raise DataError(f"domain {domain!r} is in two source folders ({folder_of[domain]} and {s}): "
                                    "rename one to keep them apart, or put their files in one folder to make "
                                    "one domain")
            files.append((f, domain, split))
    missing = sorted(keep - {domain for _, domain, _ in files}) if keep is not None else []
    if missing:
        found = sorted({domain for _, domain, _ in files})
        raise DataError(f"--domains: {', '.join(missing)} not found in {', '.join(map(str, sources))} "
                        f"(domains there: {', '.join(found)})")
    for f, domain, split in files:
        if keep is None or domain in keep:
            yield from read_file(f, domain=domain, split=split)


# -- domain folders (analysis, evaluation) ---------------------------------------------------------

# Folders of a corpus that are not text domains: chat transcripts (messages, not running text)
# and licence texts.
NOT_DOMAINS = ("chat", "LICENSES")


def _files(folder: Path) -> list[Path]:
    """A domain folder's data files, in its subfolders too (as `prepare` reads a domain)."""
    return sorted(p for p in folder.rglob("*") if is_data_file(p))


def _has_data(folder: Path) -> bool:
    return any(is_data_file(p) for p in folder.rglob("*"))


def find_domains(data: str | Path, *, names: list[str] | None = None) -> dict[str, Path]:
    """Domain name -> folder. `data` is a corpus folder (one subfolder per domain) or a single
    domain folder holding data files. `names` picks domains (by folder name) explicitly."""
    if isinstance(names, str):  # iterated, "code" looked for the domains 'c', 'o', 'd', 'e'
        raise ValueError(f"domains takes a list of domain names, not the string {names!r}: "
                         f"{names.split(',')!r}")
    root = Path(data)
    if root.is_file():
        raise NotADirectoryError(f"{root} is a file; --data takes a folder: a corpus (one subfolder per domain) "
                                 f"or one domain's folder of data files ({', '.join(DATA_SUFFIXES)})")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} does not exist")
    if names:
        out = {}
        for n in names:
            if not (root / n).is_dir():
                have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
                raise DataError(f"domain {n!r} not found in {root} (domain folders there: {have})")
            out[n] = root / n
        return out
    subdirs = sorted(p for p in root.iterdir()  # a folder without data files (a report written there) is none
                     if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_DOMAINS and _has_data(p))
    if subdirs:
        return {p.name: p for p in subdirs}
    if _has_data(root):  # `.` is the working folder, by its name
        return {root.resolve().name or root.name: root}
    hint = ("; this is a dataset `mixlab data prepare` wrote (token shards): pass the text corpus it was "
            "prepared from") if (root / "meta.json").is_file() else ""
    raise DataError(f"{root}: no domain folders and no data files ({', '.join(DATA_SUFFIXES)}){hint}")


SPLIT_NAMES = ("train", "valid", "test")  # files named by split (the shared corpus: train.jsonl, valid.jsonl)


def data_files(domain_dir: Path, *, split: str | None = "valid") -> list[Path]:
    """The domain's data files: those whose name starts with `split` if any do; none if others are
    named by split (a domain with train.jsonl alone has no valid text: its training text is not
    read in its place); else (a folder of text files) all."""
    files = _files(domain_dir)
    if split:
        picked = [p for p in files if p.name.startswith(split)]
        files = picked if picked or any(p.name.startswith(SPLIT_NAMES) for p in files) else files
    return files


def iter_documents(domain_dir: Path, *, split: str | None = "valid") -> Iterator[tuple[str, str]]:
    """(source, text) for each usable document of a domain folder (`find_domains`), in file order,
    streaming each file line by line: a text file (`.txt`, `.md`, ...: `TEXT_SUFFIXES`) is one
    document, a `.jsonl` line one (lines
    without a non-empty string `text` are skipped: `jsonl_texts`, lenient); routing analysis and
    evaluation read domains through it. Raises DataError naming the folder when there is none."""
    files = data_files(domain_dir, split=split)
    found = 0
    for path in files:
        try:  # a binary file was read with U+FFFD for its bytes (.txt) or failed without its name (.jsonl)
            if path.suffix != ".jsonl":
                text = path.read_text(encoding="utf-8")
                if text.strip():
                    found += 1
                    yield str(path.relative_to(domain_dir)), text
                continue
            with path.open(encoding="utf-8") as f:
                for body, row, where in jsonl_texts(f, path, strict=False):
                    if body.strip():
                        found += 1
                        source = row.get("source")
                        line = where.rsplit(":", 1)[1]
                        yield (source if isinstance(source, str) and source else f"{path.name}:{line}"), body
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not found:
        every = data_files(domain_dir, split=None)
        if every and not files:
            raise DataError(f"domain folder {domain_dir} has no {split!r} file (files there: "
                            f"{', '.join(p.name for p in every)}); --domains leaves it out")
        what = ", ".join(p.name for p in files) or "no data files"
        raise DataError(f"domain folder {domain_dir} has no usable data ({what}): expected text files "
                        f"({', '.join(TEXT_SUFFIXES)}) or .jsonl lines with a non-empty string field 'text'")


def check_domains(domains: dict[str, Path], *, split: str | None = "valid") -> None:
    """Fail early, before a model is loaded, if any domain has no usable document, or if `split`
    names no file anywhere while the files are named by split (`train.jsonl`, `valid.jsonl`): a
    misspelt `--split` would otherwise read nothing, or every file, training text included."""
    if split:
        files = [p for d in domains.values() for p in data_files(d, split=None)]
        named = sorted({p.name for p in files if p.name.startswith(SPLIT_NAMES)})
        if named and not any(p.name.startswith(split) for p in files):
            raise DataError(f"--split {split!r} matches no data file in the {len(domains)} domain folder(s) "
                            f"(files there: {', '.join(named)}); --split '' reads every file")
    for d in domains.values():
        next(iter_documents(d, split=split))
