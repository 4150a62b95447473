"""Text corpora below everything that reads them (training, routing analysis, evaluation): the
tokenizers a dataset is made with, named by a spec (`get_tokenizer`), the one reader of text and
JSONL files (`jsonl_texts`, `read_documents`), and the domain folders (or a file given alone) that
routing analysis and evaluation both read (`find_domains`, `iter_documents`, `check_domains`).

Tokenizers: `bytes` (UTF-8 bytes shifted by 3, ids 0 = pad, 1 = BOS, 2 = EOS, vocabulary 259;
nothing to download, and a tiny embedding keeps small models small), `mixtral` (Mixtral's
32,000-piece SentencePiece model shipped with mistral-common), or a path to any SentencePiece
`.model` or `tokenizer.json`, read through `mixlab.tokenizer`.

A corpus is a file, a folder in the shared corpus layout (`<domain>/train.jsonl`,
`<domain>/valid.jsonl`), or any folder of text / JSONL files (the domain: the top-level subfolder, or
the folder's own name for the files directly in it). `discover` is that rule, and `split_of` the one
reading of a file's split from its name, for `data prepare`, routing analysis and evaluation alike.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mixlab.errors import DataError, UsageError

if TYPE_CHECKING:
    from mixlab.tokenizer import Tokenizer

VALID_STEMS = ("valid", "validation", "val", "dev", "test")
# UTF-8, a leading byte-order mark (Notepad's, PowerShell's, Excel's "UTF-8" export) not read as text: it failed
# a .jsonl file's first line as "Unexpected UTF-8 BOM" and began a text file's first document
ENCODING = "utf-8-sig"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex")
DATA_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)  # every file kind a corpus is read from: prepare, analysis, eval
# Folders of a corpus that are not text domains: chat transcripts (messages, not running text)
# and licence texts.
NOT_DOMAINS = ("chat", "LICENSES")


def is_data_file(path: Path) -> bool:
    """A corpus file mixlab reads (a `.jsonl` file, or text: one document), outside a routing report
    (`mixlab analyze --out corpus/report` writes a summary.md beside its report.json). Its kind is its
    suffix in any case (`NOTES.TXT`), as its split is its name in any case (`split_of`). One on a link
    to nothing (a moved or unmounted target) is an error, not a file skipped without a word."""
    if path.suffix.lower() in DATA_SUFFIXES and path.is_symlink() and not path.exists():
        raise DataError(f"{path} is a link to {os.readlink(path)}, which does not exist: fix the link or remove it")
    return (path.suffix.lower() in DATA_SUFFIXES and path.is_file()
            and not (path.parent / "report.json").is_file())


def is_jsonl(path: Path) -> bool:
    """Whether a data file is read as JSONL, a document a line (`valid.JSONL` too), not as one text."""
    return path.suffix.lower() == ".jsonl"

# -- tokenizers ------------------------------------------------------------------------------------


class TrainTokenizer(Protocol):
    name: str  # as --tokenizer names it: bytes, mixtral or the path given
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
    name = "bytes"  # as --tokenizer names it: what a routing report says (it said "ByteTokenizer")

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
        # absolute: spec() goes into meta.json and a model's mixlab_data.json, read from other folders
        self.path = p.absolute()
        self.name = name or str(p)
        self.tok = load_tokenizer(p)
        self.vocab_size, self.bos_id, self.eos_id = self.tok.vocab_size, self.tok.bos_id, self.tok.eos_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.tok.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        return {"type": "file", "name": self.name, "path": str(self.path), "vocab_size": self.vocab_size}


def full_tokenizer(t: TrainTokenizer) -> Tokenizer:
    """The `mixlab.tokenizer.Tokenizer` of a training tokenizer: its pieces and its chat template."""
    from mixlab.tokenizer import load_tokenizer

    return t.tok if isinstance(t, FileTokenizer) else load_tokenizer("bytes")


def same_vocabulary(a: TrainTokenizer, b: TrainTokenizer) -> bool:
    """Whether every id is the same piece in `a` and `b`, so that a model trained on one's ids reads the
    other's as the same text (a SentencePiece file and its tokenizer.json alike)."""
    ta, tb = full_tokenizer(a), full_tokenizer(b)
    return ta.vocab_size == tb.vocab_size and all(ta.id_to_piece(i) == tb.id_to_piece(i) for i in range(ta.vocab_size))


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


