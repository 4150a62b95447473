"""Routing analysis: statistics on synthetic routers with known answers, the streaming collector
against direct model calls, the CLI end to end, bad input, and the HTML in a real browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mixlab
from mixlab.analysis import analyze, parse_layers
from mixlab.analysis.collect import collect_routing, load_analysis_tokenizer
from mixlab.analysis.report import build_report, tokens_html
from mixlab.analysis.stats import (
    RoutingCounts,
    consecutive_repeats,
    expert_counts,
    load_balance,
    pair_mask,
    random_baseline,
    total_variation,
)
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.corpus import ByteTokenizer, check_domains, find_domains, iter_documents
from mixlab.model.moe import route
from mixlab.train.data import prepare, read_documents

E, K = 8, 2


def _all_pairs(T: int) -> np.ndarray:
    return np.ones(T - 1, bool)


# ---------------------------------------------------------------------------------------------
# Statistics on synthetic routers


def test_random_baseline_values() -> None:
    b = random_baseline(num_experts=8, top_k=2)
    assert b["first_choice"] == 1 / 8
    assert b["topk_overlap"] == pytest.approx(1 - 6 / 8 * 5 / 7)  # the paper's Table 5 reference
    assert b["topk_overlap"] == pytest.approx(13 / 28)
    assert random_baseline(num_experts=4, top_k=3)["topk_overlap"] == 1.0  # 2k > E: always overlap
    assert random_baseline(num_experts=64, top_k=1)["topk_overlap"] == pytest.approx(1 / 64)  # k=1: same as first
    with pytest.raises(ValueError, match="top_k"):
        random_baseline(num_experts=4, top_k=5)


def test_always_same_expert_repeats_everything() -> None:
    idx = np.tile([3, 5], (100, 1))
    pairs, same, overlap = consecutive_repeats(idx, _all_pairs(100))
    assert (pairs, same, overlap) == (99, 99, 99)


def test_cycling_experts_never_repeats() -> None:
    t = np.arange(200)
    idx = np.stack([(2 * t) % E, (2 * t + 1) % E], axis=1)  # disjoint consecutive pairs of experts
    pairs, same, overlap = consecutive_repeats(idx, _all_pairs(200))
    assert (pairs, same, overlap) == (199, 0, 0)
    # first choice changes but the second choice becomes the next first choice: overlap, not repeat
    idx = np.stack([t % E, (t + 1) % E], axis=1)
    pairs, same, overlap = consecutive_repeats(idx, _all_pairs(200))
    assert (same, overlap) == (0, 199)


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (16, 4), (6, 1)])
def test_uniform_random_router_matches_baseline(num_experts: int, top_k: int) -> None:
    """Random router logits through mixlab's own top-k: repeat rates equal the computed baseline."""
    g = torch.Generator().manual_seed(0)
    T = 60_000
    idx_TK, _ = route(torch.randn(T, num_experts, generator=g), top_k)
    pairs, same, overlap = consecutive_repeats(idx_TK, _all_pairs(T))
    base = random_baseline(num_experts=num_experts, top_k=top_k)
    for got, p in ((same / pairs, base["first_choice"]), (overlap / pairs, base["topk_overlap"])):
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / pairs)  # 5 sigma, seeded


def test_expert_shares_and_first_choice() -> None:
    idx = np.array([[0, 1], [0, 2], [1, 0], [3, 2]])
    selected, first = expert_counts(idx, num_experts=4)
    assert selected.tolist() == [3, 2, 2, 1]
    assert first.tolist() == [2, 1, 0, 1]
    with pytest.raises(ValueError, match="expert ids"):
        expert_counts(np.array([[0, 4]]), num_experts=4)


def test_load_balance_entropy_and_max_over_mean() -> None:
    balanced = load_balance(np.full(8, 10))
    assert balanced["entropy"] == pytest.approx(math.log(8))
    assert balanced["entropy_norm"] == pytest.approx(1.0)
    assert balanced["max_over_mean"] == pytest.approx(1.0)
    collapsed = load_balance(np.array([40, 0, 0, 0, 0, 0, 0, 0]))
    assert collapsed["entropy"] == 0.0
    assert collapsed["max_over_mean"] == pytest.approx(8.0)
    half = load_balance(np.array([1, 1, 0, 0]))
    assert half["entropy_norm"] == pytest.approx(0.5)  # ln 2 / ln 4
    with pytest.raises(ValueError, match=r"counts_E must hold one layer's numbers per expert \[E\], got shape \[2, 8"):
        load_balance(np.full((2, 8), 10))  # was entropy_norm 4.0, max_over_mean 0.125: pooled over the rows


def test_total_variation() -> None:
    assert total_variation(np.array([1, 1, 0, 0]), np.array([2, 2, 0, 0])) == 0.0  # same shares
    assert total_variation(np.array([1, 0]), np.array([0, 3])) == 1.0
    assert total_variation(np.array([3, 1]), np.array([1, 1])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"p_E must hold one layer's numbers per expert"):
        total_variation(np.array([[3, 1], [0, 4]]), np.array([[1, 1], [4, 0]]))  # was 0.71 (rows: 0.25, 1)
    with pytest.raises(ValueError, match="p_E and q_E must cover the same experts, got 2 and 3"):
        total_variation(np.array([3, 1]), np.array([1, 1, 1]))


