"""The `mixlab` command: a table of subcommands, each a thin wrapper over library functions.

Each module in `MODULES` defines `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on each. Errors become a one-line message, never a traceback, and the exit code
says which kind (the Unix and argparse convention): 2, the command line was wrong (argparse's errors,
a flag's value the command refuses: mixlab.errors.UsageError); 1, the command ran and failed (other
MixlabErrors and ValueErrors: a missing or bad checkpoint, NaN logits; OSError such as a full disk);
130 on Ctrl-C, 141 when the reader of stdout has gone (SIGPIPE).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, NoReturn

from mixlab.errors import NotEnoughMemoryError, UsageError

MODULES = ("mixlab.cli.model", "mixlab.cli.run", "mixlab.cli.upcycle", "mixlab.cli.analyze", "mixlab.cli.train",
           "mixlab.cli.bench", "mixlab.cli.parallel", "mixlab.cli.eval", "mixlab.cli.serve", "mixlab.cli.finetune")


def build_parser() -> argparse.ArgumentParser:
    from mixlab import __version__

    parser = argparse.ArgumentParser(prog="mixlab", description="Mixtral-style sparse MoE models.")
    parser.add_argument("--version", action="version", version=f"mixlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def dtype_choice(*names: str, quant: bool = False) -> Any:
    """argparse type of a --dtype limited to `names`: any spelling mixlab.dtypes knows (bf16, fp32, ...),
    given on as its full name. `quant`: the command's --quant takes int8 / int4, which its error names."""
    def parse(text: str) -> str:
        from mixlab.dtypes import full_name

        name = full_name(text)
        if name not in names:
            hint = (f" (int8 / int4 weights are a quantisation, not a dtype{f': --quant {text}' if quant else ''})"
                    if text in ("int8", "int4") else "")
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}{hint}")
        return name

    return parse


def device_choice(text: str) -> str:
    """argparse type of --device: one mixlab can load onto here (`parse_device`'s check), given on as written."""
    from mixlab.checkpoint import parse_device

    try:
        parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parse(text: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def positive(text: str) -> int:
    """argparse type of an integer >= 1."""
    v = int(_parse(text, int))
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def sampling(name: str, kind: type[int] | type[float]) -> Any:
    """argparse type of a sampling flag (--top-p): the engine's own check of `SamplingParams.<name>` (one
    rule for the CLI, the API and the server), its error naming the flag, not the parameter (top_p=)."""
    def parse(text: str) -> Any:
        from mixlab.engine import SamplingParams

        v = _parse(text, kind)
        try:
            SamplingParams(**{name: v})
        except ValueError as e:  # "invalid top_p=0.0: expected a number in (0, 1] (1 = off)"
            expected = str(e).partition(": expected ")[2].removesuffix(" or None")  # seed: None is no flag
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}" if expected else str(e)) from None
        return v

    return parse


def _finite(text: str) -> float:
    v = float(_parse(text, float))
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def non_negative(text: str) -> float:
    """argparse type of a finite number >= 0 (the error names the flag, not the library's parameter)."""
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type of a fraction in [0, 1)."""
    v = _finite(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return v


def names(text: str) -> list[str]:
    """argparse type of a comma-separated list of names (--domains code,prose): blanks around a name
    are dropped ('code, prose'); an empty name is refused."""
    out = [n.strip() for n in text.split(",")]
    if not all(out):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. code,prose; got {text!r}")
    return out


def say(line: str, file: Any = None) -> None:
    """`line` and its newline on stderr (or `file`) in one write: stderr writes through to the file, so
    print's two writes (the text, then the newline) let another process's line land between them (the
    ranks of a torchrun run share one stderr)."""
    (sys.stderr if file is None else file).write(line + "\n")


def note(command: str, text: str) -> None:
    """A note on stderr, prefixed as warnings and errors are: `mixlab CMD: note: ...`."""
    say(f"mixlab {command}: note: {text}")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """--quiet, as every command that shows progress takes it: no progress bars, progress or speed
    lines (stderr); results, warnings and errors print as without it."""
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, progress or speed lines on stderr (results, warnings and errors still "
                        "print)")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume and --auto-resume, as the training commands take them; `resume_arg` reads them."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--auto-resume", dest="auto_resume", action="store_true",
                   help="continue from the newest checkpoint in --out if it holds one, else start: the same "
                        "command can be rerun as it is (torchrun --max-restarts, a scheduler's requeue)")


def resume_arg(args: argparse.Namespace) -> bool | str:
    """What `train` / `finetune` take as `resume` from `add_resume_args`' flags."""
    return "auto" if args.auto_resume else bool(args.resume)


