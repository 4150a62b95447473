"""The docs and the code agree: every flag README's command table names is one its command takes,
every flag a command takes is named in README.md or docs/*.md, and every Python example runs."""

import argparse
import re
from pathlib import Path

from mixlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])")
COMMANDS = re.compile(r"mixlab ((?:[a-z][a-z-]*\\\|)*[a-z][a-z-]*(?: prepare| check)?)")  # `mixlab a\|b`: both
FOREIGN = {"--tasks", "--nproc-per-node"}  # lm-eval's and torchrun's, in the eval and torchrun rows


def _commands() -> dict[str, set[str]]:
    """Each command ("train", "data prepare"; "" for `mixlab` itself) -> the flags its parser takes."""
    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        out[prefix] = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}

    walk(build_parser(), "")
    return out


def test_readme_command_table_names_only_flags_its_commands_take():
    commands = _commands()
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\| `(mixlab|torchrun) ", line)]
    assert len(rows) > 15
    for row in rows:
        head = row.split(" | ")[0]
        names = COMMANDS.findall(head)
        cmds = [c for name in names for c in name.split("\\|")] or [""]
        taken = set().union(*(commands[c] for c in cmds))
        bad = set(FLAG.findall(row)) - taken - FOREIGN
        assert not bad, f"README's row for {cmds} names {sorted(bad)}, which they do not take"


def test_every_mixlab_command_the_docs_show_takes_the_flags_they_give_it():
    """Each `mixlab CMD ...` of README.md and docs/*.md (code blocks, a line continued by `\\` read as one,
    and inline code; `python -m mixlab CMD`, `torchrun ... -m mixlab CMD` too) names only flags CMD takes:
    a user copies them."""
    commands = _commands()
    said = re.compile(r"\bmixlab ([a-z][a-z-]*(?: prepare)?)((?:(?!\bmixlab\b|\\\||\s\|\s).)*)")  # to a pipe, `a\|b`
    shown, bad = 0, []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = f.read_text()
        blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
        spans = [line for code in blocks for line in code.replace("\\\n", " ").splitlines()]
        spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for span in spans:
            for cmd, rest in said.findall(span):
                if cmd in commands:
                    shown += 1
                    bad += [f"{f.name}: mixlab {cmd} {x}" for x in FLAG.findall(rest) if x not in commands[cmd]]
    assert shown > 100 and not bad, bad


def test_every_command_has_a_row_in_readmes_table():
    """A subcommand added to `mixlab --help` without a row in README's command table was found only by reading."""
    heads = [line.split(" | ")[0] for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    named = {c for head in heads for name in COMMANDS.findall(head)
             for c in name.split("\\|")}
    groups = {c.split()[0] for c in _commands() if " " in c}  # `data`: its subcommands have the rows
    assert set(_commands()) - named - groups - {""} == set()


def test_every_flag_is_documented():
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    named = set(FLAG.findall(docs))
    missing = {c or "mixlab": sorted(flags - named) for c, flags in _commands().items() if flags - named}
    assert not missing, f"flags no doc names: {missing}"


# What the examples name that a test does not have, and what stands in for it.
PATHS = {"path/to/checkpoint": "{ckpt}", "/work/runs/corpus-moe": "{ckpt}", "runs/corpus-moe": "{ckpt}",
         "../shared/corpus": "{corpus}", '"out/"': '"{tmp}/out"', '"report/"': '"{tmp}/report"',
         "/tmp/corpus-moe-init": "{tmp}/init",
         # sizes for a real model, smaller for the tiny one (gpu.md's decoder took 26 s on 2 cores)
         "batch_size=32, max_len=2048": "batch_size=2, max_len=64", "max_new_tokens=128": "max_new_tokens=8"}


def _examples() -> list[tuple[str, str]]:
    """Every ```python block of README.md and docs/*.md but the OpenAI client's (it needs a server;
    test_serve.py drives one with that client): (file, code)."""
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for code in re.findall(r"```python\n(.*?)```", f.read_text(), re.S):
            if "from openai" not in code:
                out.append((f.name, code))
    return out


def test_the_docs_python_examples_run(tmp_path, monkeypatch):
    """Each example runs as written, against a tiny checkpoint with Mixtral's vocabulary (the docs'
    paths replaced by it and by temporary folders, sizes by small ones); a page's examples run in one
    namespace, in order, and those that continue the page's story find its `model` and `prompts`."""
    import json

    import mixlab

    monkeypatch.chdir(tmp_path)
    model = mixlab.Transformer(mixlab.get_preset("tiny-moe").replace(vocab_size=32000))
    model.init_weights(seed=0)
    mixlab.save_model(model, tmp_path / "ckpt")
    for domain in ("prose", "code"):
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        (tmp_path / "corpus" / domain / "valid.jsonl").write_text(
            "".join(json.dumps({"text": f"{domain} document {i}: the cat sat on the mat."}) + "\n" for i in range(3)))
    examples = _examples()
    assert {name for name, _ in examples} >= {"README.md", "gpu.md", "routing.md"}
    pages: dict[str, dict] = {}
    for name, code in examples:
        for old, new in PATHS.items():
            code = code.replace(old, new.format(ckpt=tmp_path / "ckpt", corpus=tmp_path / "corpus", tmp=tmp_path))
        page = pages.setdefault(name, {"mixlab": mixlab, "model": model.eval(), "prompts": [[1, 415], [1, 22557]]})
        try:
            exec(compile(code, f"<{name} example>", "exec"), page)
        except Exception as e:
            raise AssertionError(f"{name}'s example failed:\n{code}") from e


def test_the_public_api_has_docstrings():
    """`help()` says something for each class and function mixlab and mixlab.engine export (and
    KVCache, which README's decoding loop takes), and their public methods: Transformer, get_preset,
    KVCache, Tokenizer.encode and Engine.start had none, and ModelConfig showed only the signature a
    dataclass gets."""
    import inspect

    import mixlab
    import mixlab.engine
    from mixlab.cache import KVCache

    objs = [(n, getattr(mod, n)) for mod in (mixlab, mixlab.engine) for n in mod.__all__] + [("KVCache", KVCache)]
    missing = []
    for name, obj in objs:
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = (obj.__doc__ or "").strip()
        if not doc or doc.startswith(f"{obj.__name__}("):
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{m}" for m, f in vars(obj).items()
                        if not m.startswith("_") and inspect.isfunction(f) and not f.__doc__]
    assert not missing, f"no docstring: {missing}"


def test_every_command_that_shows_progress_takes_quiet():
    """--quiet was eval's and analyze's only; train, sft, dpo, data prepare and bench had no way to stop theirs."""
    commands = _commands()
    assert not [c for c in ("train", "sft", "dpo", "data prepare", "eval", "analyze", "bench", "convert", "upcycle")
                if "--quiet" not in commands[c]]


def test_convert_of_a_bytes_model_to_gguf_names_a_flag_that_exists(tmp_path, capsys):
    """The refusal said 'train with --tokenizer mixtral', a flag `mixlab train` does not take: the
    tokenizer is chosen when the data is prepared (`mixlab data prepare --tokenizer`)."""
    import pytest

    pytest.importorskip("gguf")
    import mixlab
    from mixlab.cli import main

    model = mixlab.Transformer(mixlab.get_preset("tiny-moe").replace(vocab_size=259))
    mixlab.save_model(model, tmp_path / "hf")
    (tmp_path / "hf" / "mixlab_data.json").write_text('{"tokenizer": {"type": "bytes"}}')
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"), "--quiet"]) == 1
    err = capsys.readouterr().err
    flags = re.findall(r"`mixlab (data prepare) (--[a-z-]+)", err)
    assert flags and all(flag in _commands()[cmd] for cmd, flag in flags), err


def test_scaling_md_plans_are_what_mixlab_plan_prints(capsys):
    """docs/scaling.md shows `mixlab plan`'s output under each command it ran; a change to the
    counts or the layout's bytes must change the page too."""
    from mixlab.cli import main

    plans = re.findall(r"### `mixlab plan ([^`]*)`\s*```\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(), re.S)
    assert len(plans) >= 5
    for args, shown in plans:
        assert main(["plan", *args.split()]) == 0
        assert capsys.readouterr().out.strip() == shown.strip(), f"docs/scaling.md: mixlab plan {args}"


def test_the_files_the_docs_link_or_name_exist():
    """Every relative link of README.md and docs/*.md, and every repository path they name in code
    (`src/mixlab/...`, `tests/...`, `benchmarks/...`, `experiments/...`, `scripts/...`, `docs/...`), is there."""
    missing = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = f.read_text()
        links = [f.parent / m for m in re.findall(r"\]\(([^)#\s]+)", text) if not m.startswith("http")]
        paths = [ROOT / m.split("::")[0] for m in
                 re.findall(r"`((?:src/mixlab|tests|benchmarks|experiments|scripts|docs)/[\w./-]*\w)", text)]
        missing += [f"{f.name}: {p.relative_to(ROOT)}" for p in links + paths if not p.exists()]
    assert not missing, missing


def _slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but `-` and `_` dropped, spaces
    as `-`, a repeated one suffixed `-1`, `-2`, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_the_sections_the_docs_link_exist():
    """A link to a section (`commands.md#serve-serve`, `#module-details`) names a heading of its page:
    README's command table links each row to docs/commands.md's section, and a renamed heading broke
    the link silently. BENCHMARKS.md's summary links the sections that hold its numbers."""
    broken, checked = [], 0
    for f in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", f.read_text()):
            if target.startswith("http") or (target and not target.endswith(".md")):
                continue
            page = f.parent / target if target else f
            checked += 1
            if anchor not in _slugs(page.read_text()):
                broken.append(f"{f.name}: {target}#{anchor}")
    assert checked > 25 and not broken, broken


def test_training_md_config_example_and_demo_model_are_what_the_code_builds(tmp_path):
    """docs/training.md's TOML example is a run config `mixlab train` takes, giving the model it
    describes; the defaults it names are `TrainConfig`'s; the demo's model has the shape and parameter
    counts the page quotes."""
    from types import SimpleNamespace

    from mixlab.train import demo
    from mixlab.train.loop import TrainConfig, build_model_config, load_train_config

    text = (ROOT / "docs" / "training.md").read_text()
    bytes_data = SimpleNamespace(vocab_size=259, bos_id=1, eos_id=2)  # the byte tokenizer's
    toml = re.search(r"```toml\n(.*?)```", text, re.S)
    assert toml
    (tmp_path / "run.toml").write_text(toml.group(1))
    mc = build_model_config(load_train_config(tmp_path / "run.toml"), bytes_data)  # type: ignore[arg-type]
    assert mc.moe and (mc.dim, mc.n_layers, mc.moe.num_experts, mc.moe.top_k) == (128, 4, 8, 2)
    defaults = re.search(r"`model` the\s+`([^`]+)` preset, `out` the folder `([^`]+)`", text)
    assert defaults and defaults.groups() == (TrainConfig.model, TrainConfig.out)

    said = re.search(r"trains a\s+(\d)-layer, (\d)-expert top-(\d) MoE \(dim (\d+), FFN (\d+), ([\d.]+)M parameters,"
                     r"\s+([\d.]+)M active per token\)", text)
    assert said, "docs/training.md's demo sentence moved: update this test"
    mc = build_model_config(TrainConfig(model="tiny-moe", model_overrides=demo.DEMO_MODEL), bytes_data)  # type: ignore[arg-type]
    counts = mc.param_counts()
    assert mc.moe
    assert [int(x) for x in said.groups()[:5]] == [mc.n_layers, mc.moe.num_experts, mc.moe.top_k, mc.dim, mc.ffn_dim]
    assert (float(said[6]), float(said[7])) == (round(counts["total"] / 1e6, 2), round(counts["active"] / 1e6, 2))


def test_upcycling_md_setup_numbers_are_the_experiments():
    """docs/upcycling.md's setup (parameter counts, FLOPs per token, their ratio, arm (b)'s steps) is
    what experiments/upcycle.py's `Settings` and `flops_per_token` give."""
    import importlib.util
    import sys

    from mixlab.config import ModelConfig, MoEConfig

    spec = importlib.util.spec_from_file_location("upcycle_experiment", ROOT / "experiments" / "upcycle.py")
    assert spec and spec.loader
    exp = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = exp  # its dataclasses look their module up
    try:
        spec.loader.exec_module(exp)
    finally:
        del sys.modules[spec.name]
    s = exp.Settings()
    dense = ModelConfig(vocab_size=259, max_seq_len=s.seq_len, rope_theta=1e4, moe=None, **s.model)
    moe = dense.replace(moe=MoEConfig(num_experts=s.experts, top_k=s.top_k))
    fd, fm = exp.flops_per_token(dense), exp.flops_per_token(moe)
    text = (ROOT / "docs" / "upcycling.md").read_text()
    for quoted in (f"{dense.param_counts()['total']:,} parameters", f"({moe.param_counts()['total']:,} parameters)",
                   f"Dense:\n  {fd / 1e6:.2f} MFLOPs/token; MoE: {fm / 1e6:.2f} MFLOPs/token (×{fm / fd:.2f})",
                   f"{round(s.extra_dense_steps * fd / fm)} steps, the same"):
        assert quoted in text, f"docs/upcycling.md does not say {quoted!r}"