def test_pairs_never_cross_documents_or_padding() -> None:
    seg = np.array([0, 0, 0, 1, 1, -1, -1, 2])
    assert pair_mask(seg).tolist() == [True, True, False, True, False, False, False]
    # A router constant inside each document but different between documents repeats every time
    # within documents; counting across the boundary would give 3/4.
    idx = np.array([[0, 1]] * 3 + [[2, 3]] * 2)
    pairs, same, overlap = consecutive_repeats(idx, pair_mask(np.array([0, 0, 0, 1, 1])))
    assert (pairs, same, overlap) == (3, 3, 3)


def test_repeats_over_different_tokens_remove_identical_neighbours() -> None:
    """A router that is a function of the token id repeats exactly on identical neighbours."""
    tokens = np.array([5, 5, 5, 7, 9, 9, 4])
    idx = np.stack([tokens % 8, (tokens + 1) % 8], axis=1)  # 5 -> {5, 6}, 7 -> {7, 0}, 9 -> {1, 2}, 4 -> {4, 5}
    acc = RoutingCounts(1, 8, 2)
    seg = np.zeros(7, int)
    acc.update([idx], valid_T=seg >= 0, pairs_ok=pair_mask(seg), tokens_T=tokens)
    s = acc.summary()
    assert (s["pairs"], s["different_token_pairs"]) == (6, 3)
    assert s["identical_token_pair_share"] == 0.5
    assert s["repeat_first_choice"] == [0.5] and s["repeat_first_choice_different_tokens"] == [0.0]
    assert s["repeat_topk_overlap_different_tokens"] == [0.0]
    # Every pair identical was None (as if the token ids were not given), not 1; and pairs counted
    # without token ids lowered the share of identical pairs among those counted with them.
    runs = RoutingCounts(1, 8, 2)
    runs.update([idx[:3]], valid_T=seg[:3] >= 0, pairs_ok=pair_mask(seg[:3]), tokens_T=tokens[:3])
    assert runs.summary()["identical_token_pair_share"] == 1.0
    runs.update([idx], valid_T=seg >= 0, pairs_ok=pair_mask(seg))  # no token ids: not compared
    assert runs.summary()["identical_token_pair_share"] == 1.0
    assert RoutingCounts(1, 8, 2).summary()["identical_token_pair_share"] is None


def test_routing_counts_accumulate_and_merge() -> None:
    acc = RoutingCounts(2, 4, 2)
    seg = torch.tensor([0, 0, 0, -1])
    layer0 = torch.tensor([[0, 1], [0, 1], [2, 3], [3, 2]])  # last row is padding: not counted
    layer1 = torch.tensor([[1, 0], [2, 3], [1, 2], [0, 1]])
    acc.update([layer0, layer1], valid_T=seg >= 0, pairs_ok=pair_mask(seg))
    s = acc.summary()
    assert (s["tokens"], s["pairs"]) == (3, 2)
    assert s["repeat_first_choice"] == [0.5, 0.0]
    assert s["repeat_topk_overlap"] == [0.5, 0.5]  # layer 1: {2, 3} then {1, 2}
    assert s["selection_share"][0] == [2 / 3, 2 / 3, 1 / 3, 1 / 3]
    assert sum(s["assignment_share"][1]) == pytest.approx(1.0)
    both = acc.merged(acc).summary()
    assert both["tokens"] == 6 and both["repeat_first_choice"] == [0.5, 0.0]
    # Mismatched lengths were numpy's IndexError / broadcasting error, a 1-D routing an IndexError.
    for kw, msg in ((dict(valid_T=seg[:3] >= 0), "valid_T has 3 entries for 4 routed tokens"),
                    (dict(tokens_T=torch.arange(5)), "tokens_T has 5 entries for 4 routed tokens"),
                    (dict(pairs_ok=pair_mask(seg)[:2]), r"pairs_ok has 2 entries for 4 routed tokens \(expected 3\)")):
        with pytest.raises(ValueError, match=msg):
            acc.update([layer0, layer1], **{"valid_T": seg >= 0, "pairs_ok": pair_mask(seg), **kw})
    with pytest.raises(ValueError, match="layer 1's routing has 3 tokens, layer 0's 4"):
        acc.update([layer0, layer1[:3]], valid_T=seg >= 0, pairs_ok=pair_mask(seg))
    with pytest.raises(ValueError, match=r"expected expert ids of shape \[T, K\], got \[4\]"):
        consecutive_repeats(layer0[:, 0], pair_mask(seg))
    assert acc.summary() == s  # the refused updates counted nothing


def test_parse_layers() -> None:
    moe = list(range(32))
    assert parse_layers(None, moe) == [0, 15, 31]  # the paper's layers
    assert parse_layers("all", moe) == moe
    assert parse_layers("0,-1", moe) == [0, 31]
    with pytest.raises(ValueError, match="not an MoE layer"):
        parse_layers("32", moe)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("first", moe)


# ---------------------------------------------------------------------------------------------
# Collection over a corpus, CLI end to end


def _tiny_model(dense: bool = False) -> mixlab.Transformer:
    cfg = get_preset("tiny-dense" if dense else "tiny-moe").replace(vocab_size=32000, dim=32, n_heads=2, n_kv_heads=1,
                                                                    head_dim=16, ffn_dim=48)
    if not dense:
        cfg = cfg.replace(moe=mixlab.MoEConfig(num_experts=4, top_k=2))
    model = mixlab.Transformer(cfg)
    model.init_weights(seed=3)
    return model.eval()