def user_path(text: str) -> str:
    """argparse type of a file or folder: `~` is the home folder, as a shell expands it in a word of its
    own but not in `--out=~/x` or a quoted '~/x' (and as a config file's paths are read)."""
    return os.path.expanduser(text)


def model_path(text: str) -> str:
    """argparse type of --model where a command runs the model (generate, chat, serve, eval, analyze) and of
    upcycle's --from: `user_path`'s, with a training or fine-tuning run folder taken as its `hf/` export,
    the folder that `sft` / `dpo --model`, `train --init-from`, `convert` and `info` read from a run
    (`checkpoints.resolve_weights`). A run without `hf/`, or one of its `checkpoints/step_*`, stays
    load_model's error, which names the `mixlab convert` command that writes it as a model."""
    from pathlib import Path

    from mixlab.train.checkpoints import is_step, is_training

    path = user_path(text)
    p = Path(path)
    if p.is_dir() and is_training(p) and not is_step(p) and (p / "hf" / "config.json").is_file():
        return os.path.join(path, "hf")  # what the command then names (RUN/hf): the folder it reads
    return path


def adapter_path(text: str) -> str:
    """argparse type of --adapter (generate, chat, serve, eval, convert) and serve's --lora-modules DIR:
    `user_path`'s, with a LoRA fine-tuning run folder (`mixlab sft --lora-rank`) taken as its `adapter/`, as
    `model_path` takes a run as its `hf/`. Anything else is read_adapter's to judge."""
    from pathlib import Path

    path = user_path(text)
    p = Path(path)
    if p.is_dir() and not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        return os.path.join(path, "adapter")
    return path


# Commands that run over torchrun's processes (train; generate --ep) or refuse them with their own
# reason (chat, serve and eval load through generate's `_load`; sft, dpo): any other would run once
# per process, each writing the same output.
TORCHRUN_AWARE = frozenset({"train", "generate", "chat", "serve", "eval", "sft", "dpo"})


PEER_GRACE_S = 10.0  # how long ranks other than 0 wait, on an error, for rank 0 to print it (and the run to end)


def _rank() -> int | None:
    """This process's rank when torchrun started several (`WORLD_SIZE` > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ.get("RANK", "0") or 0)
    return None


def _lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the run has gone (gloo raises
    a RuntimeError naming its transport; torch's own DistError family otherwise)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and (
        "gloo" in text or "Connection closed by peer" in text or "Connection reset by peer" in text))


def _warnings_as_lines(command: str) -> None:
    """mixlab's own warnings print as one line, `mixlab CMD: warning: ...` (not file:line and source)."""
    shown = warnings.showwarning
    if getattr(shown, "mixlab_command", None) is not None:  # installed by an earlier main() in this process
        shown = shown.__wrapped__  # type: ignore[attr-defined]

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if f"{os.sep}mixlab{os.sep}" in filename:
            text = str(message).removeprefix("mixlab: ")  # the line already begins with the command
            say(f"mixlab {command}: warning: {text}", file)
        else:
            shown(message, category, filename, lineno, file, line)

    show.mixlab_command = command  # type: ignore[attr-defined]
    show.__wrapped__ = shown  # type: ignore[attr-defined]
    warnings.showwarning = show


def _exit_interrupted(signum: int, frame: Any) -> None:
    os.write(sys.stderr.fileno(), b"mixlab: interrupted\n")
    os._exit(130)