def json_line(line: str, where: str) -> Any:
    """One JSON Lines row, or DataError naming `where` (file:line): not JSON, or nested too deeply for
    Python's parser (its RecursionError was a traceback)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); expected JSON Lines, one JSON value per line") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None


def jsonl_texts(lines: Iterable[str], path: Path, *, strict: bool = True) -> Iterator[tuple[str, dict, str]]:
    """(text, row, "file:line") of each JSONL line whose `text` is a non-empty string; the one JSONL
    reader of the project (training, routing analysis). Invalid JSON is always an error naming the
    line. A line without a string `text` is an error when `strict` (training data must be what it
    claims) and skipped otherwise (analysis reads whatever a corpus holds, e.g. chat files)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        obj = json_line(line, where)
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


def _not_utf8(where: str, raw: bytes, e: UnicodeDecodeError, of: str = "") -> DataError:
    return DataError(f"{where}: not UTF-8 text ({raw[e.start:e.start + 1]!r} at byte {e.start}{of}); convert it to "
                     "UTF-8 first")


def _utf8_lines(path: Path) -> Iterator[str]:
    """A file's lines, read and decoded one at a time (a byte that is not UTF-8 named by line and offset;
    only b"\\n" ends a line, so a U+2028 inside a JSON string does not)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield raw.decode(ENCODING if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path}:{lineno}", raw, e, " of the line") from None


def file_documents(path: Path, *, strict: bool = True) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(text, row, where) of each non-blank document of a data file: the one reader of a corpus file
    (`data prepare`, a folder's domains, a file given alone). A `.jsonl` file gives one per line (its
    `text` field: `jsonl_texts`, `strict` or not; `where` is file:line), streamed; any other file is
    one document (row `{}`, `where` the file)."""
    if is_jsonl(path):
        for body, row, where in jsonl_texts(_utf8_lines(path), path, strict=strict):
            if body.strip():
                yield body, row, where
        return
    raw = path.read_bytes()
    try:
        text = raw.decode(ENCODING)
    except UnicodeDecodeError as e:
        raise _not_utf8(str(path), raw, e) from None
    nul = raw.find(b"\0")
    if nul >= 0:  # valid UTF-8, yet binary: UTF-16 text without its byte-order mark ("H\0e\0"), a file of bytes < 128
        raise DataError(f"{path}: a NUL byte at byte {nul}: binary data or UTF-16 text, not UTF-8 text; convert it "
                        "to UTF-8 first")
    if text.strip():
        yield text, {}, str(path)


def row_domain(row: dict[str, Any], path: Path, where: str) -> str:
    """The domain of a document of a file given alone (`data prepare x.jsonl`, `eval --data x.jsonl`,
    `analyze --data x.jsonl`: one rule): its row's `domain` field, else the file's (`file_domain`). The
    name becomes a dataset's file names (`<split>/<domain>.tokens.bin`), so one that cannot be a
    file's name is refused, naming the line."""
    name = row.get("domain")
    if not isinstance(name, str) or not name.strip():
        return file_domain(path)
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DataError(f"{where}: field 'domain' {name!r} cannot name a domain (it names the dataset's files): "
                        "expected a name without '/', '\\' or NUL, not '.' or '..'")
    return name


def read_file(path: Path, *, domain: str | None, split: str) -> Iterator[Document]:
    """Documents of one file for `data prepare` (`file_documents`, strict): a `.jsonl` file gives one
    per line, any other file is one document; `domain` None: a file given alone, its rows' domains
    (`row_domain`). A file with no document is an error."""
    n = 0
    for body, row, where in file_documents(path):
        n += 1
        yield Document(domain or row_domain(row, path, where), split, body, where)
    if n == 0:
        raise DataError(_no_document(path))


def _no_document(path: Path) -> str:
    return f"{path}: no document in it: expected text, or .jsonl lines with a non-empty string field 'text'"


SPLIT_WORDS = ("train", *VALID_STEMS)
# a split's name, alone or with a shard number: valid.jsonl, train_2.txt, validation-00000-of-00001.jsonl
_SPLIT_FILE = re.compile(rf"({'|'.join(SPLIT_WORDS)})(?:[-_.]?\d+(?:-of-\d+)?)?")


