"""What `mixlab eval --data` accepts, as `mixlab analyze --data` does (`corpus.find_domains`): a corpus
folder (`<domain>/<split>.jsonl`, as shared/corpus) or one domain's folder, its domains found as `mixlab
data prepare` finds them (`discover`) and read as `analyze` reads them (`iter_documents`: the files of
the split, `corpus.in_split`, or every file `data prepare` reads (.jsonl, .txt, .md, ...) of a domain
whose files are not named by split); or one file, read whole (`corpus.FileDomain`): a `.jsonl` file
(its `text` field; a `domain` field splits it, else the file's stem is the domain, or its folder's
name for a split's file: github/valid.jsonl is github) or a plain text file (one document)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mixlab.corpus import check_domains, find_domains, iter_documents
from mixlab.errors import DataError


def documents(data: str | Path, *, split: str = "valid", max_docs: int | None = None,
              domains: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(domain, text) of every document under `data`, at most `max_docs` per domain, only those of
    `domains` when given (as `mixlab analyze --domains`: a name with no document is an error)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    found = find_domains(root, names=domains)
    check_domains(found, split=split)
    for name, domain in found.items():
        for n, (_, text) in enumerate(iter_documents(domain, split=split)):
            if max_docs is not None and n >= max_docs:
                break
            yield name, text


__all__ = ["documents"]