def _build_parser_interruptible() -> argparse.ArgumentParser:
    """build_parser, which imports the subcommands and so torch: the first seconds of every command,
    where Ctrl-C lands most often. A KeyboardInterrupt raised inside those imports would be a traceback,
    or be swallowed by torch's import of numpy and break it; Ctrl-C there exits at once, as later
    (one line, 130): nothing has been written yet."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return build_parser()
    previous = signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        return build_parser()
    finally:
        signal.signal(signal.SIGINT, previous)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with what argparse leaves out: `mixlab` alone lists the commands (argparse said only
    'the following arguments are required: COMMAND'), and a misspelled command or flag names the
    nearest one. Usage errors exit 2, as argparse's own."""
    from mixlab.config import did_you_mean

    sub = _subparsers(parser)
    assert sub is not None
    if not argv:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    if not argv[0].startswith("-") and argv[0] not in sub.choices:
        # a group's subcommand given alone (`mixlab prepare`: 'data prepare'), or another tool's name for one
        nested = [f"{g} {argv[0]}" for g, p in sub.choices.items() if argv[0] in getattr(_subparsers(p), "choices", {})]
        nested += ["sft", "dpo"] if argv[0] in ("finetune", "fine-tune") else []
        hint = f" (did you mean {' or '.join(map(repr, nested))}?)" if nested else did_you_mean(argv[0], sub.choices)
        parser.error(f"unknown command {argv[0]!r}{hint}; commands: {', '.join(sub.choices)} (mixlab COMMAND "
                     "--help: its flags)")
    command, i = parser, 0  # the command's own parser (data's prepare's) says it, with its usage line
    while (sub := _subparsers(command)) is not None and i < len(argv) and argv[i] in sub.choices:
        command, i = sub.choices[argv[i]], i + 1
    flags = [o for a in command._actions for o in a.option_strings]

    def unrecognized(extra: list[str]) -> NoReturn:
        hints = "".join(did_you_mean(x.split("=")[0], flags) for x in extra if x.startswith("--"))
        command.error(f"unrecognized arguments: {' '.join(extra)}{hints}")

    # before argparse's own checks: `--modle m` is named, not 'the following arguments are required: --model'
    # (a word with a space is a value to argparse, `--prompt "--- x"`; `--` ends the flags)
    words = [x for x in (argv[i:argv.index("--")] if "--" in argv else argv[i:]) if x.startswith("--") and " " not in x]
    if misspelled := [x for x in words if not any(f.startswith(x.split("=")[0]) for f in flags)]:
        unrecognized(misspelled)
    args, extra = parser.parse_known_args(argv)
    if extra:
        unrecognized(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(_build_parser_interruptible(), sys.argv[1:] if argv is None else argv)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))  # data prepare
    _warnings_as_lines(command)
    rank = _rank()
    try:
        if rank is not None and args.command not in TORCHRUN_AWARE:
            raise UsageError(f"torchrun started {os.environ['WORLD_SIZE']} processes, but mixlab {command} runs in "
                             "one (each would do the same work and write the same output): run it without torchrun")
        return int(args.func(args) or 0)
    except ValueError as e:  # MixlabError and the checks of the libraries below
        # Under torchrun every rank checks the same arguments and files and raises the same error:
        # rank 0 prints it, once. The others wait: when rank 0 ends, torchrun stops them (one that ended
        # first got rank 0 stopped before it printed); one still here after the wait raised it alone.
        if rank:
            time.sleep(PEER_GRACE_S)
        where = f"rank {rank}: " if rank else ""
        # load_model's refusal names the API's arguments (quant=, max_memory=): a command says the sizes (those
        # that take --quant / --max-memory name the flags that fit first, in `run.check_memory`)
        told = f"{e.sizes}: it needs a machine with more memory" if isinstance(e, NotEnoughMemoryError) else e
        say(f"mixlab {command}: error: {where}{told}")
        return 2 if isinstance(e, UsageError) else 1
    except RuntimeError as e:
        if rank is None or not _lost_peer(e):
            raise
        cause = next((ln.split("] ", 1)[-1] for ln in str(e).splitlines() if ln.strip()), "")
        say(f"mixlab {command}: error: rank {rank}: another process of the run failed or was stopped "
            f"(see its message; {cause.split('. ')[0][:200]})")
        return 1
    except BrokenPipeError:  # `mixlab info ... | head`: the reader has gone; nothing to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # a shell's code for a process ended by SIGPIPE
    except OSError as e:  # a missing file, no permission, a full disk (ENOSPC), ...: name the file
        where = f"{e.filename}: " if e.filename else ""
        say(f"mixlab {command}: error: {where}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        say(f"mixlab {command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