def split_of(path: Path) -> str | None:
    """The split a data file's name gives (lowercased): its stem is `train` or a validation name
    (`VALID_STEMS`: valid, validation, val, dev, test), alone or with a shard number (`train_2`,
    `validation-00000-of-00001`); None for any other name (`notes`, `test_parser`, `valid_extra`).
    The one rule: `data prepare` holds the validation names out as its valid split, and
    `eval` / `analyze --split` pick files by it (`in_split`)."""
    m = _SPLIT_FILE.fullmatch(path.stem.lower())
    return m.group(1) if m else None


def in_split(path: Path, split: str) -> bool:
    """Whether `path` is one of `--split split`'s files: `valid`, every file `data prepare` holds out
    (named by a validation name); another split name, the files named by it (`test`: test.jsonl).
    Split names are read in any case, as file names are (`Valid`: `valid`)."""
    word, split = split_of(path), split.lower()
    return word is not None and (word == split or (split == "valid" and word in VALID_STEMS))


def check_split(split: str) -> str:
    """`--split split` as eval and analyze read it: lowercased, as file names are (`--split Valid` reads
    valid.jsonl); a name that is no split is refused, with the nearest one ('vaild': did you mean 'valid'?), as
    a usage error (the `mixlab` command exits 2)."""
    from mixlab.config import did_you_mean

    if split and split.lower() not in SPLIT_WORDS:
        raise UsageError(f"--split {split!r} is not a split name{did_you_mean(split.lower(), SPLIT_WORDS)}: expected "
                        f"one of {', '.join(SPLIT_WORDS)} (valid: every file data prepare holds out), or '' for "
                        "every file")
    return split.lower()


def data_split(data: str | Path, split: str | None) -> str:
    """`--split` as eval and analyze read `--data` by it: where not given, valid for a folder and ''
    (every file) for a file given alone, which is read whole (`FileDomain`); else `check_split`'s. A
    `--split` that a file given alone is not of (`--data notes.jsonl --split test`) is refused, naming
    both flags (a usage error): it was ignored."""
    if split is None:
        return "" if Path(data).is_file() else "valid"
    split, path = check_split(split), Path(data)
    if split and path.is_file() and not in_split(path, split):
        named = f"a {split_of(path)} file" if split_of(path) else "named by no split"
        raise UsageError(f"--split {split!r} with --data {data}: a file given alone is read whole ({path.name} is "
                        f"{named}); --split picks a folder's files by name: give the folder, or leave --split out")
    return split


def _split_of(path: Path) -> str:
    return "valid" if split_of(path) in VALID_STEMS else "train"


def split_file_domain(path: Path) -> str | None:
    """The domain of a split's file given alone: its folder's name (corpus/github/valid.jsonl is
    github, as when the corpus folder is given); None for a file not named by a split."""
    return path.resolve().parent.name if split_of(path) is not None else None


def _files(folder: Path) -> list[Path]:
    """A domain folder's data files, in its subfolders too (as `prepare` reads a domain), linked
    subfolders included (as `os.walk(followlinks=True)` and Hugging Face datasets read them: a domain
    assembled from links to its parts was read as empty, silently), each real folder once: a link to
    the domain's own folder or one above it (a loop) is not followed. Hidden files and folders
    (`.ipynb_checkpoints/`, `.git/`) are skipped, as Hugging Face datasets skips them: their copies
    were read as documents of their own."""
    real = Path(os.path.realpath(folder))
    seen, out = {real, *real.parents}, []
    for top, dirs, files in os.walk(folder, followlinks=True):
        out += [Path(top) / f for f in files if not f.startswith(".") and is_data_file(Path(top) / f)]
        kept = []
        for d in sorted(dirs):  # the first of two links to one folder, by name
            if not d.startswith(".") and (target := Path(os.path.realpath(Path(top) / d))) not in seen:
                seen.add(target)
                kept.append(d)
        dirs[:] = kept
    return sorted(out)


