"""Data preparation and the resumable loader: layout, domains, determinism, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS
from mixlab.errors import UsageError
from mixlab.train.data import (
    BatchLoader,
    ByteTokenizer,
    DataError,
    Document,
    TokenDataset,
    eval_windows,
    prepare,
    read_documents,
)


def _jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts), encoding="utf-8")


def _corpus(root: Path) -> Path:
    _jsonl(root / "code" / "train.jsonl", [f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(20)])
    _jsonl(root / "code" / "valid.jsonl", ["def g(y):\n    return y * 2\n" * 5])
    _jsonl(root / "prose" / "train.jsonl", [f"The quick brown fox number {i} jumps. " * 4 for i in range(20)])
    _jsonl(root / "prose" / "valid.jsonl", ["A lazy dog sleeps all day long. " * 5])
    _jsonl(root / "chat" / "sft.jsonl", ["not pretraining text"])  # no train.jsonl: ignored
    return root


def test_prepare_corpus_layout(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "src")
    meta = prepare(read_documents([src]), tmp_path / "ds")
    assert meta["domains"] == ["code", "prose"]
    assert meta["splits"]["train"]["code"]["docs"] == 20 and meta["splits"]["valid"]["prose"]["docs"] == 1
    ds = TokenDataset(tmp_path / "ds")
    toks = ds.tokens("train", "code")
    assert toks.dtype == np.uint16
    starts = np.fromfile(tmp_path / "ds" / "train" / "code.docs.bin", dtype=np.int64)
    assert len(starts) == 20 and starts[0] == 0
    tok = ds.tokenizer()
    # Each document is [BOS] bytes [EOS]; decoding the first gives the text back.
    first = toks[starts[0]: starts[1]].tolist()
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert tok.decode(first) == "def f0(x):\n    return x + 0\n" * 3
    assert not list((tmp_path).glob(".ds.tmp-*"))  # no temporary folder left behind


def test_prepare_generic_folder_holds_out_validation(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / "src" / "notes").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "notes" / f"n{i}.txt").write_text(f"note {i} " * 10, encoding="utf-8")
    meta = prepare(read_documents([tmp_path / "src"]), tmp_path / "ds", valid_fraction=0.1, seed=3)
    assert meta["splits"]["train"]["notes"]["docs"] == 18 and meta["splits"]["valid"]["notes"]["docs"] == 2
    # a large fraction of few documents held out all of them: the domain had no training text
    meta = prepare(read_documents([tmp_path / "src"]), tmp_path / "ds2", valid_fraction=0.99, seed=3)
    assert meta["splits"]["train"]["notes"]["docs"] == 1 and meta["splits"]["valid"]["notes"]["docs"] == 19


def test_each_domain_folder_given_is_its_own_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data prepare corpus/code corpus/prose` put both folders' files in one domain, "default"."""
    src = _corpus(tmp_path / "src")
    meta = prepare(read_documents([src / "code", src / "prose"]), tmp_path / "ds")
    assert meta["domains"] == ["code", "prose"]
    assert meta["splits"]["train"]["code"]["docs"] == 20 and meta["splits"]["valid"]["prose"]["docs"] == 1
    monkeypatch.chdir(src / "prose")  # `.` is the working folder, by its name
    assert {d.domain for d in read_documents(["."])} == {"prose"}
    _jsonl(tmp_path / "notes.jsonl", ["a note"])
    assert {d.domain for d in read_documents([tmp_path / "notes.jsonl"])} == {"notes"}  # a file given
    # a split's file is its folder's domain, as eval names it: these made one domain "default"
    files = [src / "code" / "train.jsonl", src / "code" / "valid.jsonl", src / "prose" / "train.jsonl"]
    assert {(d.domain, d.split) for d in read_documents(files)} == {("code", "train"), ("code", "valid"),
                                                                    ("prose", "train")}


