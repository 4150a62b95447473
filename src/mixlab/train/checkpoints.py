"""Crash-safe training checkpoints: model, optimizer, RNG and run state, without pickle.

A checkpoint is a folder `<run>/checkpoints/step_XXXXXXXX/`:

    model.safetensors       the model's own parameter names (`layers.0.ffn.experts.w13`, ...)
    optimizer.safetensors   the optimizer state flattened to `state.<param name>.<key>` tensors
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, configs, data position, optimizer hyperparameters, and the byte
                            size of every file above (the completeness check)

    .mixlab-manifest.json   every file's size and SHA-256, verified before a resume

It is written through mixlab.atomic (a temporary `.step_XXXXXXXX.tmp-PID-*` renamed into place only
after every file is written and fsynced), so a crash or SIGKILL mid-save leaves at worst a temporary
folder, which the next save removes (`remove_leftovers`), never a half-written `step_` folder, and the
previous checkpoint stays loadable. A checkpoint whose bytes changed after the save (same size, other content) fails its
checksum. `torch.save` is never used: optimizer state goes through safetensors + JSON, so loading
runs no pickle.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mixlab import atomic
from mixlab.atomic import atomic_folder, read_manifest, verify
from mixlab.checkpoint import _refuse_pickle_or_recover, hub_hint, load_model, meta_model, plan
from mixlab.checkpoint.io import CheckpointError, TensorInfo, TensorReader, all_finite, read_header, write_safetensors
from mixlab.checkpoint.keymaps import Rule
from mixlab.config import ConfigError, ModelConfig, MoEConfig, suffix_of
from mixlab.corpus import TrainTokenizer, get_tokenizer
from mixlab.errors import DataError
from mixlab.model import Transformer

STEP_RE = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_safetensors(path, sorted(tensors.items()), {"format": "pt"})


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's own order (its state is indexed by position over
    the parameter groups, which differs from `named_parameters` order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as (tensors named `state.<param name>.<key>`, JSON-able rest); `names` in the
    optimizer's order (`optimizer_param_names`)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{names[idx]}.{key}"] = v
            else:
                scalars.setdefault(names[idx], {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "param_names": names}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if sorted(info["param_names"]) != sorted(names):
        raise CheckpointError("the optimizer state in the checkpoint is for different parameters "
                              "(the model's parameter list changed)")
    # Positions as saved (checkpoints before the names followed the optimizer's order are read right too).
    index = {n: i for i, n in enumerate(info["param_names"])}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        _, rest = k.split(".", 1)
        name, key = rest.rsplit(".", 1)
        state.setdefault(index[name], {})[key] = v
    for name, d in info["scalars"].items():
        state.setdefault(index[name], {}).update(d)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders under `root`, oldest first (temporary `.tmp-` folders excluded)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)), key=lambda p: p.name)


def before_it(root: Path) -> str:
    """A non-finite step's stop message's last sentence: where a resume starts from (it said "the newest
    checkpoint ... is from before it" before any had been written)."""
    if list_checkpoints(root):
        return f"The newest checkpoint in {root} is from before it"
    return f"No checkpoint has been written yet (none in {root})"


def validate(ckpt: Path, *, checksums: bool = True) -> dict[str, Any]:
    """Read `state.json` and check every file it lists is present and complete (and, with `checksums`,
    their SHA-256: every byte read); returns the state."""
    sf = ckpt / "state.json"
    if not sf.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no state.json)")
    try:
        state: dict[str, Any] = json.loads(sf.read_text(encoding="utf-8"))
        sizes = state["files"]
        if not (isinstance(sizes, dict) and all(type(n) is int for n in sizes.values())):  # 5: an AttributeError
            raise TypeError("'files' must map file names to byte counts")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{sf}: corrupt checkpoint state ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{sf}: corrupt checkpoint state (JSON nested too deeply)") from None
    for name, size in sizes.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint ({name} is missing)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint ({name} has {f.stat().st_size} bytes, "
                                  f"state.json says {size})")
        read_header(f)
    if checksums and read_manifest(ckpt) is not None:  # checkpoints from before manifests have sizes only
        verify(ckpt)
    return state