def discover(source: Path, *, names: Iterable[str] | None = None) -> list[tuple[Path, str, str]]:
    """(file, domain, split) for a source: a file (its domain `file_domain`'s: its stem, or its folder's
    name for a split's file; a `.jsonl` row's `domain` field is its row's, `row_domain`) or a folder,
    whose domains are its subfolders holding data files (`.jsonl` and text, their subfolders
    included) and the files directly in it, a domain named after
    the folder: `prepare code/ prose/` makes two domains, and so does a domain folder holding files
    and a subfolder of them. Beside the domain folders of the shared corpus layout (a subfolder holds
    a split's `.jsonl`: `<domain>/train.jsonl`, `<domain>/valid.jsonl`), only files named by split are
    read (its SOURCES.md or README is no text). `chat/`, `LICENSES/` (`NOT_DOMAINS`) and hidden
    folders are no domain unless `names` names them. The one rule: `data prepare`, routing analysis
    and evaluation all find domains with it."""
    if source.is_file():
        return [(source, file_domain(source), _split_of(source))]
    if not source.is_dir():
        raise DataError(f"{source}: {_not_there(source)}")
    named = set(names or ())
    subdirs = sorted(d for d in source.iterdir() if d.is_dir() and (
        d.name in named or not (d.name.startswith(".") or d.name in NOT_DOMAINS)))
    corpus = any(split_of(f) for d in subdirs for f in d.iterdir() if is_jsonl(f))
    own = source.resolve().name or "default"  # `.` is the working folder's name
    out = [(f, own, _split_of(f)) for f in sorted(source.iterdir())
           if is_data_file(f) and not (corpus and split_of(f) is None)]  # SOURCES.md beside a corpus's domains
    out += [(f, d.name, _split_of(f)) for d in subdirs for f in _files(d)]
    if not out:
        raise DataError(f"{source}: no data files ({', '.join(DATA_SUFFIXES)}) found{_prepared_hint(source)}"
                        f"{_skipped_hint(source, named)}")
    return out


def _skipped_hint(folder: Path, named: set[str]) -> str:
    """Which of `folder`'s subfolders `discover` passed over as no domain (`NOT_DOMAINS`) though they hold
    data files: a corpus of only chat/ said "no data files found" with .jsonl files right there."""
    skipped = [d for d in NOT_DOMAINS if d not in named and (folder / d).is_dir() and _files(folder / d)]
    return (f"; {' and '.join(d + '/' for d in skipped)} not read as a domain (chat transcripts and licence texts "
            f"are not running text; --domains {skipped[0]} reads it)" if skipped else "")


def _not_there(path: Path) -> str:
    """Why `path` is neither a data file nor a folder of them: absent, or another kind of file."""
    return ("not a regular file or folder (a pipe, a socket or a device): give a data file or a folder of them"
            if path.exists() else "no such file or folder")


def _no_data_files(folders: list[Path]) -> None:
    """DataError for the first of the folders named by `--domains` that exists but holds no data file
    (it was "not found", with the folder right there)."""
    for d in folders:
        if d.is_dir():
            raise DataError(f"domain folder {d} holds no data file ({', '.join(DATA_SUFFIXES)}), not even in a "
                            "subfolder")


def _unknown_domains(missing: list[str], where: str, found: Iterable[str]) -> UsageError:
    """`--domains` naming domains the data does not have: the flag's value (a usage error, exit 2, as
    `--split`'s), with the nearest name and the domains there."""
    from mixlab.config import did_you_mean

    found = sorted(found)
    return UsageError(f"--domains: {', '.join(map(repr, missing))} not found in {where}"
                      f"{did_you_mean(missing[0], found)}; domains there: {', '.join(found) or 'none'}")


def _prepared_hint(folder: Path) -> str:
    """What to pass instead of a folder `data prepare` wrote (`data prepare DATASET`, `analyze --data DATASET`)."""
    if not (folder / "meta.json").is_file():
        return ""
    return "; this is a dataset `mixlab data prepare` wrote (token shards): pass the text corpus it was prepared from"


