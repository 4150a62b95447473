"""The import direction of docs/ARCHITECTURE.md: lower layers never import higher ones, the model
never imports torch.distributed, and nothing imports the CLI."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mixlab"

# Each module group may import only groups with a lower or equal rank.
RANK = {
    "config": 0, "errors": 0, "atomic": 0, "dtypes": 0, "pages": 0,
    "ops": 1,
    "model": 2,
    "cache": 2,
    "checkpoint": 3,
    "tokenizer": 3, "corpus": 3,  # corpus: the text reader training, analysis and eval share
    "engine": 4,
    "generate": 4.5, "graphs": 4.5,  # generate: a thin user of the engine
    "analysis": 5, "eval": 5,
    "train": 5.5,  # the trainer's evaluation is mixlab.eval's; analysis and eval never import train
    "parallel": 6, "serve": 6,
    "cli": 7,
}


def _group(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mixlab" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "mixlab":  # `from mixlab import atomic`
            out += [f"mixlab.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:  # `from ..cli import x`: resolved from the file's package
            package = list(path.resolve().relative_to(SRC.parent).parent.parts)[: 1 - node.level or None]
            out.append(".".join(package + ([node.module] if node.module else [node.names[0].name])))
    return out


def test_imports_point_down():
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _group(".".join(rel.parts))
        if me is None or me not in RANK:
            continue
        for mod in _imports(path):
            other = _group(mod)
            if other is None or other == me or other not in RANK:
                continue
            if RANK[other] > RANK[me]:
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "imports against the direction in docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_model_is_single_device():
    for path in list((SRC / "model").rglob("*.py")) + list((SRC / "ops").rglob("*.py")):
        assert not any(m.startswith("torch.distributed") for m in _imports(path)), path


def test_every_module_has_a_known_place():
    groups = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.iterdir()
              if p.suffix == ".py" or p.is_dir()} - {"__init__", "__pycache__", "__main__"}
    assert groups <= set(RANK), f"add {sorted(groups - set(RANK))} to RANK and docs/ARCHITECTURE.md"


def test_rank_holds_no_dead_entries():
    groups = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.iterdir()
              if p.suffix == ".py" or p.is_dir()} - {"__init__", "__pycache__", "__main__"}
    assert set(RANK) <= groups, f"RANK names modules that do not exist: {sorted(set(RANK) - groups)}"


def test_from_mixlab_import_is_checked_too(tmp_path: Path) -> None:
    """`from mixlab import cli` (or `atomic`, as engine/runner.py imports `pages`) named the module
    `mixlab`, which belongs to no group, so such an import escaped the direction check."""
    f = tmp_path / "x.py"
    f.write_text("from mixlab import cli, pages\nfrom mixlab.ops import moe\n")
    assert [_group(m) for m in _imports(f)] == ["cli", "pages", "ops"]


def test_relative_imports_are_checked_too() -> None:
    """`from ..cli import main` in mixlab/eval/x.py was skipped (level > 0), so it escaped the check."""
    f = SRC / "eval" / "_relative_probe.py"  # resolved from its place in the package; never written
    tree_text = "from ..cli import main\nfrom . import data\nfrom .harness import MixlabLM\n"
    import unittest.mock

    with unittest.mock.patch.object(Path, "read_text", return_value=tree_text):
        assert [_group(m) for m in _imports(f)] == ["cli", "eval", "eval"]


def test_architecture_md_lists_every_module_and_only_those() -> None:
    """docs/ARCHITECTURE.md's table names each file (or its folder, `engine/`) of src/mixlab, and
    nothing that is not there: the package's own `__init__.py` (the public API) and `__main__.py`
    were in no row."""
    import re

    table = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text().split("## Modules")[1].split("\n## ")[0]
    named = {n for row in table.splitlines() if row.startswith("| `")
             for n in re.findall(r"`([^`]+)`", row.split(" | ")[0])}
    assert not [n for n in named if not (SRC / n).exists()], "rows name modules that do not exist"
    files = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")]
    covered = [f for f in files if f in named or any(f.startswith(n) for n in named if n.endswith("/"))
               or f.endswith("/__init__.py") and len(f.split("/")) == 2]  # a package's re-exports
    assert sorted(set(files) - set(covered)) == []


def test_every_module_is_named_in_architecture_md():
    """docs/ARCHITECTURE.md names every module: by its path under src/mixlab (`train/loop.py`), or by
    its file name in its folder's row (`analysis/`'s `stats.py`); the CLI's ten modules were named by
    none."""
    import re

    text = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"\| (`[^|]*`) \| (.*) \|$", line):
            rows.update((name, m.group(2)) for name in re.findall(r"`([^`]+)`", m.group(1)))
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in rows or f"`{rel}`" in text or path.name == "__init__.py" or rel == "__main__.py":
            continue  # a package's __init__.py is the package, named by its folder
        if f"`{path.name}`" not in rows.get(rel.rpartition("/")[0] + "/", ""):
            missing.append(rel)
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_architecture_md_states_the_ranks_enforced_here():
    """The import direction docs/ARCHITECTURE.md writes (`a`, `b` ← `c` ← ...) is RANK's order, group
    for group, so the page and the test cannot drift apart."""
    import re

    text = (SRC.parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    line = text.split("## Import direction", 1)[1].strip().split("(ranks in", 1)[0]
    stated = [re.findall(r"`(\w+)`", group) for group in line.split("←")]
    by_rank: dict[float, list[str]] = {}
    for name, rank in RANK.items():
        by_rank.setdefault(rank, []).append(name)
    assert [sorted(g) for g in stated] == [sorted(by_rank[r]) for r in sorted(by_rank)]
