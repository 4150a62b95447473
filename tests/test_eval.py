"""Evaluation: lm-eval's rolling windows, perplexity against a full recompute, `mixlab eval`, and the
lm-eval model against lm-eval's own `hf` model on the same transformers checkpoint (float32)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, hf_mixtral, hf_tokenizer_json
from mixlab import load_model, load_tokenizer
from mixlab.cli import main
from mixlab.eval.perplexity import evaluate_texts, rolling_windows, score_ids

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Mixtral routes every token to two of its eight experts.\nConsecutive tokens often share them.",
    "x",
    "Grüß Gott — naïve café, 東京, emoji 🙂 and tabs\tinside.",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers Mixtral with Mixtral's 32,000-token vocabulary and a tokenizer.json."""
    path = hf_mixtral(tmp_path_factory.mktemp("mx"), vocab_size=32000, hidden_size=32, intermediate_size=48,
                      max_position_embeddings=64)
    hf_tokenizer_json(path)
    return path


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared corpus's layout (its 8 text domains, chat/, LICENSES/, SOURCES.md) with each domain's
    first 2 documents cut to 800 characters: `mixlab eval` on the corpus scored its first documents
    whole, ~30,000 tokens through a 32,000-row output layer (most of this file's time), where ~200 a
    domain (several windows of 32 or 64 each) check the same."""
    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(CORPUS.rglob("*")):  # (the corpus is read-only: files copied, not their modes)
        to = root / path.relative_to(CORPUS)
        if path.is_dir():
            to.mkdir()
        elif path.suffix != ".jsonl":
            shutil.copyfile(path, to)
        else:
            with path.open(encoding="utf-8") as f:
                docs = [json.loads(next(f)) for _ in range(2)]
            docs = [d | {"text": d["text"][:800]} if "text" in d else d for d in docs]
            to.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return root


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 64])
@pytest.mark.parametrize("context", [1, 4, 16])
def test_windows_equal_lm_eval(n: int, context: int) -> None:
    utils = pytest.importorskip("lm_eval.utils")
    ids = list(range(100, 100 + n))
    theirs = [utils.make_disjoint_window(w) for w in
              utils.get_rolling_token_windows(token_list=ids, prefix_token=1, max_seq_len=context, context_len=1)]
    ours = rolling_windows(ids, prefix=1, context=context)
    assert len(ours) == len(theirs)
    seq = [1, *ids]
    pos = 0
    for (x, k), (ctx, cont) in zip(ours, theirs, strict=True):
        assert seq[pos + 1: pos + 1 + k] == cont
        assert x == (ctx + cont)[-(context + 1):][:-1]  # the input lm-eval's hf model builds
        pos += k
    assert pos == n


def test_every_token_scored_once_equals_full_recompute(ckpt: Path) -> None:
    model = load_model(ckpt)
    ids = torch.randint(3, 32000, (50,)).tolist()
    seq = torch.tensor([[1, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]).float(), -1)[0]
    full = -float(logp.gather(-1, seq[0, 1:, None]).sum())
    assert score_ids(model, ids, prefix=1, context=64) == pytest.approx(full, rel=1e-5)
    # smaller windows see less context: a different (higher on average) number, same token count
    for context, stride in ((8, None), (16, 4)):
        nll = score_ids(model, ids, prefix=1, context=context, stride=stride, batch_size=3)
        assert math.isfinite(nll) and nll != pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(ids, prefix=1, context=8, stride=9)


@pytest.mark.parametrize("stride", [4, 16])
def test_strided_windows_equal_transformers_perplexity_guide(ckpt: Path, stride: int) -> None:
    """--context C --stride S is the strided recipe of transformers' perplexity guide on [BOS] + ids
    with max_length = C + 1 (docs/evaluation.md) where the text ends on a window's end."""
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    C = 16
    ids = torch.randint(3, 32000, (C + 3 * stride,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = torch.tensor([[1, *ids]])
    nll, prev_end = 0.0, 0
    for begin in range(0, seq.size(1), stride):  # the guide's loop, summing NLL rather than averaging
        end = min(begin + C + 1, seq.size(1))
        x = seq[:, begin:end]
        y = x.clone()
        y[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            nll += float(hf(x, labels=y).loss) * int((y[:, 1:] != -100).sum())
        prev_end = end
        if end == seq.size(1):
            break
    assert score_ids(load_model(ckpt, dtype="float32"), ids, prefix=1, context=C, stride=stride) == \
        pytest.approx(nll, rel=1e-6)


def test_strided_windows_compute_logits_only_where_they_score(ckpt: Path) -> None:
    """A strided window (and lm-eval's last window) scores its last tokens only, but every position
    of it went through the output layer ([B, T, V] float logits, then discarded): now only the scored
    rows do, and the NLL is what the whole logits gave (float32)."""
    model = load_model(ckpt, dtype="float32")
    ids = torch.randint(3, 32000, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    rows: list[int] = []
    hook = model.output.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[:-1].numel()))
    nll = score_ids(model, ids, prefix=1, context=16, stride=4, batch_size=3)
    hook.remove()
    assert sum(rows) == len(ids)  # 16 + 4 + ... once each; it was 16 a window (and the padding)
    seq, old, pos = [1, *ids], 0.0, 0  # the old path: each window's whole logits, then its last n rows
    with torch.no_grad():
        for x, n in rolling_windows(ids, prefix=1, context=16, stride=4):
            lp = torch.log_softmax(model(torch.tensor([x])).float(), -1)[0, -n:]
            old -= float(lp.gather(-1, torch.tensor(seq[pos + 1: pos + 1 + n])[:, None]).sum())
            pos += n
    assert nll == pytest.approx(old, rel=1e-6)


def test_metrics_use_bytes_and_words_of_the_text(ckpt: Path) -> None:
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    r = evaluate_texts(model, lambda s: tok.encode(s, bos=False), [("a", t) for t in TEXTS], prefix=tok.bos_id,
                       context=32)
    s = r.domains["a"]
    assert s.bytes == sum(len(t.encode()) for t in TEXTS)
    assert s.words == sum(len(t.split()) + (t[-1].isspace()) for t in TEXTS)  # re.split keeps a trailing ""
    m = s.metrics()
    assert m["bits_per_byte"] == pytest.approx(s.nll / s.bytes / math.log(2))
    assert m["word_perplexity"] == pytest.approx(math.exp(s.nll / s.words))


def test_cli_eval_on_the_corpus(ckpt: Path, short_corpus: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(ckpt), "--data", str(short_corpus), "--max-docs", "1", "--context", "64",
               "--dtype", "fp32", "--json", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["settings"]["dtype"] == "float32"  # what ran: it was the flag's text, "fp32" (or "auto")
    assert res["settings"]["max_docs"] == 1 and res["settings"]["domains"] is None  # a subset says so
    assert len(res["domains"]) == 8 and res["overall"]["docs"] == 8
    assert res["overall"]["tokens"] == sum(d["tokens"] for d in res["domains"].values())
    assert "bits/byte" in capsys.readouterr().out


def test_eval_takes_one_domain_folder_as_analyze_does(tmp_path: Path) -> None:
    """`mixlab eval --data corpus/code` (which `mixlab analyze` takes) was refused: no <domain>/valid.jsonl."""
    from mixlab.eval.data import documents

    one = list(documents(CORPUS / "github", max_docs=2))
    assert one == [d for d in documents(CORPUS, max_docs=2) if d[0] == "github"] and len(one) == 2
    # a split's file given alone is its folder's domain, as in the corpus (it was "valid")
    assert list(documents(CORPUS / "github" / "valid.jsonl", max_docs=2)) == one
    (tmp_path / "chat").mkdir()  # not a text domain, for eval as for analyze (its lines have no 'text')
    (tmp_path / "chat" / "valid.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "valid.jsonl").write_text('{"text": "x = 1"}\n')
    assert list(documents(tmp_path)) == [("code", "x = 1")]


def test_eval_reads_domain_folders_as_analyze_does(tmp_path: Path) -> None:
    """A corpus of domain folders holding .txt files, which analyze reads, was refused by eval (no
    <domain>/valid.jsonl); a domain with train.jsonl alone was left out by eval and read in place of
    its valid text (its training text) by analyze: both are now one error naming the folder."""
    from mixlab.analysis import check_domains, find_domains
    from mixlab.eval.data import documents

    for domain, text in (("code", "x = 1"), ("prose", "The cat sat.")):
        (tmp_path / "c" / domain).mkdir(parents=True)
        (tmp_path / "c" / domain / "a.txt").write_text(text)
    assert list(documents(tmp_path / "c")) == [("code", "x = 1"), ("prose", "The cat sat.")]
    assert list(documents(tmp_path / "c" / "code")) == [("code", "x = 1")]
    (tmp_path / "s" / "web").mkdir(parents=True)
    (tmp_path / "s" / "web" / "valid.jsonl").write_text('{"text": "w"}\n')
    (tmp_path / "s" / "code").mkdir()
    (tmp_path / "s" / "code" / "train.jsonl").write_text('{"text": "training text"}\n')
    for run in (lambda: list(documents(tmp_path / "s")), lambda: check_domains(find_domains(tmp_path / "s"))):
        with pytest.raises(ValueError, match=r"domain folder .*s/code has no 'valid' file \(files there: "
                                             r"train.jsonl\); --domains leaves it out"):
            run()
    assert list(documents(tmp_path / "s", domains=["web"])) == [("web", "w")]


def test_eval_and_analyze_read_the_files_data_prepare_reads(tmp_path: Path) -> None:
    """`data prepare` reads .md / .rst / .py / .tex files and a domain's subfolders; eval and analyze
    read .txt and .jsonl files at a domain's top alone: a domain of .md files was no domain, and one of
    .txt and .md files was scored on its .txt files. A routing report written into the corpus (its
    summary.md) is none of the three's text. A text file's CRLF line ends are its text for all three
    (eval and analyze read it with newline translation: other bytes than prepare counted)."""
    from mixlab.corpus import read_documents
    from mixlab.eval.data import documents

    files = {"docs/a.md": "# Title", "docs/guide/b.rst": "Guide", "mixed/c.txt": "plain", "mixed/d.py": "x = 1",
             "mixed/e.tex": "\\section{S}", "mixed/f.jsonl": '{"text": "line"}\n', "report/summary.md": "| a |",
             "report/report.json": "{}", "mixed/g.txt": "a\r\nb"}
    for name, text in files.items():
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_text(text)
    prepared = sorted((d.domain, d.text) for d in read_documents([tmp_path / "c"]))
    assert prepared == [("docs", "# Title"), ("docs", "Guide"), ("mixed", "\\section{S}"), ("mixed", "a\r\nb"),
                        ("mixed", "line"), ("mixed", "plain"), ("mixed", "x = 1")]
    assert sorted(documents(tmp_path / "c")) == prepared
    assert sorted(documents(tmp_path / "c" / "mixed")) == prepared[2:]


def test_eval_analyze_and_prepare_find_one_set_of_domains_and_splits(tmp_path: Path) -> None:
    """One rule (corpus.discover, corpus.split_of) for the three. eval and analyze took a domain
    folder's subfolders for the domains and dropped its own files (prepare: a domain named after the
    folder); they read a domain's validation text by a name prefix (valid*), so test.jsonl and
    dev.jsonl, which prepare holds out, were 'no valid file' and valid_2.jsonl was read where prepare
    trained on it; prepare trained on validation-00000-of-00001.jsonl and, in the corpus layout,
    dropped a domain of .txt files beside train.jsonl domains."""
    from mixlab.analysis import check_domains, find_domains
    from mixlab.corpus import iter_documents, read_documents
    from mixlab.eval.data import documents

    files = {"c/github/train.jsonl": "gt", "c/github/valid.jsonl": "gv", "c/github/extra/valid.jsonl": "xv",
             "c/github/extra/train.jsonl": "xt", "c/math/train-00000-of-00001.jsonl": "mt",
             "c/math/validation-00000-of-00001.jsonl": "mv", "c/arxiv/train.jsonl": "at", "c/arxiv/test.jsonl": "av",
             "c/web/train.jsonl": "wt", "c/web/dev.jsonl": "wv", "c/code/a.txt": "ca", "c/code/test_a.txt": "ct",
             "c/SOURCES.md": "not text", "c/chat/sft.jsonl": "chat"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"text": text}) + "\n" if name.endswith(".jsonl") else text)
    for data in (tmp_path / "c", tmp_path / "c" / "github"):
        prepared = [d for d in read_documents([data])]
        found = find_domains(data)
        check_domains(found)
        assert sorted(found) == sorted({d.domain for d in prepared})  # the same domains, the same files
        for domain, domain_files in found.items():
            assert sorted(t for _, t in iter_documents(domain_files, split="")) == \
                sorted(d.text for d in prepared if d.domain == domain)
        held_out = {d.domain for d in prepared if d.split == "valid"}  # --split valid: what prepare holds out
        assert sorted(documents(data)) == sorted((d.domain, d.text) for d in prepared
                                                 if d.split == "valid" or d.domain not in held_out)
    assert sorted(documents(tmp_path / "c")) == [("arxiv", "av"), ("code", "ca"), ("code", "ct"),
                                                 ("github", "gv"), ("github", "xv"), ("math", "mv"), ("web", "wv")]
    assert sorted(documents(tmp_path / "c" / "github")) == [("extra", "xv"), ("github", "gv")]
    assert list(documents(tmp_path / "c", split="test", domains=["arxiv"])) == [("arxiv", "av")]  # test.jsonl alone


def test_a_file_given_alone_has_one_set_of_domains_for_prepare_eval_and_analyze(tmp_path: Path) -> None:
    """`data prepare x.jsonl` named its domain `default` (and ignored its rows' `domain` fields) where
    `eval --data x.jsonl` and `analyze --data x.jsonl` named it `x` and split it by those fields: the
    model's per-domain validation and its evaluation named different domains. One rule
    (`corpus.row_domain`); a `domain` field that cannot name a dataset's file is refused, by all three."""
    from mixlab.corpus import find_domains, read_documents
    from mixlab.eval.data import documents

    data = tmp_path / "mixed.jsonl"
    rows = [{"text": "def f(x): return x", "domain": "code"}, {"text": "The cat sat."},
            {"text": "A dog.", "domain": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = sorted((d.domain, d.text) for d in read_documents([data]))
    assert prepared == [("code", "def f(x): return x"), ("mixed", "A dog."), ("mixed", "The cat sat.")]
    assert sorted(documents(data)) == prepared and sorted(find_domains(data)) == ["code", "mixed"]
    assert [d.text for d in read_documents([data], domains=["code"])] == ["def f(x): return x"]
    with pytest.raises(ValueError, match=r"--domains: 'web' not found in .*mixed.jsonl; domains there: code, mixed$"):
        list(read_documents([data], domains=["web"]))
    (tmp_path / "notes.txt").write_text("plain")
    assert [d.domain for d in read_documents([tmp_path / "notes.txt"])] == list(find_domains(tmp_path / "notes.txt"))
    data.write_text(json.dumps({"text": "t", "domain": "../up"}) + "\n")
    for read in (lambda: list(read_documents([data])), lambda: find_domains(data)):
        with pytest.raises(ValueError, match=r"mixed.jsonl:1: field 'domain' '../up' cannot name a domain"):
            read()


def test_a_byte_that_is_not_utf8_is_named_alike_by_prepare_eval_and_analyze(tmp_path: Path) -> None:
    """Three readers of one file kind said three things: prepare 'not valid UTF-8 (byte N: ...)' with N
    counted from the file's start, a file given alone '(invalid continuation byte at byte N)' with N
    counted from a decoding chunk's start, a folder's file the reason alone. One reader
    (`corpus.file_documents`) names the line and the byte's place in it."""
    from mixlab.corpus import find_domains, iter_documents, read_documents

    (tmp_path / "c" / "web").mkdir(parents=True)
    data = tmp_path / "c" / "web" / "valid.jsonl"
    data.write_bytes(b'{"text": "fine"}\n' * 1000 + b'{"text": "caf\xe9"}\n')
    message = r"web/valid.jsonl:1001: not UTF-8 text \(b'\\xe9' at byte 13 of the line\); convert it to UTF-8"
    for read in (lambda: list(read_documents([data])), lambda: find_domains(data),
                 lambda: list(iter_documents(find_domains(tmp_path / "c")["web"]))):
        with pytest.raises(ValueError, match=message):
            read()


def test_eval_domains_picks_domains_as_analyze_does(ckpt: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """analyze took --domains; eval had no way to score some of a corpus's domains."""
    from mixlab.eval.data import documents

    assert {d for d, _ in documents(CORPUS, max_docs=1, domains=["github", "arxiv"])} == {"github", "arxiv"}
    with pytest.raises(ValueError, match="--domains: 'nope' not found"):
        list(documents(CORPUS, domains=["nope"]))
    (tmp_path / "d.jsonl").write_text('{"text": "a", "domain": "x"}\n{"text": "b", "domain": "y"}\n')
    assert list(documents(tmp_path / "d.jsonl", domains=["y"])) == [("y", "b")]
    (tmp_path / "e.jsonl").write_text('{"text": "a", "domain": ""}\n{"text": "b", "domain": 5}\n')
    assert list(documents(tmp_path / "e.jsonl")) == [("e", "a"), ("e", "b")]  # "" was a domain with no name
    with pytest.raises(ValueError, match=r"--domains: 'z' not found in .*d.jsonl; domains there: x, y$"):
        list(documents(tmp_path / "d.jsonl", domains=["y", "z"]))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--data", str(CORPUS), "--domains", "github", "--max-docs", "1",
                 "--context", "32", "--json", str(out), "--quiet"]) == 0
    assert list(json.loads(out.read_text())["domains"]) == ["github"]


def test_eval_reads_a_split_name_in_any_case(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--split Valid was 'not a split name' (file names are read in any case: Valid.jsonl is valid)."""
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--data", str(CORPUS), "--domains", "github", "--split", "Valid",
                 "--max-docs", "1", "--context", "32", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["settings"]["split"] == "valid"
    assert main(["eval", "--model", str(ckpt), "--data", str(CORPUS), "--split", "vaild", "--quiet"]) == 2
    assert "--split 'vaild' is not a split name (did you mean 'valid'?)" in capsys.readouterr().err


def test_eval_refuses_a_split_that_a_file_given_alone_is_not_of(ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--data FILE --split X read the file whole, whatever X, without a word (and recorded split 'valid')."""
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "some notes"}\n')
    for split, what in (("test", "notes.jsonl is named by no split"), ("train", "valid.jsonl is a valid file")):
        path = data if split == "test" else CORPUS / "github" / "valid.jsonl"
        assert main(["eval", "--model", str(ckpt), "--data", str(path), "--split", split, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--split {split!r} with --data {path}: a file given alone is read whole ({what}); --split" in err
    out = tmp_path / "r.json"
    for args, split in (([], ""), (["--split", "valid"], "valid")):  # --split valid of a valid file: as given
        assert main(["eval", "--model", str(ckpt), "--data", str(CORPUS / "github" / "valid.jsonl"), *args,
                     "--max-docs", "1", "--context", "32", "--json", str(out), "--quiet"]) == 0
        assert json.loads(out.read_text())["settings"]["split"] == split


def test_cli_eval_scores_a_batch_that_fits_in_memory(ckpt: Path, short_corpus: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size beyond what the free memory holds (the windows of one long document are batched
    together: 100000 on a book asked for terabytes of logits) scores fewer at a time, says so, and
    gives the same numbers."""
    import mixlab.engine.runner as runner

    argv = ["eval", "--model", str(ckpt), "--data", str(short_corpus), "--max-docs", "1", "--context", "32",
            "--dtype", "fp32", "--quiet", "--json"]
    assert main([*argv, str(tmp_path / "a.json"), "--batch-size", "2"]) == 0
    capsys.readouterr()
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(runner, "available_memory", lambda: 3 * 2 * 4 * 32 * vocab)  # three windows' logits
    assert main([*argv, str(tmp_path / "b.json"), "--batch-size", "100000"]) == 0
    err = capsys.readouterr().err
    assert "--batch-size 100000: a batch's logits take" in err and "scoring at most 3 at a time" in err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["overall"]["tokens"] == b["overall"]["tokens"]
    assert b["overall"]["nll"] == pytest.approx(a["overall"]["nll"], rel=1e-6)
    # strided windows score 8 tokens each, but the document's first all 32 of its own
    monkeypatch.setattr(runner, "available_memory", lambda: 2 * 4 * vocab * (32 + 2 * 8))
    assert main([*argv, str(tmp_path / "c.json"), "--batch-size", "100000", "--stride", "8"]) == 0
    assert "scoring at most 3 at a time" in capsys.readouterr().err


def test_cli_eval_json_is_strict_json(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A word perplexity past float's range (one long word) was written as `Infinity`, which is not
    JSON (JavaScript's JSON.parse refuses it): null now; the table still shows inf."""
    data, out = tmp_path / "one_word.txt", tmp_path / "r.json"
    data.write_text("x" * 400)
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == "inf"

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    res = json.loads(out.read_text(), parse_constant=refuse)
    assert res["overall"]["word_perplexity"] is None and math.isfinite(res["overall"]["token_perplexity"])


@pytest.mark.parametrize("argv,message,code", [
    (["--stride", "0"], "--stride", 2),  # a flag's value: a usage error, exit 2
    (["--context", "0"], "--context must be >= 1, got 0", 2),  # not "--stride must be between 1 and --context"
    (["--max-docs", "-1"], "--max-docs must be >= 1, got -1", 2),  # not "no documents to evaluate"
    (["--batch-size", "0"], "--batch-size", 2),
    (["--data", "/nonexistent/x.jsonl"], "no such file", 1),
    (["--data", "{prepared}"], "this is a dataset `mixlab data prepare` wrote (token shards): pass the text corpus", 1),
    (["--json", "."], "is a folder; give a file name\n", 1),  # before evaluating; no 'for example x/model.gguf'
    # a folder not yet made: it wrote the results to a file named "new" (Path() drops the slash)
    (["--json", "{tmp}/new/"], "/new/: names a folder (it ends in /); give a file name\n", 1),
    # --context clamped to the model's 64: it was 'stride must be between 1 and the context (64); got 100'
    (["--stride", "100", "--max-docs", "1"], "--stride 100 is past the model's 64 positions, the windows' length: "
                                             "give --stride 64 or less\n", 2),
])
def test_cli_eval_errors(ckpt: Path, argv: list[str], message: str, code: int, capsys: pytest.CaptureFixture[str],
                         tmp_path: Path) -> None:
    base = ["eval", "--model", str(ckpt), "--data", str(CORPUS), "--quiet"]
    (tmp_path / "meta.json").write_text("{}")  # what `mixlab data prepare` writes beside its shards
    assert main(base + [a.replace("{prepared}", str(tmp_path)).replace("{tmp}", str(tmp_path)) for a in argv]) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_eval_progress_bar_has_a_total(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           quiet: bool) -> None:
    """The bar had no total, so no ETA: its total is the tokens it counts, known before scoring starts
    (each document encoded once); --quiet still turns it off."""
    import tqdm

    bars: list[dict] = []

    class Bar(tqdm.tqdm):  # type: ignore[type-arg]
        def __init__(self, *a: object, **kw: object) -> None:
            bars.append(kw | {"counted": 0})
            super().__init__(*a, **kw)  # type: ignore[arg-type]

        def update(self, n: float | None = 1) -> bool | None:
            bars[-1]["counted"] += n
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    for i, text in enumerate(TEXTS):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(text * 3)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--data", str(tmp_path / "docs"), "--context", "16",
                 "--json", str(out), *(["--quiet"] if quiet else [])]) == 0
    tokens = json.loads(out.read_text())["overall"]["tokens"]
    assert len(bars) == 1 and bars[0]["total"] == bars[0]["counted"] == tokens > 16
    assert bars[0]["disable"] is (True if quiet else None)  # None: off where stderr is no terminal


def test_cli_eval_json_dash_is_stdout(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`mixlab eval ... --json - | jq` wrote a file named '-' and the table on stdout."""
    data, out = tmp_path / "doc.txt", tmp_path / "r.json"
    data.write_text("The cat sat on the mat. " * 20)
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "-", "--quiet"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out) == json.loads(out.read_text())
    assert got.err.endswith(table)
    assert not (tmp_path / "-").exists()
    # --json with no file, as info and plan take it (a switch there): stdout too, not an argparse error
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())


def test_cli_eval_json_never_writes_over_its_data_or_model(ckpt: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # --data x.jsonl --json x.jsonl replaced the documents with the results
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": TEXTS[1]}) + "\n")
    before = data.read_bytes()
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", str(data), "--quiet"]) == 1
    assert "refusing to write there: it is the source" in capsys.readouterr().err
    assert data.read_bytes() == before
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--json", str(ckpt / "config.json"),
                 "--quiet"]) == 1
    assert "may not be mixlab's; it lies inside the source" in capsys.readouterr().err


def test_cli_eval_json_under_a_file_is_refused_before_the_work(ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--json notes.txt/r.json evaluated everything, then said 'notes.txt: File exists'."""
    import mixlab.cli.eval

    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr(mixlab.cli.eval, "_load", lambda args: pytest.fail("the model was loaded"))
    out = tmp_path / "notes.txt" / "sub" / "r.json"
    assert main(["eval", "--model", str(ckpt), "--data", str(CORPUS), "--json", str(out), "--quiet"]) == 1
    assert f"{out}: {tmp_path / 'notes.txt'} is a file, not a folder; choose another destination" in \
        capsys.readouterr().err


def test_cli_eval_says_when_it_clamps_the_context(ckpt: Path, short_corpus: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A --context past the model's positions is scored at the model's length, and said so."""
    assert main(["eval", "--model", str(ckpt), "--data", str(short_corpus), "--max-docs", "1", "--context", "100",
                 "--quiet", "--json"]) == 0  # --dtype auto: the one that ran is recorded
    assert json.loads(capsys.readouterr().out)["settings"]["dtype"] in ("bfloat16", "float32")
    assert main(["eval", "--model", str(ckpt), "--data", str(short_corpus), "--max-docs", "1", "--context", "100",
                 "--dtype", "float32", "--quiet"]) == 0
    # the note began "note: ", without the "mixlab eval: " its warnings and errors have
    assert ("mixlab eval: note: --context 100 is past the model's 64 positions; scoring windows of 64"
            in capsys.readouterr().err)
    # the default 2048 is the model's 64 without a note: every small model printed "--context 2048 is past"
    assert main(["eval", "--model", str(ckpt), "--data", str(short_corpus), "--max-docs", "1", "--dtype", "float32",
                 "--quiet", "--json"]) == 0
    got = capsys.readouterr()
    assert "note" not in got.err and json.loads(got.out)["settings"]["context"] == 64


def test_cli_eval_json_says_what_ran_for_int4_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A GGUF file's Q4_0 matrices run as int4 without --quant: its JSON said "quant": "none", as a float
    file's; and int4 products round activations to int8 or not (`--int4-activations`), which moves the
    numbers while the JSON stayed the same."""
    pytest.importorskip("gguf")
    path = hf_mixtral(tmp_path / "mx", vocab_size=32000, hidden_size=32, intermediate_size=64,
                      max_position_embeddings=64)
    q4 = tmp_path / "m-q4_0.gguf"
    assert main(["convert", str(path), str(q4), "--quant", "q4_0", "--tokenizer", "mixtral", "--quiet"]) == 0
    data = tmp_path / "doc.txt"
    data.write_text(TEXTS[1])

    def run(*argv: str) -> dict:
        capsys.readouterr()
        assert main(["eval", "--data", str(data), "--dtype", "float32", "--quiet", "--json", "-", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    runs = [run("--model", str(q4)), run("--model", str(q4), "--int4-activations", "float32"),
            run("--model", str(path)), run("--model", str(path), "--quant", "int4")]
    assert [(r["settings"]["quant"], r["settings"]["int4_activations"]) for r in runs] == \
        [("int4", "int8"), ("int4", "float32"), ("none", None), ("int4", "int8")]
    assert runs[0]["overall"]["nll"] != runs[1]["overall"]["nll"]  # what the field tells apart


def test_cli_eval_table_columns_never_run_together() -> None:
    from mixlab.cli.eval import _num

    assert _num(32432.825, 12, 3) == "   32432.825"
    assert _num(5.0401427562e16, 12, 3) == "  5.0401e+16"  # fixed point would need 21 columns
    assert _num(math.inf, 12, 3) == "         inf"


# -- lm-evaluation-harness ------------------------------------------------------------------------

TASKS = {
    "mx_mc": """
task: mx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "mx_ppl": """
task: mx_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "mx_gen": """
task: mx_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("What is two plus two?", ["four", "five", "twenty two"], 0),
        ("Which colour is the sky?", [" blue", " green"], 1),
        ("Capital of France", ["Paris", "Rome", "Berlin", "Madrid"], 2),
    ]]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    (d / "ppl.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    gen = [{"question": "Count: one, two,", "answer": " three"}, {"question": "Hello", "answer": " world"}]
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    for name, text in TASKS.items():
        (d / f"{name}.yaml").write_text(text.format(data=d))
    return d


def _run(lm: object, tasks: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: only these tasks are indexed, not lm-eval's thousands of YAML files (~15 s each time)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=sorted(TASKS), task_manager=manager, log_samples=True,
                                   verbosity="ERROR")


@pytest.mark.slow
def test_harness_model_equals_lm_eval_hf(ckpt: Path, tasks: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from mixlab.eval.harness import MixlabLM

    ours = _run(MixlabLM(pretrained=str(ckpt), dtype="float32", batch_size=2), tasks)
    theirs = _run(HFLM(pretrained=str(ckpt), dtype="float32", batch_size=2, device="cpu"), tasks)
    for task in TASKS:
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            ra, rb = a["resps"], b["resps"]
            if task == "mx_gen":
                assert ra == rb
            else:
                for x, y in zip(ra, rb, strict=True):
                    lx = x[0][0] if isinstance(x[0], (tuple, list)) else x[0]
                    ly = y[0][0] if isinstance(y[0], (tuple, list)) else y[0]
                    assert lx == pytest.approx(ly, abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)
    # `mixlab eval` on the same texts gives lm-eval's bits per byte
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    r = evaluate_texts(model, lambda s: tok.encode(s, bos=False), [("t", t) for t in TEXTS], prefix=tok.bos_id,
                       context=model.config.max_seq_len)
    assert r.overall().metrics()["bits_per_byte"] == pytest.approx(
        theirs["results"]["mx_ppl"]["bits_per_byte,none"], rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_harness_model_takes_lm_eval_cli_default_device(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lm_eval's command line passes device="cuda:0" unless --device is given: on a machine without
    CUDA the model runs on the CPU, as lm-eval's `hf` model does (it raised before)."""
    pytest.importorskip("lm_eval")
    from mixlab.eval.harness import MixlabLM

    lm = MixlabLM(pretrained=str(ckpt), dtype="float32", device="cuda:0", batch_size=1)
    assert next(lm.model.parameters()).device.type == "cpu"
    assert "device 'cuda:0' is not available" in capsys.readouterr().err
    assert next(MixlabLM(pretrained=str(ckpt), device=None).model.parameters()).device.type == "cpu"
    # dtype=auto, as for lm-eval's hf model: the checkpoint's own dtype (it was refused)
    stored = next(load_model(ckpt).parameters()).dtype
    assert next(MixlabLM(pretrained=str(ckpt), dtype="auto").model.parameters()).dtype == stored


def test_harness_takes_lm_eval_s_batch_size_with_model_args_one(ckpt: Path, tasks: Path) -> None:
    """lm-eval's --batch_size (or --device) beside --model_args' own was a TypeError in the model's
    construction ('got multiple values for keyword argument'): lm-eval's flags fill what --model_args
    did not say, through simple_evaluate's model name and both its model_args forms."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mixlab.eval.harness import MixlabLM

    made: list[MixlabLM] = []
    init = MixlabLM.__init__

    def record(self: MixlabLM, *a: object, **kw: object) -> None:
        init(self, *a, **kw)  # type: ignore[arg-type]
        made.append(self)

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MixlabLM, "__init__", record)
        for model_args in (f"pretrained={ckpt},dtype=float32,batch_size=2,device=cpu",
                           {"pretrained": str(ckpt), "dtype": "float32", "batch_size": 2, "device": "cpu"}):
            res = lm_eval.simple_evaluate(model="mixlab", model_args=model_args, batch_size=4, device="cuda:0",
                                          tasks=["mx_ppl"], task_manager=manager, verbosity="ERROR")
            assert math.isfinite(res["results"]["mx_ppl"]["bits_per_byte,none"])
    assert [(lm.batch_size, next(lm.model.parameters()).device.type) for lm in made] == [(2, "cpu")] * 2
    lm = MixlabLM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": 4, "max_batch_size": None})
    assert lm.batch_size == 4  # --batch_size alone: as before


def test_harness_model_without_tokenizer_files_takes_mixtral_s(tmp_path: Path) -> None:
    """A folder transformers wrote without tokenizer files: Mixtral's v1 tokenizer, as `mixlab
    generate` and `mixlab eval` use (the harness raised FileNotFoundError)."""
    pytest.importorskip("lm_eval")
    from mixlab.eval.harness import MixlabLM
    from mixlab.tokenizer import default_tokenizer_path

    path = hf_mixtral(tmp_path, vocab_size=32000, hidden_size=32, intermediate_size=48, max_position_embeddings=64)
    lm = MixlabLM(pretrained=str(path), device="cpu", batch_size="auto:4")  # lm_eval --batch_size auto:4
    assert lm.tok.path == default_tokenizer_path()
    assert lm.batch_size == 8
    for bad in (0, "-1"):  # -1 scored nothing: loglikelihood returned []
        with pytest.raises(ValueError, match=rf"invalid batch_size={bad!r}: expected an integer >= 1"):
            MixlabLM(pretrained=str(path), device="cpu", batch_size=bad)
    # a negative max_length failed at the first request it could not score, after the others had run
    for name, bad in (("max_length", -5), ("max_length", "-1"), ("max_gen_toks", 0), ("max_gen_toks", -1)):
        with pytest.raises(ValueError, match=rf"invalid {name}={bad!r}: expected an integer >= 1"):
            MixlabLM(pretrained=str(path), device="cpu", **{name: bad})
    small = hf_mixtral(tmp_path / "small", vocab_size=259, hidden_size=32, intermediate_size=48)
    with pytest.raises(ValueError, match="has 32000 tokens but the model's vocabulary has 259; pass the model's own "
                                         r"\(tokenizer=bytes, mixtral or a tokenizer file\)"):
        MixlabLM(pretrained=str(small))  # no tokenizer files: Mixtral's (an IndexError when scoring)
    # lm_eval --model_args pretrained=DIR,tokenizer=bytes: a string, as its `hf` model takes it (an AttributeError)
    lm = MixlabLM(pretrained=str(small), tokenizer="bytes", dtype="float32")
    assert str(lm.tok.path) == "bytes" and lm.tok_encode("ab") == [ord("a") + 3, ord("b") + 3]
    assert MixlabLM(pretrained=str(path), tokenizer=str(default_tokenizer_path())).tok.vocab_size == 32000


def test_harness_generation_kwargs_read_as_lm_eval(ckpt: Path) -> None:
    """lm-eval's `normalize_gen_kwargs` (its `hf` model): do_sample=False is greedy even with a
    temperature (it sampled), and `max_new_tokens` is a name of the token limit (it was ignored: 256
    tokens, past this model's 64 positions)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from mixlab.eval.harness import MixlabLM

    lm = MixlabLM(pretrained=str(ckpt), dtype="float32", batch_size=2)

    def gen(**kw: object) -> list[str]:
        reqs = [Instance("generate_until", {}, (q, dict(kw)), i) for i, q in enumerate(["Count: one, two,", "Hi"])]
        return lm.generate_until(reqs, disable_tqdm=True)

    greedy = gen(until=[], max_gen_toks=4, do_sample=False)
    assert gen(until=[], max_gen_toks=4, do_sample=False, temperature=0.9) == greedy
    assert gen(until=[], max_new_tokens=4) == greedy
    assert gen(until=[], max_tokens=4, temperature=0.0) == greedy


@pytest.mark.parametrize("max_gen", [16, 20])
def test_harness_refuses_generating_past_max_length(ckpt: Path, max_gen: int) -> None:
    """max_gen_toks >= max_length: lm-eval's `hf` model refuses it; this one kept the whole context
    (ctx[-0:]) or dropped its first tokens (ctx[4:]) and generated past max_length."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from mixlab.eval.harness import MixlabLM

    lm = MixlabLM(pretrained=str(ckpt), dtype="float32", max_length=16)
    req = Instance("generate_until", {}, ("one two three", {"until": ["\n"], "max_gen_toks": max_gen}), 0)
    with pytest.raises(ValueError, match=f"max_gen_toks={max_gen} leaves no room for a context in max_length=16"):
        lm.generate_until([req], disable_tqdm=True)


@pytest.mark.slow
def test_harness_chat_template_gives_the_model_encode_chat_s_prompt(ckpt: Path, tasks: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's --apply_chat_template failed on MixlabLM ('please implement the tokenizer_name
    property', then apply_chat_template, chat_template): the model now receives the Mixtral-Instruct
    prompt `Tokenizer.encode_chat` gives (system prompt included), a continuation scored as the
    reply, and generation starts from the same prompt."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import mixlab.eval.harness as harness

    lm = harness.MixlabLM(pretrained=str(ckpt), dtype="float32", batch_size=2)
    tok, scored, prompts = lm.tok, [], []
    score_batch, generate = harness.score_batch, harness.generate
    monkeypatch.setattr(harness, "score_batch",
                        lambda m, x, y: scored.extend(zip(x, y, strict=True)) or score_batch(m, x, y))
    monkeypatch.setattr(harness, "generate", lambda m, p, **kw: prompts.extend(p) or generate(m, p, **kw))
    res = lm_eval.simple_evaluate(model=lm, tasks=["mx_gen", "mx_mc"], apply_chat_template=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  system_instruction="Be brief.",
                                  log_samples=True, verbosity="ERROR")

    def chat(user: str) -> list[int]:
        return tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}])

    mc = [json.loads(line) for line in (tasks / "mc.jsonl").read_text().splitlines()]
    want = [(chat(f"Question: {d['question']}\nAnswer:"), tok.encode(c.removeprefix(" "), bos=False))
            for d in mc for c in d["choices"]]
    assert sorted(scored) == sorted(((p + c)[:-1], c) for p, c in want)
    with torch.no_grad():  # lm-eval's numbers are those of these ids
        lps = [float(torch.log_softmax(lm.model(torch.tensor([p + c])).float(), -1)[0, len(p) - 1:-1]
                     .gather(-1, torch.tensor(c)[:, None]).sum()) for p, c in want]
    got = [x[0][0] for s in res["samples"]["mx_mc"] for x in s["resps"]]
    assert got == pytest.approx(lps, abs=1e-4)
    gen = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
    assert sorted(prompts) == sorted(chat(d["question"]) for d in gen)
    assert lm.chat_template(True) == harness.CHAT_TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name.endswith("tokenizer.json")
    # a task's gen_prefix (add_generation_prompt=False): the reply continues the last assistant message
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": " spaced "}, {"role": "assistant", "content": "Answer:"}]
    text = lm.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == "<s>[INST] 2+2? [/INST] 4</s>[INST]  spaced  [/INST] Answer:"
    assert lm.tok_encode(text) == tok.encode_chat([*msgs[:3], {**msgs[3], "prefix": True}])
    assert lm.tok_encode(text + " B") == tok.encode_chat([*msgs[:3], {**msgs[3], "content": "Answer: B",
                                                                      "prefix": True}])
    with pytest.raises(ValueError, match="holds the chat template's markers"):
        lm.apply_chat_template([{"role": "user", "content": "a</s> b"}])
    assert lm.tok_encode("<s>[INST] plain text") == tok.encode("<s>[INST] plain text", bos=False)


def test_harness_refuses_to_apply_a_v3_chat_template(tmp_path: Path) -> None:
    """lm-eval passes chat prompts as text, which cannot carry the v3 template's [INST] control token: a v3
    tokenizer (Mixtral 8x22B Instruct's) is refused by name (it said a message held the template's markers)."""
    pytest.importorskip("lm_eval")
    from mixlab.eval.harness import MixlabLM
    from mixlab.tokenizer import default_tokenizer_path

    v3 = next(default_tokenizer_path().parent.glob("mistral_instruct_tokenizer_*.model.v3"))
    path = hf_mixtral(tmp_path, vocab_size=32768, hidden_size=32, intermediate_size=48, max_position_embeddings=64)
    lm = MixlabLM(pretrained=str(path), tokenizer=str(v3), dtype="float32")
    with pytest.raises(ValueError, match=r"model\.v3 takes Mistral's v3 chat template, whose \[INST\] is a control"):
        lm.apply_chat_template([{"role": "user", "content": "2+2?"}])


def test_harness_keeps_lm_eval_s_own_models() -> None:
    """lm-eval fills its model registry only while it is empty: once `mixlab` was registered, "hf"
    and every other built-in model were unknown (`python -m mixlab.eval.harness run --model hf`
    failed: "Supported model names: mixlab"). A fresh process, as the registry is global."""
    pytest.importorskip("lm_eval")
    code = ("import mixlab.eval.harness; from lm_eval.api.registry import get_model; "
            "print(get_model('hf').__name__, get_model('mixlab').__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["HFLM", "MixlabLM"], run.stderr[-500:]


def test_harness_command_line_names_a_bad_checkpoint_in_one_line(tmp_path: Path, tasks: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """`python -m mixlab.eval.harness run --model mixlab --model_args pretrained=MISSING` (or a model whose
    vocabulary the tokenizer overruns) ended in a traceback through lm_eval's model construction.
    Its `main` with that argv, in this process, lm-eval's own tasks not indexed (a fresh interpreter
    importing lm_eval and reading its thousands of task YAML files cost ~10 s a case): an exception other
    than the exit's line fails the test here as a traceback would."""
    import functools
    import random

    import numpy as np

    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    import lm_eval.utils

    from mixlab.eval import harness

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", True)  # no handler left on pytest's captured stderr
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    small = hf_mixtral(tmp_path / "small", vocab_size=259, hidden_size=32, intermediate_size=48)
    rng = random.getstate(), np.random.get_state()  # lm_eval seeds the global generators: the next tests' stay
    # a bad dtype or tokenizer in --model_args, and an unknown task name, were tracebacks too (a ValueError,
    # a FileNotFoundError, lm-eval's "Tasks not found")
    for args, task, said in (
            (f"pretrained={tmp_path / 'nope'}", "mx_ppl", f"{tmp_path / 'nope'}: no such checkpoint folder"),
            (f"pretrained={small}", "mx_ppl", "has 32000 tokens but the model's vocabulary has 259"),
            (f"pretrained={small},dtype=bogus", "mx_ppl", "--model_args dtype=bogus: unknown dtype 'bogus'; expected "
             "one of float32, fp32, float16, fp16, bfloat16, bf16, or auto (as the checkpoint stores it)"),
            (f"pretrained={small},tokenizer={tmp_path / 'no.model'}", "mx_ppl",
             f"--model_args tokenizer={tmp_path / 'no.model'}: {tmp_path / 'no.model'}: no such tokenizer file"),
            (f"pretrained={small}", "mx_nope", "--tasks: no such task: mx_nope (`lm_eval ls tasks` lists")):
        monkeypatch.setattr(sys, "argv", ["-m", "run", "--model", "mixlab", "--model_args", args,
                                          "--tasks", task, "--include_path", str(tasks)])
        with torch.random.fork_rng(), pytest.raises(SystemExit) as exit_:
            harness.main()
        err = capfd.readouterr().err
        assert "Traceback" not in err, err[-2000:]
        last = exit_.value.code  # sys.exit(str): the interpreter prints it as stderr's last line and exits 1
        assert isinstance(last, str) and "\n" not in last, last
        assert last.startswith("python -m mixlab.eval.harness: error: ") and said in last, last
    random.setstate(rng[0])
    np.random.set_state(rng[1])


def test_harness_refuses_a_continuation_longer_than_max_length(ckpt: Path) -> None:
    # it failed in torch's gather: "Size does not match at dimension 0 expected index [101, 1] ..."
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from mixlab.eval.harness import MixlabLM

    lm = MixlabLM(pretrained=str(ckpt), dtype="float32", batch_size=2)
    with pytest.raises(ValueError, match=r"continuation of \d+ tokens is longer than max_length=64"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("The", " word" * 80), 0)], disable_tqdm=True)
    (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The", " word" * 30), 0)], disable_tqdm=True)
    assert math.isfinite(lp)


def test_score_batch_names_targets_it_cannot_score() -> None:
    # A target longer than its input or outside the vocabulary failed in torch's gather ("Size does not
    # match at dimension 0", "index 999 is out of bounds"); no inputs: "max() arg is an empty sequence".
    from mixlab.config import get_preset
    from mixlab.eval import score_batch
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-moe")).eval()
    for targets, match in (([[4], [5, 6]], r"targets\[1\] has 2 tokens but inputs\[1\] only 1"),
                           ([[4], [999]], r"targets\[1\] has token id 999 outside the model's vocabulary \[0, 256\)"),
                           ([[4]], "one target list per input; got 2 inputs and 1 targets")):
        with pytest.raises(ValueError, match=match):
            score_batch(model, [[1, 2], [3]], targets)
    assert score_batch(model, [], []) == []
    assert len(score_batch(model, [[1, 2], [3]], [[2], [7]])) == 2


def test_score_batch_takes_the_log_softmax_of_the_target_rows_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every row of the padded batch went through the float32 log-softmax ([B, T, V]), a harness
    # request's context and the padding included, to read a few target rows.
    from mixlab.config import get_preset
    from mixlab.eval import perplexity
    from mixlab.model import Transformer

    model = Transformer(get_preset("tiny-moe"))
    model.init_weights(seed=0)
    inputs, targets = [[1, 5, 9, 200, 3, 4, 7, 8], [1, 2, 3], [1, 6]], [[7, 8, 2], [4], [11, 12]]
    rows, log_probs = [], perplexity.log_probs
    monkeypatch.setattr(perplexity, "log_probs", lambda x: rows.append(x.shape[0]) or log_probs(x))
    got = perplexity.score_batch(model.eval(), inputs, targets)
    assert sum(rows) == sum(map(len, targets))
    with torch.no_grad():  # the same numbers, bit for bit, as the log-softmax of the whole batch
        lp_BTV = log_probs(model(torch.tensor([x + [0] * (8 - len(x)) for x in inputs])))
    for b, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        lp_nV = lp_BTV[b, len(x) - len(y) : len(x)]
        assert got[b] == (float(lp_nV.gather(-1, torch.tensor(y)[:, None]).sum()),
                          bool((lp_nV.argmax(-1) == torch.tensor(y)).all()))


@pytest.mark.parametrize(("kw", "match"), [({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"),
                                           ({"prefix": 32000}, "prefix"), ({"prefix": -1}, "prefix")])
def test_library_scoring_checks_its_arguments(ckpt: Path, kw: dict, match: str) -> None:
    # batch_size=0 silently put all of a document's windows into one batch; prefix=32000 was an
    # IndexError from the embedding.
    model = load_model(ckpt)
    args = {"prefix": 1, "context": 8, **kw}
    with pytest.raises(ValueError, match=match):
        evaluate_texts(model, lambda s: [5, 6, 7], [("a", "x")], **args)
    with pytest.raises(ValueError, match=match):
        score_ids(model, [5, 6, 7], **args)