def read_documents(sources: Iterable[str | Path], *, domains: Iterable[str] | None = None) -> Iterator[Document]:
    """The documents of `sources` (see `discover`), only those of `domains` when given: a domain
    that no source has is an error naming it (a misspelt `--domains` must not drop it silently), as
    is a file two sources hold (its documents would be read twice, maybe into both splits) and a
    domain two source folders give (`x/data y/data` are both `data`: one domain, silently merged).
    Files given alone may share a domain (`a/notes.txt b/notes.txt` are both `notes`); their rows'
    domains (`row_domain`) are known once read, so they are read (once) before a folder's files."""
    keep = set(domains) if domains else None
    sources = list(sources)
    files, given, folder_of = [], dict[Path, tuple[str, Path]](), dict[str, str]()
    for s in sources:
        for f, domain, split in discover(Path(s), names=keep):
            if f.resolve() in given:  # `prepare a a`, `prepare corpus corpus/code`: each document twice
                first, seen = given[f.resolve()]
                if first == str(s) and seen != f:  # one source reaches it twice, by a link (code/lib -> ../lib)
                    raise DataError(f"{f} is {seen} too (a link leads to it): {s} holds it twice; remove the link, "
                                    "or move the files it leads to out of the corpus")
                raise DataError(f"{f} is in two sources ({first} and {s}); give each file once")
            given[f.resolve()] = str(s), f
            if Path(s).is_dir():
                if folder_of.setdefault(domain, str(s)) != str(s):
                    raise DataError(f"domain {domain!r} is in two source folders ({folder_of[domain]} and {s}): "
                                    "rename one to keep them apart, or put their files in one folder to make "
                                    "one domain")
            files.append((f, domain, split, Path(s).is_dir()))
    alone = {f: list(read_file(f, domain=None, split=split)) for f, _, split, in_folder in files if not in_folder}
    found = {domain for f, domain, _, in_folder in files if in_folder} | {d.domain for ds in alone.values() for d in ds}
    missing = sorted(keep - found) if keep is not None else []
    if missing:
        _no_data_files([Path(s) / n for s in sources for n in missing])
        raise _unknown_domains(missing, ", ".join(map(str, sources)), found)
    for f, domain, split, in_folder in files:
        docs = read_file(f, domain=domain, split=split) if in_folder else alone[f]
        yield from (d for d in docs if keep is None or d.domain in keep)


# -- domain folders (analysis, evaluation) ---------------------------------------------------------

@dataclass(frozen=True)
class FileDomain:
    """A domain of a data file given alone (`--data FILE`, `find_domains`): the file is read whole,
    whatever its name and `--split`, and strictly (a line without a string 'text' is an error: the
    file was named, not found in a folder); a `.jsonl` file's rows are split by their `domain`
    field (`row_domain`). `find_domains` reads the file once for all its domains and keeps each
    one's (source, text) documents in `docs`: a file of k domains was read k + 1 times."""

    path: Path
    name: str
    docs: tuple[tuple[str, str], ...] = field(repr=False)


Domain = str | Path | Sequence[Path] | FileDomain  # a domain: its folder (every data file in it), its files, or
# a file given alone


def file_domain(path: Path) -> str:
    """The domain of a data file given alone: its folder's name for a split's file (corpus/github/
    valid.jsonl is github, as when the corpus is given), else its stem (notes.jsonl is notes)."""
    return split_file_domain(path) or path.stem


def _source(row: dict[str, Any], path: Path, where: str, base: Path) -> str:
    """A document's source in a report's token view: a JSONL row's `source` field, else file:line; a
    text file's path from `base` (its domain's folder)."""
    if not is_jsonl(path):
        return str(path.relative_to(base))
    source = row.get("source")
    return source if isinstance(source, str) and source else f"{path.name}:{where.rsplit(':', 1)[1]}"


def _file_domains(path: Path) -> dict[str, FileDomain]:
    """The domains of a data file given alone, its documents read once (`FileDomain`)."""
    docs: dict[str, list[tuple[str, str]]] = {}
    for text, row, where in file_documents(path):
        docs.setdefault(row_domain(row, path, where), []).append((_source(row, path, where, path.parent), text))
    if not docs:
        raise DataError(_no_document(path))
    return {name: FileDomain(path, name, tuple(d)) for name, d in docs.items()}


def _domain_files(domain: Domain) -> tuple[Path, list[Path]]:
    """(the folder that names the domain in messages and sources, its data files)."""
    if isinstance(domain, FileDomain):
        return domain.path.parent, [domain.path]
    if isinstance(domain, str | Path):  # a str is a sequence too: its characters were taken for files
        return Path(domain), _files(Path(domain))
    files = sorted(domain)
    return (Path(os.path.commonpath([p.parent for p in files])) if files else Path(".")), files