def _corpus(root: Path) -> Path:
    (root / "prose").mkdir(parents=True)
    docs = ["A <b>bold</b> & \"quoted\" claim.\nSecond line.", "The quick brown fox jumps over the lazy dog. " * 6,
            "Short one."]
    with (root / "prose" / "valid.jsonl").open("w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "source": f"doc{i}"}) + "\n")
    (root / "prose" / "train.jsonl").write_text(json.dumps({"text": "never read: split is valid"}) + "\n")
    (root / "code").mkdir()
    (root / "code" / "a.txt").write_text("def f(x):\n    return x * 2\n\nprint(f(3))\n")
    (root / "chat").mkdir()  # not a text domain: skipped by default
    (root / "chat" / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    return root


def test_find_domains_names_an_empty_file_and_a_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"one\.txt: no document in it: expected text, or \.jsonl lines"):
        find_domains(tmp_path / "one.txt")
    with pytest.raises(NotADirectoryError, match=r"nope does not exist"):
        find_domains(tmp_path / "nope")
    corpus = _corpus(tmp_path / "c")
    (corpus / "empty").mkdir()  # --domains empty: it was "domain 'empty' not found", the folder right there
    with pytest.raises(ValueError, match=r"domain folder .*c/empty holds no data file \(\.jsonl"):
        find_domains(corpus, names=["prose", "empty"])
    with pytest.raises(ValueError, match=r"--domains: 'nope' not found in .*c; domains there: code, prose$"):
        find_domains(corpus, names=["nope"])


def test_analyze_takes_one_file_as_eval_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mixlab analyze --data FILE.jsonl` was refused ('is a file; --data takes a folder') where `mixlab
    eval --data FILE.jsonl` read it: both read --data through find_domains, a file whole, its rows
    split by their `domain` field (the file's stem for a row without one)."""
    from mixlab.eval.data import documents

    data = tmp_path / "mixed.jsonl"
    rows = [{"text": "def f(x):\n    return x", "domain": "code"}, {"text": "The cat sat.", "domain": "prose"},
            {"text": "no domain field"}, {"text": "return 1", "domain": "code", "source": "lib.py"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = find_domains(data)
    assert list(found) == ["code", "mixed", "prose"]
    assert list(iter_documents(found["code"])) == [("mixed.jsonl:1", rows[0]["text"]), ("lib.py", "return 1")]
    assert sorted(documents(data)) == sorted((r.get("domain", "mixed"), r["text"]) for r in rows)
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--domains", "code,prose", "--seq-len", "16", "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {d: v["documents"] for d, v in report["domains"].items()} == {"code": 2, "prose": 1}
    assert report["settings"]["split"] is None  # read whole
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--split", "valid", "--quiet"]) == 2  # was ignored (a usage error)
    assert "--split 'valid' with --data" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("plain text")  # a text file: one document, its stem the domain
    assert [(d, list(iter_documents(f))) for d, f in find_domains(tmp_path / "notes.txt").items()] == \
        [("notes", [("notes.txt", "plain text")])]


def test_a_file_of_several_domains_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--data FILE` holding k row-level domains was read k + 1 times by eval (once to find the
    domains, once per domain) and more by analyze (its check before the model loads, then again);
    `find_domains` reads it once and keeps each domain's documents."""
    from mixlab.eval.data import documents

    data = tmp_path / "mixed.jsonl"
    rows = [{"text": f"text {i} of {d}", "domain": d} for i in range(3) for d in ("code", "prose", "math")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opened: list[Path] = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == data.name:
            opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    assert sorted(documents(data)) == sorted((r["domain"], r["text"]) for r in rows)
    assert len(opened) == 1
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    opened.clear()
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--seq-len", "16", "--quiet"]) == 0, capsys.readouterr().err
    assert len(opened) == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {d: v["documents"] for d, v in report["domains"].items()} == {"code": 3, "math": 3, "prose": 3}


def test_a_report_written_inside_the_corpus_is_not_a_domain(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    (corpus / "report").mkdir()  # what `mixlab analyze --out corpus/report` leaves
    for name in ("report.json", "index.html", "summary.md", "expert_shares.png"):
        (corpus / "report" / name).write_text("x")
    (corpus / "nothing").mkdir()
    assert list(find_domains(corpus)) == ["code", "prose"]


def test_a_report_into_the_model_or_data_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out MODEL or --out CORPUS wrote the report's files among the weights or the data (the model
    folder then held files mixlab did not write: its manifest no longer covered it)."""
    import mixlab

    mixlab.save_model(_tiny_model(), tmp_path / "model")
    corpus = _corpus(tmp_path / "corpus")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    for out, why in ((tmp_path / "model", "is the input"), (corpus, "is the input"), (tmp_path, "contains the input")):
        assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--out", str(out),
                     "--quiet"]) == 1
        assert f"error: {out}: refusing to write the report there: it {why}" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    assert not (corpus / "index.html").exists() and not (tmp_path / "index.html").exists()
    (tmp_path / "notes.txt").write_text("mine")  # a file above --out: "notes.txt: File exists", after the routing
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--out",
                 str(tmp_path / "notes.txt" / "report"), "--quiet"]) == 1
    assert f"notes.txt/report: {tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    # another model folder, or a prepared dataset (a typo for --out): the report joined its files
    mixlab.save_model(_tiny_model(), tmp_path / "other")
    prepare(read_documents([corpus], domains=["prose"]), tmp_path / "ds")
    for out, kind in ((tmp_path / "other", "checkpoint"), (tmp_path / "ds", "dataset")):
        assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--out", str(out),
                     "--quiet"]) == 1
        assert f"error: {out}: holds a {kind} mixlab wrote; a report goes into a folder" in capsys.readouterr().err
        assert not (out / "index.html").exists()


def test_collect_matches_direct_model_calls(tmp_path: Path) -> None:
    """The streamed, padded, windowed counts equal counts from one unpadded model call per window."""
    model, tok = _tiny_model(), load_analysis_tokenizer()
    corpus = _corpus(tmp_path / "corpus")
    domains = find_domains(corpus)
    assert list(domains) == ["code", "prose"]
    seq_len = 16
    got = collect_routing(model, tok, domains, seq_len=seq_len, batch_size=3, max_tokens=10_000, progress=False)
    for name, folder in domains.items():
        want = RoutingCounts(2, 4, 2)
        for _, text in iter_documents(folder):
            ids = tok.encode(text, bos=True)
            assert ids[0] == tok.bos_id
            for i in range(0, len(ids), seq_len):
                window = torch.tensor([ids[i : i + seq_len]])
                routings = model.forward_output(window).routing
                seg = torch.zeros(window.shape[1], dtype=torch.long)
                want.update([r.idx_TK for r in routings], valid_T=seg >= 0, pairs_ok=pair_mask(seg),
                            tokens_T=window)
        assert got.counts[name].summary() == want.summary()
    assert got.documents == {"code": 1, "prose": 3}
    assert [s.domain for s in got.samples] == ["code", "prose"]
    pieces = got.samples[0].pieces  # the first window, decoded token by token
    assert len(pieces) == seq_len and pieces[0] == "<s>"
    assert (corpus / "code" / "a.txt").read_text().startswith("".join(pieces[1:]))


def test_collect_runs_no_expert_of_the_last_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the routing is wanted: the last layer's experts (1/L of the expert work) were computed
    for nothing. Its routing still covers every position, as the whole pass's does."""
    from mixlab.model.moe import ExpertsBase

    model, tok = _tiny_model(), load_analysis_tokenizer()
    tokens_BT = torch.randint(0, 32000, (3, 11), generator=torch.Generator().manual_seed(0))
    ran, mix = [], ExpertsBase.mix
    monkeypatch.setattr(ExpertsBase, "mix", lambda self, *a, **kw: ran.append(self) or mix(self, *a, **kw))
    layers = [block.ffn.experts for block in model.layers]
    for capacity in (0.5, None):  # with a capacity the last layer's experts run: drops need the whole batch
        last = model.layers[-1].ffn
        last.moe = last.gate.moe = mixlab.MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity)
        ran.clear()
        full = model.forward_output(tokens_BT).routing
        assert ran == layers
        ran.clear()
        out = model.forward_output(tokens_BT, routing_only=True)
        assert ran == (layers if capacity else layers[:-1]) and out.logits_BTV is None
        for a, b in zip(out.routing, full, strict=True):
            assert torch.equal(a.idx_TK, b.idx_TK) and torch.equal(a.weight_TK, b.weight_TK)
    ran.clear()
    collect_routing(model, tok, find_domains(_corpus(tmp_path)), seq_len=8, max_tokens=20, progress=False)
    assert ran and layers[-1] not in ran


def test_max_tokens_caps_each_domain(tmp_path: Path) -> None:
    model, tok = _tiny_model(), load_analysis_tokenizer()
    got = collect_routing(model, tok, find_domains(_corpus(tmp_path)), seq_len=8, max_tokens=20, progress=False)
    assert {n: c.tokens for n, c in got.counts.items()} == {"code": 20, "prose": 20}
    assert got.counts["prose"].pairs == 20 - 3  # windows of 8, 8, 4: pairs stop at every window edge
    for bad in (tmp_path, ["code"]):  # were AttributeError: 'PosixPath' / 'list' object has no attribute 'items'
        with pytest.raises(ValueError, match="domains must map each domain's name to its folder or files, as find_"):
            collect_routing(model, tok, bad, progress=False)  # type: ignore[arg-type]


def test_a_repeat_rate_over_no_pairs_is_none_not_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one token per domain: no consecutive pair, and the report said the router never repeats (0.0%, under
    # the random 12.5%), in report.json, the tables, the figure and the command's summary line
    model, tok, corpus = _tiny_model(), load_analysis_tokenizer(), _corpus(tmp_path / "c")
    report = analyze(model, tok, corpus, out=tmp_path / "r", max_tokens=1, seq_len=8, progress=False)
    for d in [*report["domains"].values(), report["all_domains"]]:
        assert d["pairs"] == 0 and d["repeat_first_choice"] == d["repeat_topk_overlap_different_tokens"] == [None] * 2
    assert json.loads((tmp_path / "r" / "report.json").read_text())["all_domains"]["repeat_topk_overlap"] == [None] * 2
    assert "| code | – | – | – | – |" in (tmp_path / "r" / "summary.md").read_text()
    mixlab.save_model(model, tmp_path / "m")
    assert main(["analyze", "--model", str(tmp_path / "m"), "--data", str(corpus), "--out", str(tmp_path / "r2"),
                 "--max-tokens", "1", "--quiet"]) == 0
    assert "repeat rate" not in capsys.readouterr().out
    # with pairs, the rates are numbers
    counts = RoutingCounts(1, E, K)
    counts.update([np.array([[0, 1], [0, 2]])], valid_T=np.ones(2, bool), pairs_ok=np.ones(1, bool))
    assert counts.summary()["repeat_first_choice"] == [1.0]


def test_analyze_takes_one_layer_and_refuses_a_string_of_domains(tmp_path: Path) -> None:
    # layers=1 failed with "'int' object is not iterable"; domains="code" looked for 'c', 'o', 'd', 'e'.
    model, tok, corpus = _tiny_model(), load_analysis_tokenizer(), _corpus(tmp_path / "c")
    report = analyze(model, tok, corpus, out=tmp_path / "r", layers=1, max_tokens=20, seq_len=8, figures=False,
                     progress=False)
    assert report["shown_layers"] == [1]
    assert report["meta"]["tokenizer"] == str(tok.path)  # was absent: "tokenizer: ?" in the report's pages
    assert f"tokenizer: {tok.path}" in (tmp_path / "r" / "summary.md").read_text()
    # a model `mixlab train` made with the byte tokenizer: its report said "tokenizer: ByteTokenizer"
    report = analyze(model, ByteTokenizer(), corpus, out=tmp_path / "r", max_tokens=20, seq_len=8, figures=False,
                     progress=False)
    assert report["meta"]["tokenizer"] == "bytes"
    with pytest.raises(ValueError, match=r"not the string 'code,prose': \['code', 'prose'\]"):
        analyze(model, tok, corpus, out=tmp_path / "r2", domains="code,prose", progress=False)  # type: ignore[arg-type]
    # a tokenizer's path (or None) failed with "'str' object has no attribute 'vocab_size'"
    for bad, match in (("runs/m", r"not str: load_analysis_tokenizer\('runs/m'\)"), (None, "not NoneType")):
        with pytest.raises(ValueError, match=f"tokenizer must be a tokenizer .*{match}"):
            analyze(model, bad, corpus, out=tmp_path / "r3", progress=False)


def test_a_domain_given_as_a_string_path_is_its_folder(tmp_path: Path) -> None:
    """{"prose": "corpus/prose"} (a str, as users write paths) failed with "'str' object has no attribute
    'parent'": a str is a sequence, so its characters were taken for the domain's files."""
    corpus = _corpus(tmp_path / "c")
    assert list(iter_documents(str(corpus / "prose"))) == list(iter_documents(corpus / "prose"))
    model, tok = _tiny_model(), load_analysis_tokenizer()
    by_str = collect_routing(model, tok, {"prose": str(corpus / "prose")}, seq_len=16, progress=False)
    by_path = collect_routing(model, tok, {"prose": corpus / "prose"}, seq_len=16, progress=False)
    assert by_str.counts["prose"].summary() == by_path.counts["prose"].summary()
    assert by_str.documents == by_path.documents == {"prose": 3}


def test_collect_gives_back_the_models_mode(tmp_path: Path) -> None:
    """A model being trained stays in train mode (collect_routing left it in eval mode)."""
    model, tok, domains = _tiny_model().train(), load_analysis_tokenizer(), find_domains(_corpus(tmp_path))
    collect_routing(model, tok, domains, seq_len=8, max_tokens=20, progress=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    collect_routing(model, tok, domains, seq_len=8, max_tokens=20, progress=False)
    assert not model.training


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    mixlab.save_model(_tiny_model(), tmp_path / "model", fmt=fmt)
    out = tmp_path / "report"
    rc = main(["analyze", "--model", str(tmp_path / "model"), "--data", str(_corpus(tmp_path / "corpus")),
               "--out", str(out), "--layers", "all", "--seq-len", "32", "--quiet"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "index.html", "tokens.html", "summary.md", "expert_shares.png",
            "repeats_by_layer.png", "load_balance.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["random_baseline"]["topk_overlap"] == pytest.approx(1 - 2 / 4 * 1 / 3)  # E=4, k=2
    assert list(report["domains"]) == ["code", "prose"]
    for d in report["domains"].values():
        assert len(d["repeat_first_choice"]) == 2 and all(0 <= x <= 1 for x in d["repeat_topk_overlap"])
        assert all(sum(row) == pytest.approx(2.0) for row in d["selection_share"])
    page = (out / "tokens.html").read_text()
    text = re.sub(r"<[^>]+>", "", page)  # tokens split "<b>" over several spans: read the text alone
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in text
    assert "<b>" not in page


def test_dense_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixlab.save_model(_tiny_model(dense=True), tmp_path / "dense")
    rc = main(["analyze", "--model", str(tmp_path / "dense"), "--data", str(_corpus(tmp_path / "c")),
               "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 1
    assert "dense" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="dense"):
        collect_routing(_tiny_model(dense=True), load_analysis_tokenizer(), {}, progress=False)


def test_bad_sample_and_batch_sizes_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--sample-tokens 0` ended in an IndexError traceback; a negative --samples was accepted. The
    sizes' flags are refused, naming the flag, before the model is read (it was after)."""
    import mixlab.checkpoint

    mixlab.save_model(_tiny_model(), tmp_path / "model")
    monkeypatch.setattr(mixlab.checkpoint, "load_model", lambda *a, **kw: pytest.fail("the model was read"))
    corpus = _corpus(tmp_path / "c")
    argv = ["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--out", str(tmp_path / "r"),
            "--quiet"]
    rc = main([*argv, "--samples", "-1"])  # was the library's "need batch_size >= 1, samples >= 0 ...", after the load
    assert rc == 2 and "error: --samples must be >= 0, got -1" in capsys.readouterr().err  # usage: exit 2
    rc = main([*argv, "--seq-len", "1"])  # was the library's "need seq_len >= 2 and max_tokens >= 1", after the load
    assert rc == 2 and "error: --seq-len must be >= 2 (windows of one token have no consecutive pair), got 1" in \
        capsys.readouterr().err
    for flag in ("--sample-tokens", "--batch-size", "--max-tokens", "--seq-len"):
        with pytest.raises(SystemExit) as e:
            main([*argv, flag, "0"])
        assert e.value.code == 2 and f"argument {flag}: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_folder_with_files_of_the_reports_names_is_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`--out` at a folder holding the user's own index.html replaced it (after the whole analysis);
    an earlier report there is still replaced, and other files are kept."""
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    corpus = _corpus(tmp_path / "c")
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    args = ["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--quiet", "--max-tokens", "64"]
    assert main([*args, "--out", str(mine)]) == 1
    assert "holds files a routing report would replace (index.html)" in capsys.readouterr().err
    assert (mine / "index.html").read_text() == "my page" and sorted(p.name for p in mine.iterdir()) == ["index.html"]
    report = tmp_path / "report"
    assert main([*args, "--out", str(report)]) == 0
    (report / "screenshot.png").write_bytes(b"png")
    assert main([*args, "--out", str(report)]) == 0  # an earlier report: replaced, the screenshot kept
    assert (report / "screenshot.png").read_bytes() == b"png"


def _as_unprivileged(check: Any) -> str:
    """`check()`'s OutputError text ('' for none), run by a user whom folder modes bind: root ignores
    them, so as root it runs in a forked child that first becomes nobody (no torch in the child)."""
    import os

    from mixlab.errors import OutputError

    if os.geteuid() != 0:
        try:
            check()
            return ""
        except OutputError as e:
            return str(e)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                check()
                message = ""
            except OutputError as e:
                message = str(e)
            os.write(w, message.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return text


def test_a_read_only_destination_is_refused_before_the_work() -> None:
    """A report into a read-only folder (or over an earlier report there), and eval's --json there,
    failed only after the whole run, naming a temporary: `.x.json.tmp-123-ab: Permission denied`."""
    import os

    from mixlab import atomic
    from mixlab.analysis.report import check_report_folder

    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # mkdtemp's 0700: nobody could not look inside at all
        (base / "ro").mkdir(mode=0o555)
        (base / "rw" / "old").mkdir(parents=True)
        (base / "rw" / "old" / "report.json").write_text(json.dumps({"moe_layers": [0], "random_baseline": {},
                                                                     "domains": {}}))
        (base / "rw" / "old").chmod(0o555)
        (base / "rw").chmod(0o777)
        for out in (base / "ro" / "report", base / "ro", base / "rw" / "old"):
            assert f"{out}: cannot write into" in _as_unprivileged(lambda out=out: check_report_folder(out))
        json_file = base / "ro" / "results.json"  # mixlab eval --json
        assert f"{json_file}: cannot write into {base / 'ro'}" in _as_unprivileged(
            lambda: atomic.check_destination(json_file, kind="file"))
        assert _as_unprivileged(lambda: check_report_folder(base / "rw" / "new")) == ""  # writable: fine
        assert sorted(os.listdir(base / "ro")) == []
    finally:
        for folder in (base / "ro", base / "rw" / "old"):
            folder.chmod(0o755)
        shutil.rmtree(base)


def test_domain_without_usable_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    corpus = _corpus(tmp_path / "c")
    rc = main(["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--domains", "prose,chat",
               "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "chat" in err and "no usable data" in err and "'text'" in err
    assert not (tmp_path / "r").exists()
    (corpus / "empty").mkdir()
    (corpus / "empty" / "valid.jsonl").write_text("\n")
    rc = main(["analyze", "--model", str(tmp_path / "model"), "--data", str(corpus), "--out", str(tmp_path / "r"),
               "--quiet"])
    assert rc == 1 and "empty" in capsys.readouterr().err
    (corpus / "empty" / "valid.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"valid.jsonl:1: not valid JSON"):
        list(iter_documents(corpus / "empty"))


# ---------------------------------------------------------------------------------------------
# The token view in a real browser


def test_token_view_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    model, tok = _tiny_model(), load_analysis_tokenizer()
    got = collect_routing(model, tok, find_domains(_corpus(tmp_path / "c")), seq_len=32, progress=False)
    page = tmp_path / "tokens.html"
    page.write_text(tokens_html(build_report(got, layers=[0, 1], meta={})), encoding="utf-8")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # The browser parsed every span (2 samples x 2 layers) and kept the escaped text as text.
    runs = sum(1 + sum(a != b for a, b in zip(s.idx_LSK[i, :-1].tolist(), s.idx_LSK[i, 1:].tolist(), strict=True))
               for s in got.samples for i in range(2))  # neighbours with equal top-k share a span
    assert dom.count("<span class=\"e") == runs + 4  # + the 4-expert legend
    assert "&lt;b&gt;bold&lt;/b&gt;" in re.sub(r"<[^>]+>", "", dom) and "<b>" not in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=900,700", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000


def test_byte_model_uses_the_tokenizer_named_by_training(tmp_path: Path) -> None:
    """A model exported by `mixlab train` with the byte tokenizer: its mixlab_data.json is honoured,
    and multi-byte characters appear whole in the token view."""
    model = mixlab.Transformer(get_preset("tiny-moe").replace(vocab_size=259))
    model.init_weights(seed=4)
    mixlab.save_model(model, tmp_path / "m")
    (tmp_path / "m" / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    text = "Café déjà vu: ünïcode ✓"
    (tmp_path / "c" / "one").mkdir(parents=True)
    (tmp_path / "c" / "one" / "doc.txt").write_text(text)
    assert main(["analyze", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "c"), "--out",
                 str(tmp_path / "r"), "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["domains"]["one"]["tokens"] == len(text.encode()) + 1  # bytes + BOS
    pieces = report["samples"][0]["pieces"]
    assert pieces[0] == "<s>" and "".join(pieces[1:]) == text and "✓" in pieces


def test_report_rewrites_keep_other_files_and_fail_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_report: a report folder is replaced file by file (each whole), files the report does not
    write stay, a failure while writing leaves the old report, leftovers of killed runs are cleaned."""
    from mixlab.analysis import report as rep

    model, tok = _tiny_model(), load_analysis_tokenizer()
    got = collect_routing(model, tok, find_domains(_corpus(tmp_path / "c")), seq_len=16, max_tokens=64,
                          progress=False)
    r = build_report(got, layers=[0, 1], meta={})
    out = tmp_path / "r"
    names = rep.write_report(r, out, figures=False)
    (out / "screenshot.png").write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dead = tmp_path / ".r.tmp-999999999-abcd"  # a killed run's temporary (no such process)
    dead.mkdir()

    def fail(_report: Any) -> str:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(rep, "summary_md", fail)
    with pytest.raises(OSError, match="simulated"):
        rep.write_report(r, out, figures=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "r"]
    monkeypatch.undo()
    assert rep.write_report(r, out, figures=False) == names
    assert (out / "screenshot.png").read_bytes() == b"mine" and oct((out / "report.json").stat().st_mode)[-3:] != "600"
    # an earlier report's figure, rewritten without figures: it showed the old numbers beside the new JSON
    (out / "expert_shares.png").write_bytes(b"old figure")
    assert rep.write_report(r, out, figures=False) == names
    assert not (out / "expert_shares.png").exists() and (out / "screenshot.png").read_bytes() == b"mine"


def test_a_misspelt_split_is_refused(tmp_path: Path) -> None:
    """Files named by split and a --split that names none of them: an error, not every file read
    (training text included) through the "no such files: all of them" fallback."""
    for d in ("code", "web"):
        (tmp_path / d).mkdir()
        for split in ("train", "valid"):
            (tmp_path / d / f"{split}.jsonl").write_text(json.dumps({"text": f"{d} {split}"}) + "\n")
    domains = find_domains(tmp_path)
    with pytest.raises(ValueError, match=r"--split 'vaild' is not a split name \(did you mean 'valid'\?\): "
                                         r"expected one of train, valid"):
        check_domains(domains, split="vaild")
    with pytest.raises(ValueError, match=r"--split 'test' matches no data file in .*code, .*web \(files there: "
                                         r"train\.jsonl, valid\.jsonl\)"):
        check_domains(domains, split="test")
    # one domain of training files alone: the message named no folder ("in the 1 domain folder(s)")
    with pytest.raises(ValueError, match=r"--split 'valid' matches no data file in .*code \(files there: train"):
        check_domains({"code": [tmp_path / "code" / "train.jsonl"]}, split="valid")
    check_domains(domains, split="valid")
    check_domains(domains, split="")
    (tmp_path / "notes").mkdir()  # folders whose files are not named by split keep the fallback
    (tmp_path / "notes" / "a.txt").write_text("some text")
    check_domains({"notes": tmp_path / "notes"}, split="valid")


def test_split_names_are_read_in_any_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--split Valid was 'not a split name', while file names are read in any case (Valid.jsonl is in
    the valid split); a typo listed the split names without the one meant."""
    (tmp_path / "c" / "code").mkdir(parents=True)
    for split in ("train", "valid"):
        (tmp_path / "c" / "code" / f"{split}.jsonl").write_text(json.dumps({"text": f"code {split}"}) + "\n")
    domains = find_domains(tmp_path / "c")
    check_domains(domains, split="Valid")
    assert [t for _, t in iter_documents(domains["code"], split="VALID")] == ["code valid"]
    with pytest.raises(ValueError, match=r"--split 'Vaild' is not a split name \(did you mean 'valid'\?\)"):
        check_domains(domains, split="Vaild")
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "c"), "--split", "Valid",
                 "--out", str(tmp_path / "r"), "--seq-len", "16", "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["split"] == "valid" and report["domains"]["code"]["documents"] == 1


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """A binary .jsonl failed with "'utf-8' codec can't decode byte ..." and no file name; a binary
    .txt was routed as a page of U+FFFD."""
    (tmp_path / "bin").mkdir()
    junk = b"\xda\x00\xff\xfe binary"
    for name in ("valid.jsonl", "valid.txt"):
        (tmp_path / "bin" / name).write_bytes(junk)
        with pytest.raises(ValueError, match=rf"bin/{name}(:1)?: not UTF-8 text"):
            check_domains(find_domains(tmp_path))
        (tmp_path / "bin" / name).unlink()


def test_sequences_longer_than_the_model_are_clamped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--seq-len (default 512) past a model's context routed positions it never saw, silently; now
    the CLI routes windows of the model's length and says so (as `mixlab eval --context`), and the
    library refuses."""
    model = _tiny_model()
    model.config = model.config.replace(max_seq_len=16)
    mixlab.save_model(model, tmp_path / "model")
    out = tmp_path / "report"
    argv = ["analyze", "--model", str(tmp_path / "model"), "--data", str(_corpus(tmp_path / "c")), "--out", str(out),
            "--quiet"]
    assert main([*argv, "--seq-len", "512"]) == 0
    assert "mixlab analyze: note: --seq-len 512 is past the model's 16 positions" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["settings"]["seq_len"] == 16
    # the default, not asked for, is lowered quietly, as eval's --context (the note came on every short model)
    assert main(argv) == 0 and capsys.readouterr().err == ""
    assert json.loads((out / "report.json").read_text())["settings"]["seq_len"] == 16
    with pytest.raises(ValueError, match="seq_len 17 exceeds the model's context length 16"):
        collect_routing(model, load_analysis_tokenizer(), find_domains(tmp_path / "c"), seq_len=17, progress=False)
    # analyze()'s default is 512 or the model's context if shorter (a short model is not an error)
    report = analyze(model, load_analysis_tokenizer(), tmp_path / "c", out=tmp_path / "r2", figures=False,
                     progress=False)
    assert report["settings"]["seq_len"] == 16


def test_cli_analyzes_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model FILE.gguf`, as generate / eval / serve take it (it failed: "no config.json ... found"):
    the same counts as the folder it was converted from."""
    mixlab.save_model(_tiny_model(), tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "m.gguf"), "--quant", "f32"]) == 0
    corpus = _corpus(tmp_path / "c")
    reports = []
    for src in ("model", "m.gguf"):
        assert main(["analyze", "--model", str(tmp_path / src), "--data", str(corpus), "--out", str(tmp_path / src) +
                     ".report", "--seq-len", "32", "--quiet"]) == 0
        reports.append(json.loads((tmp_path / f"{src}.report" / "report.json").read_text()))
    assert [r["domains"] for r in reports[1:]] == [reports[0]["domains"]]
    assert reports[1]["meta"]["tokenizer"].endswith("m.gguf")
    mixlab.save_model(_tiny_model(dense=True), tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), str(tmp_path / "d.gguf"), "--quant", "f32"]) == 0
    capsys.readouterr()
    assert main(["analyze", "--model", str(tmp_path / "d.gguf"), "--data", str(corpus), "--out",
                 str(tmp_path / "r"), "--quiet"]) == 1
    assert "the model is dense" in capsys.readouterr().err


def test_cli_refuses_the_report_folder_before_reading_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A user's own index.html in --out was refused only after the model was read (minutes for a big one)."""
    import mixlab.checkpoint

    mixlab.save_model(_tiny_model(), tmp_path / "model")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.html").write_text("mine")

    def load_model(*a: object, **kw: object) -> None:
        raise AssertionError("the model was read")

    monkeypatch.setattr(mixlab.checkpoint, "load_model", load_model)
    assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(_corpus(tmp_path / "c")), "--out",
                 str(tmp_path / "r"), "--quiet"]) == 1
    assert "index.html" in capsys.readouterr().err and (tmp_path / "r" / "index.html").read_text() == "mine"
    # a --layers out of range, a --tokenizer that is no file: they too were refused after the weights were read
    # (the flag's value a usage error, exit 2; the missing file a failed run, 1)
    for flags, message, code in (
            (["--layers", "5"], "--layers: layer 5 is not an MoE layer of this model (MoE layers: 0..1", 2),
            (["--layers", "x"], "--layers: expected 'all' or comma-separated integers, got 'x'", 2),
            (["--tokenizer", str(tmp_path / "nope.model")], "nope.model: no such tokenizer file", 1)):
        assert main(["analyze", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "c"), "--out",
                     str(tmp_path / "r2"), "--quiet", *flags]) == code
        assert message in capsys.readouterr().err
    small = _tiny_model()  # a byte-level model without its mixlab_data.json: Mixtral's tokenizer is the fallback
    mixlab.save_model(mixlab.Transformer(small.config.replace(vocab_size=259)), tmp_path / "bytes-model")
    assert main(["analyze", "--model", str(tmp_path / "bytes-model"), "--data", str(tmp_path / "c"), "--out",
                 str(tmp_path / "r2"), "--quiet"]) == 1
    assert "tokenizer has 32000 tokens but the model's vocabulary is 259" in capsys.readouterr().err