def latest(root: Path) -> Path | None:
    """The newest checkpoint folder, validated. A damaged newest checkpoint is an error, not a reason
    to silently go back further: the message says which folder to remove to resume from the previous."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    try:
        validate(ckpts[-1])
    except CheckpointError as e:
        prev = f"; remove it to resume from {ckpts[-2].name}" if len(ckpts) > 1 else ""
        raise CheckpointError(f"{e}{prev}") from None
    return ckpts[-1]


def to_resume(out: Path, resume: bool | str) -> Path | None:
    """The checkpoint a run into `out` continues from: the newest in `out/checkpoints` (validated, as
    `latest`) when `resume` is True, or "auto" and there is one; None to start afresh. Starting over
    checkpoints, or resuming without one, is an error."""
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ValueError(f"invalid resume={resume!r}: expected True, False or 'auto'")
    root = out / "checkpoints"
    newest = latest(root)
    if resume is True and newest is None:
        raise CheckpointError(f"{root}: no checkpoint to resume from")
    if resume is False and list_checkpoints(root):
        raise CheckpointError(f"{out} already holds checkpoints; pass --resume to continue that run, "
                              "or choose another --out")
    return newest if resume else None


def save_rng(path: Path) -> None:
    """The random generators' states: the CPU's and, where CUDA is in use, the current GPU's (router
    jitter draws there), each process's alike (every process seeds them alike and draws alike)."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    _save(rng, path)


def load_rng(path: Path) -> None:
    rng = load_file(str(path))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


def remove_leftovers(root: Path) -> None:
    """Delete the temporaries under `root` of saves whose process is gone, whatever their step.
    mixlab.atomic cleans only those of the name it writes, and a save killed at a step no later
    save repeats (the checkpoint of a signal's stop at step 7, killed by torchrun's shutdown timeout,
    resumed from step 5 with checkpoints every 5) left a temporary as large as a checkpoint for good."""
    for p in root.glob(".tmp-step_*"):  # the scheme before mixlab.atomic (one writer per run)
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step_*.tmp-*"):  # `.step_XXXXXXXX.tmp-PID-*`: removed where PID is gone
        atomic.remove_leftovers(root / p.name[1:].partition(".tmp-")[0])


def save(
    root: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically under `root`, then delete all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    name = f"step_{step:08d}"
    # Re-saving the same step (e.g. a signal right after a periodic save) replaces our own folder.
    with atomic_folder(root / name, kind="training-checkpoint", checksums=True, overwrite=True) as tmp:
        names = optimizer_param_names(model, optimizer)
        # Tied parameters appear once in named_parameters; state_dict holds both names.
        _save({n: p for n, p in model.named_parameters()}, tmp / "model.safetensors")
        opt_tensors, opt_info = flatten_optimizer(optimizer, names)
        _save(opt_tensors, tmp / "optimizer.safetensors")
        save_rng(tmp / "rng.safetensors")
        full = {**state, "step": step, "optimizer": opt_info,
                "files": {f: (tmp / f).stat().st_size for f in FILES}}
        (tmp / "state.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


# Parameter names of earlier mixlab versions, as (pattern, replacement): before the Experts module
# the expert weights lived on the MoE block itself (`layers.0.ffn.w13`, now `layers.0.ffn.experts.w13`).
_LEGACY = [(re.compile(r"^(layers\.\d+\.ffn)\.(w13|w2)$"), r"\1.experts.\2")]


def _legacy_names(saved: Iterable[str], params: dict[str, Any]) -> dict[str, str]:
    """Old name -> current name for each saved name the model lacks under that name but has renamed."""
    out = {}
    for n in saved:
        if n in params:
            continue
        for pat, repl in _LEGACY:
            new = pat.sub(repl, n)
            if new != n and new in params:
                out[n] = new
    return out


def _rename_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any],
                      rename: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    def key(k: str) -> str:
        _, rest = k.split(".", 1)
        name, field = rest.rsplit(".", 1)
        return f"state.{rename.get(name, name)}.{field}"

    info = {**info, "param_names": [rename.get(n, n) for n in info["param_names"]],
            "scalars": {rename.get(n, n): d for n, d in info["scalars"].items()}}
    return {key(k): v for k, v in tensors.items()}, info


def load(ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         checksums: bool = True) -> dict[str, Any]:
    """Load weights, optimizer and RNG state from `ckpt` into the given objects; returns state.json.
    `checksums=False` where the caller has just verified them (`to_resume`: a resume hashes once)."""
    state = validate(ckpt, checksums=checksums)
    if state.get("format") == "dcp":
        _load_dcp(ckpt, model, optimizer)
        return state
    weights = load_file(str(ckpt / "model.safetensors"))
    params = dict(model.named_parameters())
    rename = _legacy_names(weights, params)
    weights = {rename.get(n, n): w for n, w in weights.items()}
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))[:5]
        raise CheckpointError(f"{ckpt}: model parameters differ from this model's: {', '.join(diff)}")
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise CheckpointError(f"{ckpt}: {n} has shape {list(weights[n].shape)}, the model expects "
                                      f"{list(p.shape)}")
            p.copy_(weights[n])
    if optimizer is not None:
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
        if rename:
            opt_tensors, state["optimizer"] = _rename_optimizer(opt_tensors, state["optimizer"], rename)
        optimizer.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"],
                                                      optimizer_param_names(model, optimizer)))
    load_rng(ckpt / "rng.safetensors")
    return state