def find_domains(data: str | Path, *, names: list[str] | None = None) -> dict[str, Domain]:
    """Domain name -> its data files, as `data prepare` finds them (`discover`): a corpus folder's
    domains (one subfolder each; files at its root are a domain named after it), or a single domain
    folder holding data files; or a data file given alone, read whole (`FileDomain`: one domain,
    `file_domain`, or those of its rows' `domain` fields). `names` picks domains by name. The one
    reading of `--data` for `analyze` and `eval`."""
    if isinstance(names, str):  # iterated, "code" looked for the domains 'c', 'o', 'd', 'e'
        raise ValueError(f"domains takes a list of domain names, not the string {names!r}: "
                         f"{names.split(',')!r}")
    root = Path(data)
    found: dict[str, Domain] = {}
    if root.is_file():
        found.update(_file_domains(root))
    elif not root.is_dir():
        if root.exists():  # a pipe (`--data <(cat x)`), a socket, a device: "does not exist" was wrong
            raise DataError(f"{root}: {_not_there(root)}")
        raise NotADirectoryError(f"data folder or file {root} does not exist")
    else:
        folders: dict[str, list[Path]] = {}
        for f, domain, _ in discover(root, names=names):  # its error names what it found wrong
            folders.setdefault(domain, []).append(f)
        found.update(folders)
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            _no_data_files([root / n for n in missing])
            raise _unknown_domains(missing, str(root), found)
        return {n: found[n] for n in names}
    return dict(sorted(found.items()))


def data_files(domain: Domain, *, split: str | None = "valid") -> list[Path]:
    """The domain's data files: those of `split` (`in_split`) if any are; none if others are named
    by split (a domain with train.jsonl alone has no valid text: its training text is not read in its
    place); else (a folder of text files) all."""
    files = _domain_files(domain)[1]
    if split and not isinstance(domain, FileDomain):  # a file given alone is read whole
        picked = [p for p in files if in_split(p, split)]
        files = picked if picked or any(split_of(p) for p in files) else files
    return files


def iter_documents(domain: Domain, *, split: str | None = "valid") -> Iterator[tuple[str, str]]:
    """(source, text) for each usable document of a domain (`find_domains`), in file order, each
    file streamed through `file_documents`: a text file (`.txt`, `.md`, ...: `TEXT_SUFFIXES`) is one
    document, a `.jsonl` line one (lines without a non-empty string `text` are skipped: lenient);
    routing analysis and evaluation read domains through it. Raises DataError naming the folder when
    there is none. A file given alone (`FileDomain`): its rows of that domain, as `find_domains` read
    them."""
    if isinstance(domain, FileDomain):  # find_domains read the file: the domain has a document
        yield from domain.docs
        return
    domain_dir, every = _domain_files(domain)
    files = data_files(every, split=split)
    found = 0
    for path in files:
        for text, row, where in file_documents(path, strict=False):
            found += 1
            yield _source(row, path, where, domain_dir), text
    if not found:
        if every and not files:
            raise DataError(f"domain folder {domain_dir} has no {split!r} file (files there: "
                            f"{', '.join(p.name for p in every)}); --domains leaves it out")
        what = ", ".join(p.name for p in files) or "no data files"
        raise DataError(f"domain folder {domain_dir} has no usable data ({what}): expected text files "
                        f"({', '.join(TEXT_SUFFIXES)}) or .jsonl lines with a non-empty string field 'text'")


def check_domains(domains: Mapping[str, Domain], *, split: str | None = "valid") -> None:
    """Fail early, before a model is loaded, if any domain has no usable document, if `split` is no
    split name, or if it names no file anywhere while the files are named by split (`train.jsonl`,
    `valid.jsonl`): a misspelt `--split` would otherwise read nothing, or every file, training text
    included."""
    if split:
        check_split(split)
        files = [p for d in domains.values() if not isinstance(d, FileDomain) for p in _domain_files(d)[1]]
        named = sorted({p.name for p in files if split_of(p)})
        if named and not any(in_split(p, split) for p in files):
            folders = [str(_domain_files(d)[0]) for d in domains.values() if not isinstance(d, FileDomain)]
            where = f"in {', '.join(folders)}" if len(folders) <= 3 else f"in the {len(folders)} domain folders"
            raise DataError(f"--split {split!r} matches no data file {where} (files there: {', '.join(named)}); "
                            "--split '' reads every file")
    for d in domains.values():
        next(iter_documents(d, split=split))
