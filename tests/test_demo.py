"""`mixlab demo` end to end with a very short setting: corpus building, training, samples, routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixlab.cli import main
from mixlab.train.demo import math_documents, routing_table, run_demo, stdlib_documents


def test_embedded_corpus_has_three_kinds_of_text() -> None:
    docs = stdlib_documents(max_bytes=30_000)
    code = [d for d in docs if d.domain == "code"]
    prose = [d for d in docs if d.domain == "prose"]
    assert code and prose
    assert any("def " in d.text for d in code)
    assert not any('"""' in d.text for d in code[:3])  # docstrings were moved to the prose domain
    maths = math_documents(max_bytes=5_000, seed=1)
    first = maths[0].text.split("\n")
    a, op, b = first[0].removeprefix("What is ").removesuffix("?").split()
    want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert first[1] == f"Answer: {want}"


def test_demo_short_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = run_demo(steps=3, max_bytes=60_000, out=str(tmp_path / "demo"))
    text = capsys.readouterr().out
    assert res["steps"] == 3
    assert set(res["eval"]["loss"]) == {"code", "math", "prose"}
    assert "samples (temperature 0.6" in text and "routing: share of each domain's expert choices" in text
    assert "layer 3" in text and "What is 23 + 45?" in text
    assert len(res["samples"]) == 4
    assert json.loads((tmp_path / "demo" / "run" / "hf" / "config.json").read_text())["num_local_experts"] == 8
    for png in ("loss.png", "routing.png"):  # what people would rather see than read
        assert (tmp_path / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routing.png (experts per domain and layer)" in text


def test_demo_out_runs_again_and_leaves_other_folders_alone(tmp_path: Path) -> None:
    from mixlab.train.demo import DEMO_MARK, _claim

    out = tmp_path / "demo"
    _claim(out)
    (out / "run").mkdir()
    (out / "loss.png").write_bytes(b"old")
    kept = tmp_path / "elsewhere"  # the user put the data on another disk and linked it in
    kept.mkdir()
    (kept / "shard.bin").write_bytes(b"mine")
    (out / "data").symlink_to(kept)
    _claim(out)  # an earlier demo's output: replaced, so that the same command runs again
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARK]
    assert (kept / "shard.bin").read_bytes() == b"mine"  # the link went, not what it points to
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        _claim(mine)
    (mine / DEMO_MARK).write_text("{}")
    with pytest.raises(ValueError, match="notes.txt"):
        _claim(mine)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="is a file"):
        _claim(mine / "notes.txt")


def _corpus(tmp_path: Path) -> Path:
    for dom, word in (("alpha", "apple"), ("beta", "banana")):
        (tmp_path / "c" / dom).mkdir(parents=True)
        for split, n in (("train", 30), ("valid", 3)):
            lines = [json.dumps({"text": f"{word} {i} " * 30}) for i in range(n)]
            (tmp_path / "c" / dom / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "c"


def test_demo_on_a_corpus_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "2", "--data", str(_corpus(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out and "routing" in out


@pytest.mark.parametrize(("argv", "said"), [(["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
                                            (["--minutes", "-1"], "--minutes must be a number > 0, got -1"),
                                            (["--minutes", "nan"], "--minutes must be a number > 0, got nan")])
def test_demo_refuses_bad_budgets_before_the_work(argv: list[str], said: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--steps 0 printed an untrained model's samples as the demo; --minutes -1 trained past its deadline."""
    try:
        code = main(["demo", *argv])
    except SystemExit as e:  # argparse's error
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and said in err


def test_routing_table_marks_top_expert() -> None:
    table = routing_table({"a": [[0.7, 0.3]], "b": [[0.2, 0.8]]})
    assert "70*" in table and "80*" in table and "distance from the average routing" in table
    # a domain name as wide as the column ran into its numbers ("wikipediaL0 0.04")
    assert "  wikipedia L0 " in routing_table({"wikipedia": [[0.5, 0.5]], "b": [[0.2, 0.8]]})


def test_demo_stopped_by_ctrl_c_says_so_and_exits_130(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the demo's training went on to evaluate, sample and print 'model saved to .../hf'
    (nothing was saved there), exit 0."""
    import signal

    import mixlab.train.demo as demo

    real = demo.train

    def interrupted(cfg, **kw):  # the loop's own SIGINT handling, as after Ctrl-C at the first step
        return real(cfg, on_step=lambda rec: signal.raise_signal(signal.SIGINT))

    monkeypatch.setattr(demo, "train", interrupted)
    assert main(["demo", "--steps", "5", "--out", str(tmp_path / "d"), "--data", str(_corpus(tmp_path))]) == 130
    out, err = capsys.readouterr()
    assert "samples" not in out and "model saved" not in out
    assert f"stopped by SIGINT at step 1; checkpoint in {tmp_path / 'd' / 'run' / 'checkpoints'}" in err
    assert (tmp_path / "d" / "run" / "checkpoints" / "step_00000001").is_dir()


def _small_corpus(tmp_path: Path) -> str:
    """One domain of 40 short documents: a demo run of a few steps on it takes a second or two."""
    (tmp_path / "c" / "code").mkdir(parents=True)
    (tmp_path / "c" / "code" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n" for i in range(40)))
    return str(tmp_path / "c")


def test_demo_quiet_prints_the_results_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """demo had no --quiet, and printed its progress lines ('preparing the corpus ...', the step time)
    on stdout among the results; they are on stderr, with the training's progress, and --quiet
    leaves stderr empty and the results (losses, samples, routing) on stdout."""
    flags = ["demo", "--steps", "2", "--data", _small_corpus(tmp_path)]
    assert main(flags) == 0
    loud = capsys.readouterr()
    assert "preparing the corpus" in loud.err and "preparing" not in loud.out
    assert main([*flags, "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "validation loss after 2 steps" in quiet.out and "routing: share" in quiet.out


def test_demo_steps_alone_set_no_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --steps N` stopped, silently, at the default 4 minutes' deadline (5 minutes) whatever N;
    --steps alone now runs every step, and a --minutes budget that runs out says so."""
    import mixlab.train.demo as demo

    class Clock:  # each reading 10 minutes after the last: every deadline has passed at the first step
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 600
            return cls.now

    monkeypatch.setattr(demo, "time", Clock)
    data = _small_corpus(tmp_path)
    assert run_demo(steps=3, data=data, quiet=True)["steps"] == 3
    with pytest.warns(UserWarning, match=r"the time budget \(1 minutes, stopping at 1.25 x\) ran out after 1 of 3 "
                                         "steps"):
        assert run_demo(steps=3, minutes=1, data=data, quiet=True)["steps"] == 1


def test_demo_refuses_a_corpus_with_no_validation_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A corpus of one document per domain held none out: the demo trained, printed no loss, then
    failed on its samples' prompts ('prompts must be a non-empty list ...'); it is refused first."""
    for domain in ("code", "prose"):
        (tmp_path / "c" / domain).mkdir(parents=True)
        (tmp_path / "c" / domain / "a.txt").write_text(f"one {domain} document " * 50)
    assert main(["demo", "--steps", "2", "--data", str(tmp_path / "c"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "c: no validation text" in err and "give more documents or a valid.jsonl" in err