# -- starting a run from existing weights --------------------------------------------------------


def _step_config(state: dict[str, Any], where: Path) -> ModelConfig:
    if "model_config" not in state and "finetune_config" in state:
        raise CheckpointError(f"{where}: a fine-tuning checkpoint (it holds only the parameters that run trained, "
                              "e.g. LoRA factors), not a model to start from; start from that run's hf/ export "
                              "(written when it finishes; a LoRA run writes it with --merge, a finished one with "
                              "its command again plus --resume --merge), or continue it with --resume")
    try:
        d = dict(state["model_config"])
        moe = d.pop("moe", None)
        mc = ModelConfig.from_hf_dict(d, source=str(where / "state.json"))
        return mc.replace(moe=MoEConfig(**moe) if moe else None)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}/state.json: no usable model_config ({e})") from None


def resolve_weights(path: str | Path) -> Path:
    """The folder holding the weights `init_from` names: a checkpoint folder (transformers or Mistral
    format, e.g. an upcycled model), a training checkpoint `step_*` folder, or a run folder (its
    final `hf/` export, else its newest checkpoint)."""
    p = Path(path)
    if p.is_file():  # it said 'no such checkpoint folder' of a file that is there
        gguf = suffix_of(p) == ".gguf"
        hint = f": `mixlab convert {p} DIR` writes it as one (Q4_0 matrices dequantised)" if gguf else ""
        raise CheckpointError(f"{p}: a file; training starts from a checkpoint folder{hint}")
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder{hub_hint(p)}")
    if (p / "config.json").is_file() or (p / "params.json").is_file() or (p / "state.json").is_file():
        return p
    if (p / "hf" / "config.json").is_file():
        return p / "hf"
    newest = latest(p / "checkpoints")
    if newest is not None:
        return newest
    if (p / "adapter_config.json").is_file():
        ModelConfig.from_dir(p)  # raises, saying what a LoRA adapter folder is and where its merged model is
    raise CheckpointError(f"{p}: not a checkpoint folder (no config.json, params.json or state.json) "
                          "nor a run folder (no hf/ export or checkpoints/step_*)")


def trained_tokenizer(path: str | Path) -> tuple[TrainTokenizer, dict[str, Any]] | None:
    """The tokenizer the checkpoint `path` names (see `resolve_weights`): a training checkpoint's data
    (a run stopped before hf/), the `mixlab_data.json` of a mixlab export (a step folder's run's too),
    else a tokenizer file in the folder, with its spec as recorded; None where it names none."""
    root = resolve_weights(path)
    if is_step(root):
        data = validate(root, checksums=False).get("data")
        if isinstance(data, dict) and isinstance(data.get("tokenizer"), dict):
            return get_tokenizer(data["tokenizer"]), data["tokenizer"]
    for f in (root / "mixlab_data.json", root.parent.parent / "hf" / "mixlab_data.json"):
        if f.is_file() and (f.parent == root or is_step(root)):
            try:
                spec = json.loads(f.read_text(encoding="utf-8"))["tokenizer"]
                return get_tokenizer(spec), spec
            except (ValueError, KeyError, TypeError, RecursionError) as e:  # damaged or hand-written: name the file
                raise DataError(f"{f}: no readable 'tokenizer' entry ({e}); fix it, or pass --tokenizer") from None
    for name in ("tokenizer.model", "tokenizer.json"):
        if (root / name).is_file():
            tok = get_tokenizer(str(root / name))
            return tok, tok.spec()
    return None


def is_step(p: Path) -> bool:
    """Whether folder `p` is a training checkpoint (`state.json`, no `config.json`)."""
    return (p / "state.json").is_file() and not (p / "config.json").is_file()


def is_training(p: Path) -> bool:
    """Whether folder `p` is a training checkpoint or a run folder rather than a model checkpoint: what
    `mixlab convert` and `info` read through `resolve_weights` (as `--init-from` does)."""
    if (p / "config.json").is_file() or (p / "params.json").is_file():
        return False
    return (p / "state.json").is_file() or (p / "hf" / "config.json").is_file() or (p / "checkpoints").is_dir()


