"""The one atomic-output scheme (mixlab.atomic) behind convert, save_model, training checkpoints,
`data prepare` and GGUF export: nothing mixlab did not write is ever deleted (issue 11, points 1-3
and 9), symlinks are written through, leftovers of killed runs are cleaned by name, usual modes."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

from mixlab import atomic
from mixlab.checkpoint import load_model, save_model
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.errors import MixlabError, OutputError
from mixlab.model import Transformer


def tiny(path: Path) -> Path:
    m = Transformer(get_preset("tiny-moe"))
    m.init_weights(seed=0)
    save_model(m, path)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny(tmp_path_factory.mktemp("base") / "base")


def test_convert_into_a_folder_holding_the_source_and_a_config_deletes_nothing(base, tmp_path, capsys):
    # The probe: mkdir models; cp -r base models/a; cp base/config.json models/; convert models/a models
    models = tmp_path / "models"
    models.mkdir()
    (models / "a").mkdir()
    for f in base.iterdir():
        (models / "a" / f.name).write_bytes(f.read_bytes())
    (models / "sibling").mkdir()
    (models / "sibling" / "keep.bin").write_bytes(b"precious")
    (models / "config.json").write_bytes((base / "config.json").read_bytes())
    before = tree(models)
    for extra in ([], ["--overwrite"]):  # never a folder holding the source, even with --overwrite
        assert main(["convert", str(models / "a"), str(models), "--to", "mistral", *extra]) == 1
        err = capsys.readouterr().err
        assert "contains the source" in err and str(models) in err and "Traceback" not in err
        assert tree(models) == before


def test_convert_into_the_parent_of_the_source_or_onto_itself_is_refused(base, tmp_path, capsys):
    parent = tmp_path / "p"
    src = tiny(parent / "src")
    before = tree(parent)
    for dst in (parent, src, tmp_path):
        assert main(["convert", str(src), str(dst), "--overwrite"]) == 1
        assert "source" in capsys.readouterr().err
    assert tree(parent) == before


def test_a_folder_with_foreign_files_is_replaced_only_with_overwrite(base, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(base), str(dst), "--to", "mistral"]) == 0
    assert main(["convert", str(base), str(dst)]) == 0  # mixlab wrote everything there: replaced
    assert (dst / "config.json").exists() and not (dst / "params.json").exists()
    (dst / "notes.txt").write_text("mine")
    assert main(["convert", str(base), str(dst), "--to", "mistral"]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "--overwrite" in err
    assert (dst / "notes.txt").read_text() == "mine"
    assert main(["convert", str(base), str(dst), "--to", "mistral", "--overwrite"]) == 0
    assert (dst / "params.json").exists() and not (dst / "notes.txt").exists()
    # Python API: the project's own exception type, same message.
    (dst / "thesis.tex").write_text("x")
    with pytest.raises(OutputError, match="thesis.tex"):
        save_model(load_model(base), dst)
    assert issubclass(OutputError, MixlabError) and issubclass(OutputError, ValueError)


def test_a_folder_without_a_manifest_is_not_replaced(base, tmp_path):
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # looks like a checkpoint, but mixlab did not write it
    with pytest.raises(OutputError, match="did not write"):
        save_model(load_model(base), dst)
    assert (dst / "config.json").read_text() == "{}"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(load_model(base), empty)  # an empty folder holds nothing to lose
    assert (empty / "model.safetensors").exists()


def test_data_prepare_never_deletes_the_corpus_or_a_foreign_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "prose").mkdir(parents=True)
    for i in range(5):
        (corpus / "prose" / f"{i}.txt").write_text(f"text number {i} " * 5)
    before = tree(corpus)
    for out in (corpus, tmp_path, corpus / "prose"):  # is, contains, lies inside the source
        for extra in ([], ["--overwrite"]):
            assert main(["data", "prepare", str(corpus), "--out", str(out), *extra]) == 1
            err = capsys.readouterr().err
            assert "source" in err and "Traceback" not in err
        assert tree(corpus) == before
    # An existing regular file named by --out is refused and left as it is (no .NAME.old-PID).
    f = tmp_path / "ds"
    f.write_text("a file")
    assert main(["data", "prepare", str(corpus), "--out", str(f)]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert f.read_text() == "a file" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    ds = tmp_path / "ds2"
    assert main(["data", "prepare", str(corpus), "--out", str(ds)]) == 0
    assert main(["data", "prepare", str(corpus), "--out", str(ds), "--seed", "1"]) == 0  # ours: replaced
    (ds / "mine.txt").write_text("x")
    assert main(["data", "prepare", str(corpus), "--out", str(ds)]) == 1
    assert (ds / "mine.txt").exists()


def test_the_output_folder_exists_at_every_moment_of_a_replacement(base, tmp_path, monkeypatch):
    """RENAME_EXCHANGE swaps the folders: there is no moment without `out` (data.py's old scheme had one)."""
    if atomic._EXCHANGE is None:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    dst = tmp_path / "out"
    save_model(load_model(base), dst)
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def watch(p, *a, **kw):
        seen.append((dst / "params.json").exists() and (Path(p) / "config.json").exists())  # new in, old out
        return real_rmtree(p, *a, **kw)

    monkeypatch.setattr(atomic.shutil, "rmtree", watch)
    real_rename = os.rename

    def rename(a, b):
        if dst in (Path(a), Path(b)):
            pytest.fail("renaming out away leaves a moment without it")
        real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    save_model(load_model(base), dst, fmt="mistral")
    assert seen == [True] and (dst / "params.json").exists()


def test_a_symlinked_destination_is_written_through(base, tmp_path, capsys):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)  # dangling at first
    assert main(["convert", str(base), str(link)]) == 0
    assert link.is_symlink() and (real / "config.json").exists()
    assert main(["convert", str(base), str(link), "--to", "mistral"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real) and (real / "params.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old left behind
    assert main(["info", str(link)]) == 0
    capsys.readouterr()
    # A link to the source is the source.
    src_link = tmp_path / "srclink"
    src_link.symlink_to(base)
    assert main(["convert", str(base), str(src_link), "--overwrite"]) == 1
    assert "source" in capsys.readouterr().err


def test_convert_never_writes_where_the_sources_links_point(base, tmp_path, capsys):
    """A hub snapshot's files are links to ../../blobs: convert SNAPSHOT BLOBS --overwrite replaced the
    blobs folder (the source's own weights; the snapshot's links left dangling), and --to gguf onto a
    blob replaced it; both are refused, naming the link and the source, before anything is written."""
    repo = tmp_path / "models--x"
    snap, blobs = repo / "snapshots" / "rev", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in base.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    before = tree(repo)
    assert main(["convert", str(snap), str(blobs), "--overwrite", "--quiet"]) == 1
    assert (f"{blobs}: refusing to write there: it contains the target of {snap}/" in capsys.readouterr().err)
    pytest.importorskip("gguf")
    weights = blobs / "sha-model.safetensors"
    assert main(["convert", str(snap), str(weights), "--to", "gguf", "--overwrite", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"it is the target of {snap / 'model.safetensors'}, a link in the source {snap}" in err
    assert tree(repo) == before


def test_convert_never_replaces_another_kind_of_folder_mixlab_wrote(base, tmp_path, capsys):
    """A folder mixlab wrote was replaceable by any write: `convert MODEL DATA` (a typo) replaced a
    prepared dataset with the model, `convert RUN RUN/checkpoints/step_N` a training checkpoint inside
    the run it read, and `convert RUN RUN/hf --to mistral` the very export it read. Another kind is
    refused unless --overwrite (never inside the source), and a run's export is its source."""
    from mixlab.train.data import prepare, read_documents

    corpus = tmp_path / "corpus" / "prose"
    corpus.mkdir(parents=True)
    (corpus / "train.jsonl").write_text('{"text": "a b c"}\n' * 4)
    data = tmp_path / "data"
    prepare(read_documents([corpus.parent]), data)
    run = tmp_path / "run"
    save_model(load_model(base), run / "hf")
    with atomic.atomic_folder(run / "checkpoints" / "step_00000001", kind="training-checkpoint") as tmp:
        (tmp / "state.json").write_text("{}")
    before = tree(tmp_path)
    assert main(["convert", str(base), str(data), "--quiet"]) == 1
    assert f"{data}: holds a dataset mixlab wrote, not a checkpoint; pass --overwrite" in capsys.readouterr().err
    step = run / "checkpoints" / "step_00000001"
    assert main(["convert", str(run), str(step), "--overwrite", "--quiet"]) == 1
    assert f"{step}: holds a training checkpoint mixlab wrote, not a checkpoint; it lies inside the source" in (
        capsys.readouterr().err)
    assert main(["convert", str(run), str(run / "hf"), "--to", "mistral", "--quiet"]) == 1
    assert f"{run / 'hf'}: refusing to write there: it is the source {run / 'hf'}" in capsys.readouterr().err
    assert tree(tmp_path) == before
    assert main(["convert", str(base), str(data), "--overwrite", "--quiet"]) == 0  # said so: replaced
    assert (data / "config.json").is_file() and not (data / "meta.json").exists()


def test_leftovers_of_killed_runs_are_cleaned_by_name_only(base, tmp_path):
    dead = 999_999_999  # a pid no process has
    gguf_tmp = tmp_path / f".m.gguf.tmp-{dead}"
    gguf_tmp.write_bytes(b"x" * 100)
    folder_tmp = tmp_path / f".out.tmp-{dead}-abcd"
    folder_tmp.mkdir()
    alive = tmp_path / f".out.tmp-{os.getppid()}-abcd"  # a live process's: not ours to remove
    alive.mkdir()
    other = tmp_path / ".outer.tmp-1"  # another destination's name
    other.mkdir()
    save_model(load_model(base), tmp_path / "out")
    assert not folder_tmp.exists() and alive.exists() and other.exists()
    from mixlab.checkpoint.gguf import write_gguf

    pytest.importorskip("gguf")
    big_vocab = Transformer(get_preset("tiny-moe").replace(vocab_size=32000))  # the tokenizer's 32000 pieces
    big_vocab.init_weights(seed=0)
    write_gguf(big_vocab, tmp_path / "m.gguf", quant="f16")
    assert not gguf_tmp.exists() and (tmp_path / "m.gguf").exists()


def test_training_checkpoint_leftovers_are_cleaned(tmp_path):
    from mixlab.train import checkpoints

    m = Transformer(get_preset("tiny-moe"))
    m.init_weights(seed=0)
    opt = torch.optim.AdamW(m.parameters())
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000002-x8k2").mkdir(parents=True)  # the scheme before mixlab.atomic
    (root / f".step_00000003.tmp-{999_999_999}-ab").mkdir()
    # A save killed at a step no later save repeats (a signal's stop, resumed from an earlier step): it
    # stayed, as large as a checkpoint. A live process's temporary is another writer's.
    (root / f".step_00000007.tmp-{999_999_999}-cd").mkdir()
    (root / f".step_00000005.tmp-{os.getppid()}-ef").mkdir()
    checkpoints.save(root, step=1, model=m, optimizer=opt, state={}, keep=3)
    checkpoints.save(root, step=3, model=m, optimizer=opt, state={}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == [f".step_00000005.tmp-{os.getppid()}-ef", "step_00000001",
                                                      "step_00000003"]


def test_outputs_have_the_usual_modes(base, tmp_path):
    old = os.umask(0o022)
    try:
        save_model(load_model(base), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644


def test_gguf_destination_that_is_a_folder_or_foreign_file_is_refused_before_writing(base, tmp_path, capsys,
                                                                                     monkeypatch):
    pytest.importorskip("gguf")
    from mixlab.checkpoint import gguf as g

    (tmp_path / "d.gguf").mkdir()
    monkeypatch.setattr(g, "_encode", lambda *a: pytest.fail("wrote data before refusing"))
    assert main(["convert", str(base), str(tmp_path / "d.gguf"), "--to", "gguf"]) == 1
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "x.gguf").write_text("my notes")
    assert main(["convert", str(base), str(tmp_path / "x.gguf"), "--to", "gguf"]) == 1
    assert "may not be mixlab" in capsys.readouterr().err
    assert (tmp_path / "x.gguf").read_text() == "my notes"


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(base, tmp_path, capsys, monkeypatch):
    import errno

    from mixlab.checkpoint import io as ckio

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckio, "write_safetensors", full)
    assert main(["convert", str(base), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["nan-bytes", "f32-to-i32"])
def test_a_training_checkpoint_changed_after_saving_is_refused_on_resume(tmp_path, damage):
    from mixlab.errors import CheckpointError
    from mixlab.train import checkpoints

    m = Transformer(get_preset("tiny-moe"))
    m.init_weights(seed=0)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(0, 256, (1, 8))).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    checkpoints.save(root, step=1, model=m, optimizer=opt, state={}, keep=3)
    checkpoints.save(root, step=2, model=m, optimizer=opt, state={}, keep=3)
    f = root / "step_00000002" / "optimizer.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "nan-bytes":  # same size, NaN written over the last float
        raw[-4:] = b"\x00\x00\xc0\x7f"
    else:  # the header names another dtype of the same size
        i = raw.index(b'"F32"')
        raw[i:i + 5] = b'"I32"'
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*SHA-256.*resume from step_00000001"):
        checkpoints.latest(root)


# -- small files and the writers outside checkpoint/io: whole or not at all ------------------------


def _half_then_fail(real):
    """A writer that writes half of its content, then fails like a full disk."""
    import errno

    def write(self, text, *a, **kw):
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(self))

    return write


def test_a_failed_small_file_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    dst = tmp_path / "train_config.json"
    atomic.write_text(dst, '{"old": 1}\n')
    monkeypatch.setattr(Path, "write_text", _half_then_fail(Path.write_text))
    with pytest.raises(OSError, match="simulated"):
        atomic.write_text(dst, '{"new": 2}\n' * 50)
    monkeypatch.undo()
    assert dst.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == [dst.name]
    atomic.write_text(dst, "new\n")
    assert dst.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == [dst.name]


def test_the_metrics_log_trimmed_on_resume_is_replaced_whole(tmp_path, monkeypatch):
    import json

    from mixlab.train.loop import _Metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    before = log.read_bytes()
    monkeypatch.setattr(Path, "write_text", _half_then_fail(Path.write_text))
    with pytest.raises(OSError, match="simulated"):
        _Metrics(tmp_path, resume_step=2, tensorboard=False)  # drops step 3, to be redone
    monkeypatch.undo()
    assert log.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [log.name]
    _Metrics(tmp_path, resume_step=2, tensorboard=False).close()
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]


def test_a_failed_loss_curve_plot_leaves_the_old_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    from matplotlib.figure import Figure

    from mixlab.train.plot import plot_loss_curve

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n"
                                                    for s in (1, 2, 3)))
    png = tmp_path / "out" / "loss.png"
    plot_loss_curve(tmp_path, png)
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG")
    real = Figure.savefig

    def half(self, fname, **kw):
        real(self, fname, **kw)
        with open(fname, "r+b") as f:
            f.truncate(len(before) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(OSError, match="simulated"):
        plot_loss_curve(tmp_path, png, title="again")
    assert png.read_bytes() == before and [p.name for p in png.parent.iterdir()] == ["loss.png"]



def test_the_loss_curve_plot_reads_a_run_still_writing_its_metrics(tmp_path):
    """A torn last line (a run writing it as the plot reads it, or killed mid-write) failed the plot
    with "Unterminated string starting at: line 1 column 14", naming neither the file nor the line."""
    pytest.importorskip("matplotlib")
    import json

    from mixlab.train.plot import plot_loss_curve, read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2)) + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(log)] == [1, 2]
    plot_loss_curve(tmp_path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    log.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not valid JSON"):
        read_metrics(log)


def test_a_distributed_checkpoint_that_fails_after_its_shards_is_not_committed(tmp_path, monkeypatch):
    """parallel/checkpoint.py: DCP writes its shards into the temporary folder rank 0 made; the
    commit (state.json, manifest, rename) is rank 0's, so a failure before it leaves nothing. The
    temporary of an earlier killed save is removed, whatever its step. (A world of one, in this
    process: `shutdown` ends it and its environment.)"""
    from mixlab.parallel import checkpoint as pc
    from mixlab.parallel.mesh import init, shutdown
    from mixlab.train import checkpoints

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "ckpts"
    layout = init(ep=1)
    try:
        torch.manual_seed(0)
        m = Transformer(get_preset("tiny-moe"))
        m.init_weights(seed=0)
        opt = torch.optim.AdamW(m.parameters())
        m(torch.randint(0, 256, (1, 8))).sum().backward()
        opt.step()
        kw = dict(model=m, optimizer=opt, state={}, keep=3, layout=layout, expert_names=set())
        (root / ".step_00000007.tmp-999999999-cd").mkdir(parents=True)  # a killed save of a step not written again
        pc.save(root, step=1, **kw)
        real = checkpoints.save_rng

        def fail_after_the_shards(path):  # DCP has written its shards by now
            real(path)
            with open(path, "r+b") as f:
                f.truncate(8)
            raise OSError(28, "No space left on device (simulated)")

        with monkeypatch.context() as fail, pytest.raises(OSError, match="simulated"):
            fail.setattr(checkpoints, "save_rng", fail_after_the_shards)
            pc.save(root, step=2, **kw)
        names = sorted(p.name for p in root.iterdir())
        assert names == ["step_00000001"], names
        assert checkpoints.latest(root).name == "step_00000001"
        pc.save(root, step=2, **kw)
        assert checkpoints.latest(root).name == "step_00000002"
        assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    finally:
        shutdown()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_link_to_a_pipe_is_refused_before_the_work(tmp_path):
    """`eval --json /dev/stdout` with stdout a pipe: the link resolves to no real path, so the check
    let it through and the write failed after the whole evaluation (renaming a temporary file
    beside 'pipe:[...]'). Now it is refused at once."""
    r, w = os.pipe()
    try:
        with pytest.raises(OutputError, match=r"is not a regular file \(a pipe or a device\)"):
            atomic.check_destination(f"/proc/self/fd/{w}", kind="file")
    finally:
        os.close(r)
        os.close(w)


@contextlib.contextmanager
def file_size_limit():
    """Writes past 64 KiB fail as on a full disk: EFBIG, an OSError naming no file (as ENOSPC does)."""
    import resource
    import signal

    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_write_failing_without_a_file_name_names_the_destination(base, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.txt").write_text("word " * 20_000)  # 100 KB: 200 KB of uint16 tokens
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    for argv, dst in ((["convert", str(base), str(ckpt)], ckpt),
                      (["data", "prepare", str(tmp_path / "src"), "--out", str(data), "--quiet"], data)):
        with file_size_limit():
            assert main(argv) == 1
        # was 'error: File too large' (convert) and 'error: 200002 requested and 65536 written' (data prepare)
        assert capsys.readouterr().err.endswith(f": error: {dst}: File too large\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_destination_no_file_can_be_made_in_is_refused_before_the_work(tmp_path):
    """os.access says yes to root for /proc (and to anyone where the file system alone refuses): `eval --json
    /proc/x.json` scored everything, then failed naming its temporary file. A file is made there first."""
    with pytest.raises(OutputError, match=r"/proc/x\.json: cannot write into /proc"):
        atomic.check_destination("/proc/x.json", kind="file")
    assert atomic.check_destination(tmp_path / "y.json", kind="file") == tmp_path / "y.json"
    assert not [p for p in tmp_path.iterdir()]  # the probe is gone


def test_the_loss_curve_plot_refuses_a_run_with_no_loss_yet(tmp_path):
    """A run yet to log a step (an empty metrics.jsonl) gave an empty chart and exit status 0; a folder
    without metrics.jsonl (a run's hf/ export) said only "[Errno 2] No such file or directory"."""
    pytest.importorskip("matplotlib")
    from mixlab.errors import DataError
    from mixlab.train.plot import plot_loss_curve

    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match=r"metrics.jsonl: no loss recorded yet"):
        plot_loss_curve(tmp_path, tmp_path / "loss.png")
    with pytest.raises(DataError, match=r"hf: no metrics.jsonl in it; expected a run folder of mixlab train"):
        plot_loss_curve(tmp_path / "hf", tmp_path / "loss.png")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
