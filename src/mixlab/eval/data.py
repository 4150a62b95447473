"""What `mixlab eval --data` accepts: a corpus folder (`<domain>/<split>.jsonl`, as shared/corpus) or
one domain's folder, its domains found as `mixlab data prepare` and `mixlab analyze` find them
(`corpus.find_domains`, `discover`) and read as `analyze` reads them (`iter_documents`: the files of
the split, `corpus.in_split`, or every file `data prepare` reads (.jsonl, .txt, .md, ...) of a domain
whose files are not named by split), one `.jsonl` file (its
`text` field; a `domain` field splits it, else the file's stem is the domain, or its folder's name for a split's file:
github/valid.jsonl is github), or a plain text file (one document)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mixlab.corpus import check_domains, find_domains, iter_documents, jsonl_texts, split_file_domain
from mixlab.errors import DataError


def _jsonl(path: Path, default_domain: str) -> Iterator[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for text, row, _ in jsonl_texts(lines, path, strict=True):
        domain = row.get("domain", default_domain)
        yield (domain if isinstance(domain, str) and domain.strip() else default_domain), text  # "" too


def documents(data: str | Path, *, split: str = "valid", max_docs: int | None = None,
              domains: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(domain, text) of every document under `data`, at most `max_docs` per domain, only those of
    `domains` when given (as `mixlab analyze --domains`: a name with no document is an error)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    seen: dict[str, int] = {}

    def take(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        for domain, text in pairs:
            if domains is not None and domain not in domains:
                continue
            if max_docs is not None and seen.get(domain, 0) >= max_docs:
                continue
            seen[domain] = seen.get(domain, 0) + 1
            yield domain, text

    if root.is_dir():  # as `mixlab analyze` reads it
        found = find_domains(root, names=domains)
        check_domains(found, split=split)
        for name, folder in found.items():
            yield from take((name, text) for _, text in iter_documents(folder, split=split))
    elif root.suffix == ".jsonl":
        yield from take(_jsonl(root, split_file_domain(root) or root.stem))
    else:
        try:
            text = root.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{root}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        yield from take(iter([(split_file_domain(root) or root.stem, text)]))
    missing = [d for d in domains or () if d not in seen]
    if missing:
        raise DataError(f"--domains: no document of {', '.join(missing)} in {root} (domains with documents: "
                        f"{', '.join(seen) or 'none'})")


__all__ = ["documents"]