def data_file(fingerprint: dict[str, Any]) -> dict[str, str]:
    """`mixlab_data.json` of an export: the tokenizer and domains of the data a model was trained on
    (`mixlab generate` takes its tokenizer from it), from the dataset's fingerprint a checkpoint stores."""
    domains = sorted({d for split in fingerprint["splits"].values() for d in split})
    info = {"tokenizer": fingerprint["tokenizer"], "domains": domains}
    return {"mixlab_data.json": json.dumps(info, indent=2) + "\n"}


def describe_step(ckpt: Path) -> str:
    """What a training checkpoint holds (`mixlab info`): its files' sizes and headers checked, not their
    checksums (which read every byte, as a resume does)."""
    state = validate(ckpt, checksums=False)
    sharded = f", written by {state.get('world')} processes" if state.get("format") == "dcp" else ""
    sizes = state["files"]
    return (f"training checkpoint of step {state.get('step')}{sharded}: {len(sizes)} files, "
            f"{sum(sizes.values()):,} bytes (float32 weights, optimizer state, RNG)")


def init_config(path: str | Path) -> ModelConfig:
    """The model config of the weights `path` names (see `resolve_weights`)."""
    p = resolve_weights(path)
    if is_step(p):
        return _step_config(validate(p, checksums=False), p)  # load_init reads (and checks) every byte
    try:
        return ModelConfig.from_dir(p)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _step_weights(p: Path, params: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """The tensors of a one-process training checkpoint's model.safetensors, checked against the
    model's parameters (`params`, possibly on the meta device) by name and shape, from the header."""
    infos = read_header(p / "model.safetensors")
    if set(infos) != set(params):
        diff = sorted(set(infos) ^ set(params))[:5]
        raise CheckpointError(f"{p}: parameters differ from the model's: {', '.join(diff)}")
    for n, t in params.items():
        if infos[n].shape != tuple(t.shape):
            raise CheckpointError(f"{p}: {n} has shape {list(infos[n].shape)}, the model expects {list(t.shape)}")
    return infos


def load_init(path: str | Path, config: ModelConfig) -> Transformer:
    """A float32 model of `config` holding the weights `path` names (see `resolve_weights`). `config`
    may differ from the stored one in training-only fields (MoE loss coefficients, jitter, capacity);
    a different shape is an error naming the tensor."""
    p = resolve_weights(path)
    if is_step(p):
        model = Transformer(config)
        if validate(p).get("format") == "dcp":  # written by a sharded run
            _load_dcp(p, model, None)
            return model
        params = dict(model.named_parameters())
        _step_weights(p, params)
        weights = load_file(str(p / "model.safetensors"))
        with torch.no_grad():
            for n, t in params.items():
                t.copy_(weights[n])
        return model
    return load_model(p, config=config, dtype=torch.float32)


# A piece of a weight: the tensor holding it and which part of the whole weight it is (`slice`s with
# explicit bounds, one per dimension), e.g. one process's experts and FSDP rows.
Piece = tuple[torch.Tensor, tuple[slice, ...]]


def load_init_pieces(path: str | Path, config: ModelConfig, pieces: dict[str, Piece],
                     sharded: Callable[[], dict[str, torch.Tensor]]) -> None:
    """`load_init` for a model split over processes, without the whole model: each `pieces[name] =
    (dest, index)` gets `whole[index]` of weight `name` (as `load_init` converts it), read straight
    from the files, only the elements it holds wherever the file's tensor is a run of the whole
    weight (every format's, but the Mistral format's rotary q / k rows: those tensors are read whole,
    one at a time). A checkpoint written by a sharded run is read by torch.distributed.checkpoint
    into `sharded()`, the model's global view (`parallel.checkpoint`), which reads only this
    process's pieces. The checks and errors are `load_init`'s."""
    p = resolve_weights(path)
    if is_step(p):
        if validate(p).get("format") == "dcp":
            dcp_load(sharded(), p)
            return
        meta = meta_model(config)
        params = dict(meta.named_parameters())
        infos = _step_weights(p, params)
        table = [Rule(n, (n,), tuple(t.shape), (tuple(t.shape),), lambda t: [t]) for n, t in params.items()]
    else:
        _refuse_pickle_or_recover(p)
        _, table, infos = plan(p, config)
    read_pieces(p, table, infos, pieces)


def read_pieces(root: Path, table: list[Rule], infos: dict[str, TensorInfo], pieces: dict[str, Piece]) -> None:
    """Fill each `pieces[name] = (dest, index)` with `whole[index]` of weight `name` of the checkpoint
    at `root` as `plan` matched it (`table`, `infos`), converted to `dest`'s dtype as `load_model`
    converts, each read as `load_init_pieces` says (the elements it holds only, NaN / Inf told)."""
    if set(pieces) - {r.ours for r in table}:
        raise ValueError(f"no weight {sorted(set(pieces) - {r.ours for r in table})[0]!r} in {root}")
    with TensorReader(infos) as reader, torch.no_grad():
        for r in table:
            if r.ours in pieces:
                _read_piece(reader, r, *pieces[r.ours])


def _runs(shape: tuple[int, ...], index: tuple[slice, ...]) -> list[tuple[int, int]]:
    """The ranges of flat (row-major) element positions that `whole[index]` is made of, in order."""
    bounds = [(s.start, s.stop) for s in index]
    k = len(shape)
    while k and bounds[k - 1] == (0, shape[k - 1]):  # whole trailing dimensions: one run per outer index
        k -= 1
    if k == 0:
        return [(0, math.prod(shape))]
    inner, (lo, hi) = math.prod(shape[k:]), bounds[k - 1]
    strides = [math.prod(shape[j + 1:]) for j in range(k - 1)]
    return [(base + lo * inner, base + hi * inner)
            for idx in itertools.product(*(range(a, b) for a, b in bounds[:k - 1]))
            for base in [sum(i * s for i, s in zip(idx, strides, strict=True))]]


def _read_piece(reader: TensorReader, r: Rule, dest: torch.Tensor, index: tuple[slice, ...]) -> None:
    """dest := the whole tensor of rule `r`, indexed by `index` (see `load_init_pieces`)."""
    views = r.parts(torch.empty(r.shape, device="meta"))  # where each file tensor lies in the whole one
    buf = dest if dest.is_contiguous() and dest.device.type == "cpu" else torch.empty(dest.shape, dtype=dest.dtype)
    if all(v.is_contiguous() for v in views):  # each file tensor a run of the whole: read what overlaps
        flat, at = buf.view(-1), 0
        for start, stop in _runs(r.shape, index):
            for name, v in zip(r.theirs, views, strict=True):
                first = int(v.storage_offset())
                lo, hi = max(start, first), min(stop, first + v.numel())
                if lo < hi:
                    reader.read_into(name, flat[at + lo - start: at + hi - start], offset=lo - first)
            at += stop - start
    else:
        whole = torch.empty(r.shape, dtype=dest.dtype)
        for name, v in zip(r.theirs, r.parts(whole), strict=True):
            reader.read_into(name, v)
        buf.copy_(whole[index])
        del whole
    if not all_finite(buf):
        warnings.warn(f"{reader.infos[r.theirs[0]].file}: tensor {r.ours!r} ({', '.join(r.theirs[:2])}"
                      f"{', ...' if len(r.theirs) > 2 else ''}) holds NaN or Inf values; the model's outputs will "
                      "be NaN", stacklevel=4)
    if buf is not dest:
        dest.copy_(buf)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's optimizer state (as the first step would) without changing any
    parameter: one step with learning rate 0 and zero gradients. A checkpoint is then loaded into
    that state in place (torch.distributed.checkpoint loads into existing tensors)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def dcp_load(sd: dict[str, torch.Tensor], ckpt: Path, **kw: Any) -> None:
    """`torch.distributed.checkpoint.load` of `ckpt` into `sd`, in place. A failure is a
    CheckpointError naming the folder and the first rank's cause (DCP raises CheckpointException,
    a BaseException, which `except Exception` lets through as a traceback)."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading on purpose (no_dist), not a mistake to warn about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt)), **kw)
    except (Exception, dcp.CheckpointException) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) and e.failures else e
        raise CheckpointError(f"{ckpt}: cannot load into this model ({str(cause).splitlines()[0][:300]})") from None


def _load_dcp(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A checkpoint written by a sharded run (mixlab.parallel.checkpoint: torch.distributed.checkpoint's
    safetensors files, each piece with its offset) read whole into this single-process model."""

    sd: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        init_optimizer_state(optimizer)
    for name, p in model.named_parameters():
        sd[name] = p.detach()
        for key, v in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
            if isinstance(v, torch.Tensor):
                sd[f"state.{name}.{key}"] = v
    dcp_load(sd, ckpt, no_dist=True)
    if optimizer is not None:  # resuming, not only taking the weights
        load_rng(ckpt / "rng.safetensors")