def test_a_file_in_two_sources_is_refused(tmp_path: Path) -> None:
    """`data prepare src src/code` read src/code's files twice: duplicated documents, some in both splits."""
    src = _corpus(tmp_path / "src")
    for sources in ([src, src], [src, src / "code"], [src / "code", src / "code" / "train.jsonl"]):
        with pytest.raises(DataError, match=r"train.jsonl is in two sources \(.*\); give each file once"):
            list(read_documents(sources))


def test_a_domain_in_two_source_folders_is_refused(tmp_path: Path) -> None:
    """`data prepare x/data y/data` merged both folders into one domain, `data`, without a word."""
    for folder in ("x/data", "y/data"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.txt").write_text(f"text of {folder}", encoding="utf-8")
    with pytest.raises(DataError, match=r"domain 'data' is in two source folders \(.*x/data and .*y/data\)"):
        list(read_documents([tmp_path / "x/data", tmp_path / "y/data"]))
    with pytest.raises(DataError, match="domain 'code' is in two source folders"):  # corpora's domain folders too
        list(read_documents([_corpus(tmp_path / "c1"), _corpus(tmp_path / "c2")]))
    _jsonl(tmp_path / "a" / "notes.jsonl", ["a"])  # files given alone may share a domain, by their stem
    _jsonl(tmp_path / "b" / "notes.jsonl", ["b"])
    assert {d.domain for d in read_documents([tmp_path / "a/notes.jsonl", tmp_path / "b/notes.jsonl"])} == {"notes"}


def test_linked_subfolders_of_a_domain_are_read_once(tmp_path: Path) -> None:
    """A domain assembled from links to its parts (code/more -> elsewhere/more) was read without
    them, silently (rglob does not follow links to folders); they are followed, as os.walk(followlinks=
    True) and Hugging Face datasets do, and a link to a folder above (a loop) or one already read is
    not followed again. One rule: data prepare, analyze and eval read the same files."""
    from mixlab.corpus import find_domains

    (tmp_path / "c" / "code" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "more").mkdir(parents=True)
    (tmp_path / "c" / "code" / "a.py").write_text("a = 1\n", encoding="utf-8")
    (tmp_path / "elsewhere" / "more" / "b.py").write_text("b = 2\n", encoding="utf-8")
    (tmp_path / "c" / "code" / "more").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    (tmp_path / "c" / "code" / "sub" / "up").symlink_to(tmp_path / "c", target_is_directory=True)  # a loop
    (tmp_path / "c" / "code" / "again").symlink_to(tmp_path / "c" / "code" / "more", target_is_directory=True)
    docs = sorted(d.text for d in read_documents([tmp_path / "c"]))
    assert docs == ["a = 1\n", "b = 2\n"]
    assert [p.name for p in find_domains(tmp_path / "c")["code"]] == ["a.py", "b.py"]
    (tmp_path / "c" / "lib").mkdir()  # a link to another domain's folder: its files in two domains
    (tmp_path / "c" / "lib" / "l.py").write_text("l = 3\n", encoding="utf-8")
    (tmp_path / "c" / "code" / "lib").symlink_to(tmp_path / "c" / "lib", target_is_directory=True)
    with pytest.raises(DataError, match=r"c/lib/l\.py is .*c/code/lib/l\.py too \(a link leads to it\): .*c holds"):
        list(read_documents([tmp_path / "c"]))  # it was "is in two sources (c and c)"


def test_hidden_subfolders_of_a_domain_are_skipped(tmp_path: Path) -> None:
    """Jupyter's `.ipynb_checkpoints/` copies (and `.git/`, a `.draft.txt`) inside a domain were read as
    documents of their own, doubling them; hidden files and folders are skipped, as the hidden folders
    beside the domains already were, and as Hugging Face datasets skips them."""
    from mixlab.corpus import find_domains

    (tmp_path / "c" / "notes" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "notes" / "n.txt").write_text("x\n", encoding="utf-8")
    (tmp_path / "c" / "notes" / ".ipynb_checkpoints" / "n-checkpoint.txt").write_text("x\n", encoding="utf-8")
    (tmp_path / "c" / "notes" / ".draft.txt").write_text("y\n", encoding="utf-8")
    assert [d.text for d in read_documents([tmp_path / "c"])] == ["x\n"]
    assert [p.name for p in find_domains(tmp_path / "c")["notes"]] == ["n.txt"]


def test_file_kinds_are_read_in_any_case(tmp_path: Path) -> None:
    """valid.JSONL given alone was trained on (and evaluated) as one document of raw JSON text, and
    beside other files in a folder it was skipped, as was NOTES.TXT: a file's kind is its suffix in
    any case, as its split is its name in any case (Valid.jsonl)."""
    from mixlab.corpus import find_domains, iter_documents

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "valid.JSONL").write_text('{"text": "upper"}\n', encoding="utf-8")
    (tmp_path / "web" / "NOTES.TXT").write_text("notes", encoding="utf-8")
    assert [(d.text, d.split) for d in read_documents([tmp_path / "web" / "valid.JSONL"])] == [("upper", "valid")]
    assert sorted(d.text for d in read_documents([tmp_path / "web"])) == ["notes", "upper"]
    assert [t for _, t in iter_documents(find_domains(tmp_path / "web" / "valid.JSONL")["web"])] == ["upper"]
    assert [t for _, t in iter_documents(find_domains(tmp_path)["web"])] == ["upper"]  # the valid split


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    """A UTF-8 file with a byte-order mark (Notepad's, Excel's 'UTF-8' export): its .jsonl failed as
    'not valid JSON (Unexpected UTF-8 BOM)' and a text file's document began with U+FEFF, in data
    prepare, analyze and eval alike."""
    from mixlab.eval.data import documents

    (tmp_path / "c" / "web").mkdir(parents=True)
    (tmp_path / "c" / "web" / "valid.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "c" / "web" / "notes.txt").write_bytes(b"\xef\xbb\xbfnotes")
    assert sorted(d.text for d in read_documents([tmp_path / "c"])) == ["first", "notes", "second"]
    assert list(documents(tmp_path / "c")) == [("web", "first"), ("web", "second")]
    assert list(documents(tmp_path / "c", split="")) == [("web", "notes"), ("web", "first"), ("web", "second")]
    assert list(documents(tmp_path / "c" / "web" / "valid.jsonl")) == [("web", "first"), ("web", "second")]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf \n")
    with pytest.raises(DataError, match=r"bom\.txt: no document in it"):
        list(read_documents([tmp_path / "bom.txt"]))


def test_a_data_file_linked_to_nothing_is_named(tmp_path: Path) -> None:
    """code/valid.jsonl linked to a moved file was skipped without a word (a domain read without
    its validation text, or 'no data files'); it is an error naming the link and its target."""
    from mixlab.corpus import find_domains

    (tmp_path / "c" / "code").mkdir(parents=True)
    (tmp_path / "c" / "code" / "train.jsonl").write_text('{"text": "t"}\n', encoding="utf-8")
    (tmp_path / "c" / "code" / "valid.jsonl").symlink_to(tmp_path / "moved.jsonl")
    for read in (lambda: list(read_documents([tmp_path / "c"])), lambda: find_domains(tmp_path / "c")):
        with pytest.raises(DataError, match=r"code/valid\.jsonl is a link to .*moved\.jsonl, which does not exist"):
            read()


def test_byte_tokenizer_roundtrip_unicode() -> None:
    tok = ByteTokenizer()
    text = "naïve café — ∑ 🙂"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "empty.jsonl: no document in it"),
        ("bad.txt", b"caf\xe9 au lait", "bad.txt: not UTF-8 text"),
        # valid UTF-8 but binary: UTF-16 text without a byte-order mark, read as text with every other byte NUL
        ("utf16.txt", "Hello, world.\n".encode("utf-16-le"), "utf16.txt: a NUL byte at byte 1: binary data or "
                                                            "UTF-16 text, not UTF-8 text"),
        ("blob.txt", b"\x7fELF\x02\x01\x01\x00\x00", "blob.txt: a NUL byte at byte 7"),
        ("notext.jsonl", b'{"text": "ok"}\n{"content": "no text field"}\n', "notext.jsonl:2: expected a JSON object "
                                                                           "with a 'text' field"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "broken.jsonl:2: not valid JSON"),
        ("nontext.jsonl", b'{"text": 5}\n', "field 'text' must be a string"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        prepare(read_documents([f]), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_missing_source_and_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        list(read_documents([tmp_path / "nope"]))
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(tmp_path)


def test_a_model_folder_as_out_is_refused_before_reading(tmp_path: Path) -> None:
    """`prepare --out MODEL` (a converted model folder) tokenized the whole corpus, then was refused."""
    from mixlab.atomic import write_manifest
    from mixlab.errors import OutputError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    write_manifest(model, kind="checkpoint")

    def documents() -> Iterator[Document]:  # must not be read
        raise AssertionError("the corpus was read before the destination was checked")
        yield

    with pytest.raises(OutputError, match=r"model: holds a checkpoint mixlab wrote, not a dataset"):
        prepare(documents(), model)
    assert (model / "config.json").read_text(encoding="utf-8") == "{}"


def test_a_prepared_dataset_as_source_is_named(tmp_path: Path) -> None:
    """`data prepare DATASET` (the token shards, not their text) said only "no data files found";
    `analyze --data DATASET` already named it."""
    prepare(read_documents([_corpus(tmp_path / "src")]), tmp_path / "ds")
    with pytest.raises(DataError, match=r"ds: no data files .* found; this is a dataset `mixlab data prepare` "
                                        r"wrote \(token shards\): pass the text corpus"):
        prepare(read_documents([tmp_path / "ds"]), tmp_path / "ds2")


def test_a_folder_of_only_chat_transcripts_says_why_it_has_no_data(tmp_path: Path) -> None:
    """A corpus folder holding only chat/ (the shared corpus's `chat/sft.jsonl`) said "no data files
    found" with .jsonl files right there: chat/ is passed over as no domain, and the error now says so."""
    (tmp_path / "c" / "chat").mkdir(parents=True)
    (tmp_path / "c" / "chat" / "sft.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=r"c: no data files .* found; chat/ not read as a domain \(chat transcripts "
                                        r"and licence texts are not running text; --domains chat reads it\)$"):
        list(read_documents([tmp_path / "c"]))
    (tmp_path / "d").mkdir()  # an empty folder: nothing passed over, nothing said
    with pytest.raises(DataError, match=r"d: no data files \([^)]*\) found$"):
        list(read_documents([tmp_path / "d"]))


def test_domains_name_only_domains_the_sources_have(tmp_path: Path) -> None:
    """A misspelt `--domains` entry was dropped silently (`--domains code,prsoe` prepared code alone)."""
    src = _corpus(tmp_path / "src")
    assert {d.domain for d in read_documents([src], domains=["prose"])} == {"prose"}
    with pytest.raises(UsageError, match=r"--domains: 'prsoe' not found in .*src \(did you mean 'prose'\?\); "
                                         r"domains there: code, prose$"):
        prepare(read_documents([src], domains=["code", "prsoe"]), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    (src / "empty" / "sub").mkdir(parents=True)  # named, there, but without data: it was "not found"
    with pytest.raises(DataError, match=r"domain folder .*src/empty holds no data file \(\.jsonl, .*not even in a sub"):
        prepare(read_documents([src], domains=["code", "empty"]), tmp_path / "ds")
    # chat/ is no pretraining domain unless named (as analyze and eval take it)
    assert {d.domain for d in read_documents([src], domains=["chat"])} == {"chat"}


def _dataset(tmp_path: Path) -> TokenDataset:
    prepare(read_documents([_corpus(tmp_path / "src")]), tmp_path / "ds")
    return TokenDataset(tmp_path / "ds")


def test_loader_is_deterministic_and_resumable(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    a = BatchLoader(ds, seq_len=16, batch_size=4, seed=7)
    straight = [a.next_batch() for _ in range(80)]  # crosses an epoch (the split has 295 windows)
    assert a.epoch >= 1
    b = BatchLoader(ds, seq_len=16, batch_size=4, seed=7)
    for _ in range(13):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # the position survives a JSON round trip
    c = BatchLoader(ds, seq_len=16, batch_size=4, seed=7)
    c.load_state_dict(state)
    for i in range(13, 80):
        x, y, d = c.next_batch()
        assert torch.equal(x, straight[i][0]) and torch.equal(y, straight[i][1]) and torch.equal(d, straight[i][2])
    other = BatchLoader(ds, seq_len=16, batch_size=4, seed=8).next_batch()
    assert not torch.equal(other[0], straight[0][0])
    with pytest.raises(DataError, match="seq_len"):
        BatchLoader(ds, seq_len=32, batch_size=4, seed=7).load_state_dict(state)


def test_loader_targets_shift_and_windows_stay_in_one_domain(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    loader = BatchLoader(ds, seq_len=16, batch_size=8, seed=0)
    tok = ds.tokenizer()
    for _ in range(5):
        x, y, d = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, dom in zip(x.tolist(), d.tolist(), strict=True):
            text = tok.decode(row)
            if loader.domains[dom] == "code":
                assert "fox" not in text
            else:
                assert "def" not in text


def test_seq_len_longer_than_the_data_is_an_error(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    with pytest.raises(DataError, match="no window of"):
        BatchLoader(ds, split="valid", seq_len=10_000, batch_size=2)
    w = eval_windows(ds, split="valid", domain="code", seq_len=16, max_windows=3)
    assert w.shape == (3, 17)


def test_a_damaged_meta_json_is_a_clear_error(tmp_path: Path) -> None:
    """A meta.json of the right format missing a field (or not an object) raised KeyError /
    AttributeError tracebacks."""
    _dataset(tmp_path)
    mf = tmp_path / "ds" / "meta.json"
    meta = json.loads(mf.read_text())
    for bad, match in (({k: v for k, v in meta.items() if k != "vocab_size"}, "missing or bad field .*vocab_size"),
                       ({**meta, "splits": [1]}, "missing or bad field"), ([1], "expected a JSON object"),
                       # bos_id / eos_id: a KeyError traceback from train, "invalid literal for int()", and one
                       # past the vocabulary blamed on the command line's --set flags
                       ({k: v for k, v in meta.items() if k != "bos_id"}, "missing or bad field \\('bos_id'\\)"),
                       ({**meta, "bos_id": "x"}, "missing or bad field \\(bos_id 'x', eos_id 2: expected token ids "
                                                 "below vocab_size 259\\); prepare the dataset again"),
                       ({**meta, "eos_id": 259}, "missing or bad field \\(bos_id 1, eos_id 259: expected")):
        mf.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=rf"meta.json: {match}"):
            TokenDataset(tmp_path / "ds")


def test_meta_json_names_stay_inside_the_dataset_and_counts_are_integers(tmp_path: Path) -> None:
    """A hand-edited meta.json's split or domain names became file paths ("../x" read a file outside the
    dataset's folder), and a vocab_size of "259" or 259.9 went through int()."""
    _dataset(tmp_path)
    mf = tmp_path / "ds" / "meta.json"
    meta = json.loads(mf.read_text())
    code = meta["splits"]["train"]["code"]
    for bad, match in (({**meta, "splits": {**meta["splits"], "train": {"../x": code}}}, "split or domain '../x'"),
                       ({**meta, "splits": {"..": meta["splits"]["train"]}}, "split or domain '..'"),
                       ({**meta, "splits": {"a/b": meta["splits"]["train"]}}, "split or domain 'a/b'"),
                       ({**meta, "domains": ["code", "../../etc/passwd"]}, "domains .*expected plain names"),
                       ({**meta, "vocab_size": "259"}, "'vocab_size' must be an integer, found '259'"),
                       ({**meta, "vocab_size": 259.9}, "'vocab_size' must be an integer, found 259.9")):
        mf.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=rf"meta.json: missing or bad field \(.*{match}"):
            TokenDataset(tmp_path / "ds")
    mf.write_text(json.dumps(meta))
    assert TokenDataset(tmp_path / "ds").vocab_size == 259


def test_truncated_shard_is_detected(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    f = tmp_path / "ds" / "train" / "code.tokens.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="incomplete"):
        TokenDataset(ds.path).tokens("train", "code")


def test_a_shard_whose_size_disagrees_with_meta_json_is_named(tmp_path: Path) -> None:
    """A tokens.bin one byte longer than meta.json says was called "incomplete"; a docs.bin was never
    checked at all (garbage in it went unnoticed)."""
    ds = _dataset(tmp_path)
    f = tmp_path / "ds" / "train" / "code.tokens.bin"
    n = ds.meta["splits"]["train"]["code"]["tokens"]
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(DataError, match=rf"code.tokens.bin: expected {2 * n} bytes \({n} tokens of uint16, as "
                                        rf"meta.json says\), found {2 * n + 1} bytes \(not a whole number of uint16"):
        TokenDataset(ds.path).tokens("train", "code")
    f.write_bytes(f.read_bytes()[:-1])
    d = tmp_path / "ds" / "train" / "code.docs.bin"
    starts = d.read_bytes()
    for bad, match in ((starts[:-8], "expected 160 bytes \\(20 document offsets of int64, as meta.json says\\), "
                                     "found 152 bytes;"),
                       (np.arange(20, dtype=np.int64)[::-1].tobytes(), f"document offsets are not increasing from 0 "
                                                                         f"and below {n} \\(the tokens' count\\)"),
                       ((np.arange(20, dtype=np.int64) * n).tobytes(), "document offsets are not increasing")):
        d.write_bytes(bad)
        with pytest.raises(DataError, match=rf"code.docs.bin: {match}"):
            TokenDataset(ds.path).tokens("train", "code")
    d.unlink()
    with pytest.raises(DataError, match="code.docs.bin: expected 160 bytes .*found no file"):
        TokenDataset(ds.path).tokens("train", "code")
    d.write_bytes(starts)
    assert len(TokenDataset(ds.path).tokens("train", "code")) == n


def test_a_token_id_outside_the_vocabulary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tokens.bin holding an id >= meta.json's vocab_size was trained on (an IndexError deep in the
    embedding, or nothing at all below a model's larger vocabulary): the first such id a read meets is
    named with the file, its place and the vocabulary, whether a window (the loader's, the evaluation's)
    or `check_ids` (the whole dataset, in chunks) reads it."""
    ds = _dataset(tmp_path)
    f = tmp_path / "ds" / "valid" / "prose.tokens.bin"
    toks = np.fromfile(f, dtype=np.uint16)
    assert toks.max() < ds.vocab_size == 259
    import mixlab.train.data as data

    def named(where: int) -> str:
        return rf"prose.tokens.bin: token {where} is id 300, outside the dataset's vocabulary of 259 \(meta.json's"

    for chunk in (data.ID_CHUNK, 16):
        monkeypatch.setattr(data, "ID_CHUNK", chunk)
        for where in (0, 37, len(toks) - 1):
            bad = toks.copy()
            bad[-1], bad[where] = 65535, 300  # the first one is named
            f.write_bytes(bad.tobytes())
            with pytest.raises(DataError, match=named(where)):
                TokenDataset(ds.path).check_ids()
    bad = toks.copy()
    bad[37] = 300
    f.write_bytes(bad.tobytes())
    fresh = TokenDataset(ds.path)
    assert len(fresh.tokens("valid", "prose")) == len(toks)  # opening reads no id
    assert fresh.read("valid", "prose", 0, 37).tolist() == toks[:37].tolist()
    with pytest.raises(DataError, match=named(37)):
        fresh.read("valid", "prose", 30, 47)
    with pytest.raises(DataError, match=named(37)):  # the windows 32..48 of 16 tokens hold it
        eval_windows(fresh, split="valid", domain="prose", seq_len=16, max_windows=100)
    loader = BatchLoader(fresh, split="valid", domains=["prose"], seq_len=16, batch_size=1)
    held = next(i for i, w in enumerate(loader._perm) if w == 2)  # tokens 32..48
    for _ in range(held):
        loader.next_batch()
    with pytest.raises(DataError, match=named(37)):
        loader.next_batch()
    f.write_bytes(toks.tobytes())
    assert TokenDataset(ds.path).check_ids() == sum(v["tokens"] for s in ds.meta["splits"].values() for v in s.values())


def test_opening_a_dataset_reads_no_token_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id of every shard was checked when the shard opened: the whole dataset read before the
    first step, in every process of a distributed run (minutes for tens of GB). Now a run's start reads
    the ids of the windows it uses alone, and an id outside the vocabulary deep in a shard costs nothing
    until a window holds it."""
    ds = _dataset(tmp_path)
    f = tmp_path / "ds" / "train" / "code.tokens.bin"
    toks = np.fromfile(f, dtype=np.uint16)
    last = (len(toks) - 1) // 16 - 1  # code's last window of 16 + 1 tokens
    toks[16 * last + 8] = 300
    f.write_bytes(toks.tobytes())
    checked: list[int] = []
    real = TokenDataset._check_ids

    def spy(self: TokenDataset, part: np.ndarray, *args: object) -> None:
        checked.append(len(part))
        real(self, part, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(TokenDataset, "_check_ids", spy)
    opened = TokenDataset(ds.path)
    loader = BatchLoader(opened, seq_len=16, batch_size=4, seed=0)  # opens both train shards
    assert len(opened.tokens("train", "code")) == len(toks) and checked == []
    assert loader.domains[0] == "code" and loader.counts[0] == last + 1
    for w in range(last):
        loader.window(w)
    assert checked == [17] * last
    with pytest.raises(DataError, match=rf"code.tokens.bin: token {16 * last + 8} is id 300"):
        loader.window(last)
    checked.clear()
    x, _, _ = loader.next_batch()
    assert x.shape == (4, 16) and checked == [17] * 4


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not present")
def test_prepare_shared_corpus_two_domains(tmp_path: Path) -> None:
    meta = prepare(read_documents([CORPUS], domains=["dm_mathematics", "github"]), tmp_path / "ds")
    assert meta["domains"] == ["dm_mathematics", "github"]
    ds = TokenDataset(tmp_path / "ds")
    x, _, d = BatchLoader(ds, seq_len=64, batch_size=4, seed=0).next_batch()
    assert x.shape == (4, 64) and set(d.tolist()) <= {0, 1}


def test_a_tokenizer_given_by_a_relative_path_is_found_from_elsewhere(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tokenizer tok.model` went into meta.json (and a trained model's mixlab_data.json) as "tok.model":
    `mixlab analyze` of the model from another folder said "tokenizer tok.model does not exist", or read
    another folder's tok.model."""
    import shutil

    from mixlab.tokenizer import default_tokenizer_path

    shutil.copy(default_tokenizer_path(), tmp_path / "tok.model")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Hello world."}) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    meta = prepare(read_documents(["a.jsonl"]), "ds", tokenizer="tok.model", valid_fraction=0)
    assert meta["tokenizer"]["path"] == str(tmp_path / "tok.model") and meta["tokenizer"]["name"] == "tok.model"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ds = TokenDataset(tmp_path / "ds")
    assert ds.tokenizer().decode(ds.tokens("train", "a").tolist()) == "Hello world."


def test_prepare_with_mixtral_tokenizer(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "Hello world, this is Mixtral."}) + "\n", encoding="utf-8")
    meta = prepare(read_documents([f]), tmp_path / "ds", tokenizer="mixtral", valid_fraction=0)
    assert meta["vocab_size"] == 32000 and meta["tokenizer"]["type"] == "file"
    ds = TokenDataset(tmp_path / "ds")
    ids = ds.tokens("train", "a").tolist()
    assert ids[0] == 1 and ids[-1] == 2
    assert ds.tokenizer().decode(ids) == "Hello world, this is Mixtral."
    # Bits per byte need the text's bytes, which the tokens alone do not give for this tokenizer.
    assert meta["bytes"]["train"]["a"] == len(b"Hello world, this is Mixtral.")
    assert ds.bytes_per_token("train", "a") == 29 / len(ids)
    del ds.meta["bytes"]  # a dataset prepared before byte counts were recorded
    assert ds.bytes_per_token("train", "a") is None


def test_prepare_records_the_bytes_of_each_split_and_domain(tmp_path: Path) -> None:
    texts = ["naïve café ☕ " * 3, "plain ascii text", "日本語のテキスト"]
    _jsonl(tmp_path / "src" / "d" / "train.jsonl", texts[:2])
    _jsonl(tmp_path / "src" / "d" / "valid.jsonl", texts[2:])
    meta = prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    assert meta["bytes"] == {"train": {"d": sum(len(t.encode()) for t in texts[:2])},
                             "valid": {"d": len(texts[2].encode())}}
    ds = TokenDataset(tmp_path / "ds")
    recorded = ds.bytes_per_token("valid", "d")
    assert recorded == len(texts[2].encode()) / (len(texts[2].encode()) + 2)  # [BOS] bytes [EOS]
    del ds.meta["bytes"]  # before byte counts were recorded: exact for the byte tokenizer anyway
    assert ds.bytes_per_token("valid", "d") == recorded
    assert ds.fingerprint() == {"tokenizer": meta["tokenizer"], "splits": meta["splits"]}  # resume unchanged


def test_cli_prepare_reports_an_empty_split_as_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixlab.cli import main

    _jsonl(tmp_path / "src" / "notes.jsonl", ["some text here"] * 5)  # no valid.* file
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--valid-fraction", "0",
                 "--tokenizer", "bytes"]) == 0
    out = capsys.readouterr().out
    assert "valid: none" in out and "over 0 domain" not in out and "train: " in out


def test_cli_domains_take_blanks_after_the_commas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--domains "code, prose"` (data prepare, eval, analyze) looked for a domain named ' prose'."""
    from mixlab.cli import main

    src = _corpus(tmp_path / "src")
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--domains", "code, prose",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["domains"] == ["code", "prose"]
    for command in (["data", "prepare", str(src), "--out", str(tmp_path / "ds2")],
                    ["eval", "--model", "m", "--data", "d"], ["analyze", "--model", "m", "--data", "d", "--out", "r"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--domains", "code,"])
        assert e.value.code == 2
        assert "argument --domains: expected comma-separated names, e.g. code,prose; got 'code,'" in \
            capsys.readouterr().err


def test_cli_prepare_names_its_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data prepare --tokenizer mixtral` (or a path) ended 'wrote ds (tokenizer file, ...)', naming none."""
    from mixlab.cli import main

    _jsonl(tmp_path / "src" / "notes.jsonl", ["some text here"])
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--valid-fraction", "0",
                 "--tokenizer", "mixtral", "--quiet"]) == 0
    assert f"wrote {tmp_path / 'ds'} (tokenizer mixtral, vocabulary 32000, uint16)" in capsys.readouterr().out
