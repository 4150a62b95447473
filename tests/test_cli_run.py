"""`mixlab generate` and `mixlab chat` through `mixlab.cli.main`, on a tiny random checkpoint
(gibberish text, but every token equals what the library produces)."""

from __future__ import annotations

import errno
import io
import re

import pytest
import torch

from mixlab import generate, load_model, load_tokenizer, save_model
from mixlab.cli import main
from mixlab.config import get_preset
from mixlab.errors import CheckpointError, UsageError
from mixlab.model import Transformer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32000, max_seq_len=128))
    model.init_weights(std=0.3, seed=0)
    save_model(model, path)
    return path


def test_generate_streams_the_library_output(tiny_dir, capsys):
    threads = torch.get_num_threads()
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Bonjour, le monde", "--max-new-tokens", "12",
               "--threads", "1", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0 and torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour, le monde")
    ids = generate(load_model(tiny_dir), [prompt], max_new_tokens=12)[0]
    ids = [i for i in ids if i != tok.eos_id]
    assert out == tok.decode(prompt + ids)[len(tok.decode(prompt)) :] + "\n"
    assert f"prompt: {len(prompt)} tokens in" in err and "tokens/s" in err and "decode:" in err


def test_speculative_tokens_print_the_same_text(tiny_dir, capsys):
    # greedy decoding with drafts verified in one pass: the same text, as generate and chat print it
    text = "def f(x): return x + 1\ndef g(x): return x + 2\ndef h(x): return"
    args = ["--model", str(tiny_dir), "--prompt", text, "--max-new-tokens", "30", "--dtype", "float32"]
    assert main(["generate", *args]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *args, "--speculative-tokens", "4"]) == 0
    assert capsys.readouterr().out == plain


def test_stop_strings_end_the_printed_text_before_them(tiny_dir, capsys, monkeypatch):
    # as the server (OpenAI) does: the text printed, and the reply chat keeps, ended with the token that
    # completed the stop string, so the stop string and the rest of that token were printed and kept
    args = ["--model", str(tiny_dir), "--max-new-tokens", "12", "--dtype", "float32", "--temperature", "0"]
    assert main(["generate", "--prompt", "Bonjour", *args]) == 0
    full = capsys.readouterr().out
    stop = full[4:7]
    assert main(["generate", "--prompt", "Bonjour", *args, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"

    import mixlab.cli.run as run

    seen: list[list[int]] = []
    real = run.generate_stream
    monkeypatch.setattr(run, "generate_stream", lambda model, prompts, **kw: seen.append(prompts[0]) or
                        real(model, prompts, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    assert main(["chat", *args]) == 0
    reply = capsys.readouterr().out.split("\n")[0]
    stop = reply[3:5]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    assert main(["chat", *args, "--stop", stop]) == 0
    kept = reply[: reply.index(stop)]
    assert capsys.readouterr().out.split("\n")[0] == kept  # piped input: no "> " prompt
    tok = load_tokenizer()
    assert seen[-1] == tok.encode_chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": kept},
                                        {"role": "user", "content": "Again"}])


def test_generate_sampling_is_seeded(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-tokens", "10", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7",
            "--presence-penalty", "0.5", "--frequency-penalty", "0.3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_stop_reads_escapes_as_llama_cpp_does() -> None:
    # `--stop '\n'` (a backslash and an n from the shell) matched only that text, never a new line
    from mixlab.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--stop", "\\n",
                                      "--stop", "a\\tb\\\\n\\r", "--stop", "\\x"])
    assert args.stop == ["\n", "a\tb\\n\r", "\\x"]


@pytest.mark.parametrize("flags,message", [
    # the sampling flags' errors named the library's parameter (temperature=-1.0), after loading the model
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0 (0 = greedy), got -1"),
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1] (1 = off), got 0"),
    (["--top-k", "-2"], "argument --top-k: expected an integer >= -1 (0 or -1 = off), got -2"),
    (["--min-p", "nan"], "argument --min-p: expected a finite number, got nan"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: expected a number > 0 (1 = off), got 0"),
    (["--seed", str(2**64)], f"argument --seed: expected an integer in [-2**63, 2**64), got {2**64}"),
    (["--stop", ""], "argument --stop: expected a non-empty string"),
    (["--speculative-tokens", "-1"], "argument --speculative-tokens: expected an integer >= 0 (0 = off), got -1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got 0"),
    (["--max-new-tokens", "127", "--prompt", "a b c"],
     "the prompt has 4 tokens; with --max-new-tokens 127 that needs 131 positions but the model's context is 128 "
     "(--truncate keeps"),
    (["--max-new-tokens", "128"], "--max-new-tokens 128 leaves no room for a prompt in the model's context of 128"),
    # a default told as if it had been passed ("with --max-new-tokens 64", of a command line without it)
    (["--prompt", "a " * 300], "with --max-new-tokens 64 (its default here) that needs"),
    (["--dtype", "int3"], "argument --dtype: expected one of auto, float32, bfloat16, float16, got 'int3'"),
    # it listed the float dtypes alone
    (["--dtype", "int8"], "int8 / int4 weights are a quantisation, not a dtype: --quant int8"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'; expected cpu, cuda or cuda:N"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--int4-activations", "float32"], "--int4-activations float32 applies to int4 weights: pass --quant int4 too"),
    # the expert cache's budget, checked as the model loads and in its final format: said of max_memory
    (["--max-memory", "1KB"], "--max-memory 1.00 KB cannot hold one token's top-2 experts in any format"),
    (["--max-memory", "50KB"], "--max-memory 50.00 KB holds 1 experts of 49.15 KB each (plain)"),
])
def test_generate_bad_flags_are_one_line_errors(tiny_dir, capsys, flags, message):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (a flag's type), with its usage line
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not re.search(r"[a-z]=|\(\w+=\)", err), err  # a flag, not the library's parameter (top_p=0.0, quant=)


def test_generate_truncate_reports_the_prompt_tokens_it_ran(tiny_dir, capsys):
    """--truncate keeps the last 128 - 8 = 120 tokens: the speed line counts those (it counted all)."""
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a " * 300, "--max-new-tokens", "8",
                 "--truncate"]) == 0
    n = len(load_tokenizer().encode("a " * 300))
    assert "prompt: 120 tokens in" in capsys.readouterr().err and n > 120


def test_tokenizer_flags_take_the_names_data_prepare_takes(tiny_dir, capsys):
    """`data prepare --tokenizer mixtral` (or bytes) names a tokenizer; generate, chat, serve, eval and analyze
    said 'mixtral: no such tokenizer file' of the same flag."""
    from mixlab.corpus import get_tokenizer

    flags = ["generate", "--model", str(tiny_dir), "--prompt", "Bonjour", "--max-new-tokens", "4", "--dtype",
             "float32", "--quiet"]
    assert main(flags) == 0
    default = capsys.readouterr().out
    assert main([*flags, "--tokenizer", "mixtral"]) == 0
    assert capsys.readouterr().out == default
    assert main([*flags, "--tokenizer", "bytes"]) == 0
    for name in ("bytes", "mixtral"):  # the ids and vocabulary data prepare writes with that name
        tok, prepared = load_tokenizer(name), get_tokenizer(name)
        assert tok.encode("hé, là", bos=False) == prepared.encode("hé, là")
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (prepared.vocab_size, prepared.bos_id, prepared.eos_id)


def test_generate_refuses_a_tokenizer_larger_than_the_vocab(tmp_path, capsys):
    save_model(Transformer(get_preset("tiny-moe")), tmp_path)  # vocab 256 < 32,000 pieces
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "pass the matching --tokenizer" in capsys.readouterr().err


def test_chat_multi_turn_reset_and_interrupt(tiny_dir, capsys, monkeypatch):
    import mixlab.cli.run as run

    seen: list[list[int]] = []
    real = run.generate_stream

    seeds: list[int | None] = []

    def spy(model, prompts, **kw):
        seen.append(list(prompts[0]))
        seeds.append(kw["seed"])
        steps = real(model, prompts, **kw)
        if len(seen) == 2:  # the second reply: Ctrl-C after two tokens
            def interrupted():
                for i, step in enumerate(steps):
                    if i == 2:
                        raise KeyboardInterrupt
                    yield step
            return interrupted()
        return steps

    monkeypatch.setattr(run, "generate_stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHow are you?\n/reset\nAgain\n/exit\n"))
    rc = main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6", "--seed", "0", "--system", "Be kind."])
    out, err = capsys.readouterr()
    assert rc == 0
    assert len(seen) == 3 and "[stopped]" in out and "conversation cleared" in err
    assert seeds == [0, 1, 2]  # each reply its own draws, the conversation reproducible
    tok = load_tokenizer()
    assert seen[0] == tok.encode_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}])
    # Turn 2 carries turn 1 (its reply included), turn 3 starts afresh after /reset.
    assert seen[1][: len(seen[0])] == seen[0] and tok.eos_id in seen[1]
    assert seen[2] == tok.encode_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Again"}])


def test_chat_with_a_v3_tokenizer_uses_its_template(tmp_path, capsys, monkeypatch):
    """A checkpoint holding Mixtral 8x22B Instruct's tokenizer.model.v3 (vocabulary 32,768) chats in its v3
    template, mistral-common's: each turn's prompt is its ids, the earlier replies and the system prompt in."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    import mixlab.cli.run as run

    v3 = next(load_tokenizer().path.parent.glob("mistral_instruct_tokenizer_*.model.v3"))
    model = Transformer(get_preset("tiny-moe").replace(vocab_size=32768, max_seq_len=128))
    model.init_weights(std=0.3, seed=0)
    save_model(model, tmp_path)
    (tmp_path / "tokenizer.model.v3").write_bytes(v3.read_bytes())
    seen: list[list[int]] = []
    real = run.generate_stream

    def spy(model, prompts, **kw):
        seen.append(list(prompts[0]))
        return real(model, prompts, **kw)

    monkeypatch.setattr(run, "generate_stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    rc = main(["chat", "--model", str(tmp_path), "--max-new-tokens", "6", "--seed", "0", "--system", "Be kind.",
               "--dtype", "float32"])
    replies = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(seen) == 2 and len(replies) == 2
    mt = MistralTokenizer.from_file(str(v3))
    first = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    assert seen[0] == mt.encode_chat_completion(ChatCompletionRequest(messages=first)).tokens
    second = [*first, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Again"}]
    assert seen[1] == mt.encode_chat_completion(ChatCompletionRequest(messages=second)).tokens


def test_chat_quits_on_eof(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "16"]) == 0
    assert "/reset" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    # --max-new-tokens 256 in a context of 128: said once, not "only -128 fit" at every message
    (["--max-new-tokens", "256"], "--max-new-tokens 256 leaves no room for a message in the context of 128 tokens"),
    (["--max-new-tokens", "8", "--temperature", "-1"], "argument --temperature: expected a number >= 0"),
    (["--max-new-tokens", "8", "--top-p", "2"], "argument --top-p: expected a number in (0, 1]"),
    # a system prompt that leaves no room: said once (each message was refused as 'the message needs N tokens')
    (["--max-new-tokens", "8", "--system", "word " * 150], "--system takes 161 tokens (in the chat template); with "
                                                             "--max-new-tokens 8 only 120 fit in the context of 128"),
    (["--system", "word " * 150], "with --max-new-tokens 64 (its default here) only 64 fit in the context of 128"),
])
def test_chat_bad_flags_fail_at_start(tiny_dir, capsys, monkeypatch, flags, message):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    try:
        code = main(["chat", "--model", str(tiny_dir), *flags])
    except SystemExit as e:  # a flag's own check, before the model loads
        code = e.code
    assert code == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err and "/reset" not in err


def test_mixlab_warnings_print_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints mixlab's own warnings as `mixlab CMD: warning: ...` (they came as file:line plus a
    source line); other libraries' warnings keep Python's form."""
    import os
    import warnings

    from mixlab.cli import _warnings_as_lines

    with warnings.catch_warnings(record=True) as others:  # restores warnings.showwarning afterwards
        warnings.simplefilter("always")
        _warnings_as_lines("train")
        _warnings_as_lines("sft")  # a second main() in one process: the newest command, printed once
        warnings.warn_explicit("3 of 9 conversations are cut", UserWarning,
                               filename=os.path.join(os.sep, "x", "mixlab", "train", "finetune.py"), lineno=1)
        warnings.warn_explicit("other", UserWarning, filename=os.path.join(os.sep, "x", "torch", "nn.py"), lineno=7)
        warnings.warn_explicit("mixlab: native kernels unavailable", UserWarning,  # its own prefix: once
                               filename=os.path.join(os.sep, "x", "mixlab", "ops", "native.py"), lineno=2)
    err = capsys.readouterr().err
    assert err.startswith("mixlab sft: warning: 3 of 9 conversations are cut\n")
    assert "\nmixlab sft: warning: native kernels unavailable\n" in err
    assert err.count("conversations are cut") == 1 and "other" not in err
    assert [str(w.message) for w in others] == ["other"]  # passed on to the previous handler


def test_each_line_on_stderr_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning, a note and an error each reach stderr in one write, newline included: stderr writes
    through, and print's two writes let another torchrun rank's line land between them (CI saw two ranks'
    warnings joined on one line)."""
    import os
    import warnings

    from mixlab.cli import _warnings_as_lines, note

    writes: list[str] = []
    monkeypatch.setattr("sys.stderr", type("Stderr", (), {"write": lambda self, t: writes.append(t)})())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _warnings_as_lines("generate")
        warnings.warn_explicit("the adapter was trained over A", UserWarning,
                               filename=os.path.join(os.sep, "x", "mixlab", "checkpoint", "adapter.py"), lineno=1)
    note("generate", "a note")
    assert main(["generate", "--model", "/absent/model", "--prompt", "x"]) == 1
    assert len(writes) == 3 and all(w.endswith("\n") and w.count("\n") == 1 for w in writes), writes
    assert writes[:2] == ["mixlab generate: warning: the adapter was trained over A\n",
                          "mixlab generate: note: a note\n"]
    assert writes[2].startswith("mixlab generate: error: ") and "/absent/model" in writes[2]


def _options(parser, name="mixlab"):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, p in a.choices.items():
                yield from _options(p, f"{name} {sub}")
        elif not isinstance(a, argparse._HelpAction):
            yield name, a


def test_every_option_says_what_it_does():
    """`mixlab train --help` listed --lr, --steps, ... with no word on what they set or their default."""
    from mixlab.cli import build_parser
    from mixlab.train.finetune import FinetuneConfig
    from mixlab.train.loop import TrainConfig

    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _options(build_parser()) if not a.help]
    assert not missing, missing
    helps = {(cmd, a.dest): a.help for cmd, a in _options(build_parser())}
    assert helps["mixlab train", "lr"] == f"peak learning rate (default {TrainConfig.lr:g})"
    assert helps["mixlab sft", "lr"] == f"peak learning rate (default {FinetuneConfig.lr:g})"
    assert helps["mixlab dpo", "aux_loss_coef"].endswith("(default the checkpoint's)")


def test_a_silent_rank_waits_for_rank_0_to_print(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun every rank raises the same argument error and rank 0 prints it. A rank that got
    there first ended at once, and torchrun stopped rank 0 before it printed (a flaky test run showed
    no line at all): the others now wait first (torchrun stops them when rank 0 ends). One still
    running after the wait raised the error alone, and prints it with its rank."""
    import mixlab.cli as cli

    slept: list[float] = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["info", "no-such-preset-or-folder"]) == 2
    assert slept == [cli.PEER_GRACE_S]
    assert capsys.readouterr().err.startswith("mixlab info: error: rank 1: ")
    monkeypatch.setenv("RANK", "0")
    assert main(["info", "no-such-preset-or-folder"]) == 2
    assert slept == [cli.PEER_GRACE_S] and capsys.readouterr().err.startswith("mixlab info: error: ")


@pytest.mark.parametrize("error,code", [
    (UsageError("--x 3: expected 1 or 2"), 2),  # a flag's value the command refuses: a usage error, as argparse's
    (CheckpointError("m/model.safetensors: truncated"), 1),  # the command ran and failed: every failure said 2
    (ValueError("a library's check"), 1),
    (OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors"), 1),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), 1),  # a lost rank (torchrun)
])
def test_the_exit_code_is_2_for_a_usage_error_and_1_for_a_failure(error: Exception, code: int,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Unix's and argparse's convention: 2, the command line was wrong; 1, the command ran and failed."""
    import mixlab.cli.run as run

    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(run, "generate", fail)
    if isinstance(error, RuntimeError):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
    assert main(["generate", "--model", "m", "--prompt", "x"]) == code
    err = capsys.readouterr().err
    assert err.startswith("mixlab generate: error: ") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["info", "tiny-moe"], ["data", "prepare", "x", "--out", "y"],
                                  ["demo", "--steps", "1"], ["plan", "tiny-moe"]])
def test_a_one_process_command_under_torchrun_is_refused(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`torchrun --nproc-per-node 2 -m mixlab data prepare ...` (or demo, upcycle, analyze, ...) ran
    the whole command in each process, every copy writing the same output folder; now one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    command = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
    assert capsys.readouterr().err == (f"mixlab {command}: error: torchrun started 2 processes, but mixlab {command} "
                                       "runs in one (each would do the same work and write the same output): run it "
                                       "without torchrun\n")


def test_the_default_max_new_tokens_fits_a_short_context(tiny_dir, capsys, monkeypatch):
    """The default --max-new-tokens 256 filled a context of 256 (`mixlab demo`'s model) or 128 on its
    own: `generate` and `chat` without the flag ended with 'leaves no room for a prompt'. Without it,
    generate now takes what the prompt leaves of the context, chat half of it."""
    flags = ["--model", str(tiny_dir), "--dtype", "float32", "--quiet"]
    assert main(["generate", "--prompt", "Bonjour", *flags]) == 0
    tok = load_tokenizer()
    prompt = tok.encode("Bonjour")
    ids = [i for i in generate(load_model(tiny_dir), [prompt], max_new_tokens=128 - len(prompt))[0] if i != tok.eos_id]
    assert capsys.readouterr().out == tok.decode(prompt + ids)[len(tok.decode(prompt)):] + "\n"
    import mixlab.cli.run as run

    asked: list[int] = []
    real = run.generate_stream
    monkeypatch.setattr(run, "generate_stream", lambda model, prompts, **kw: asked.append(kw["max_new_tokens"]) or
                        real(model, prompts, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", *flags]) == 0
    assert asked == [64] and capsys.readouterr().out.endswith("\n")


def test_chat_with_piped_input_prints_only_the_replies(tiny_dir, capsys, monkeypatch):
    """`printf 'a\\nb\\n' | mixlab chat > replies.txt` held '> ' prompts and a last empty line ('> \\n')."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "6", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and not out.startswith(">") and "\n>" not in out


def test_chat_reply_that_begins_with_a_space_token_drops_one_space(tiny_dir, capsys, monkeypatch):
    """A reply of "▁" then "▁Hello" is " Hello" (decode drops the first piece's space only); chat
    dropped the space of each text until one was left: "Hello"."""
    from mixlab.cli import run
    from mixlab.generate import Step

    def generate_stream(*args, **kw):  # the texts of the reply decoded alone, as chat asks for them
        assert kw["decode_alone"] is True
        yield from (Step(tokens=[28705], text=[""]), Step(tokens=[22557], text=[" Hello"]), Step(tokens=[None]))

    monkeypatch.setattr(run, "generate_stream", generate_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "8", "--quiet"]) == 0
    assert capsys.readouterr().out == " Hello\n"


def test_chat_stop_strings_match_the_reply_as_shown(tiny_dir, capsys, monkeypatch):
    """chat matched --stop on the engine's text, which keeps the first word's leading space that chat
    then dropped: --stop " " ended a reply before its first word (an empty reply), and a stop equal to
    " " + the first word matched the space chat never showed. The reply is decoded alone now."""
    flags = ["chat", "--model", str(tiny_dir), "--max-new-tokens", "12", "--seed", "0", "--quiet"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(flags) == 0
    reply = capsys.readouterr().out.removesuffix("\n")
    first = reply.split(" ")[0]
    assert first and " " in reply  # this seed's reply: several words, the first one not empty
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main([*flags, "--stop", " "]) == 0
    assert capsys.readouterr().out == first + "\n"  # was "\n": the stop matched the dropped space


def test_generate_and_chat_quiet_print_the_text_alone(tiny_dir, capsys, monkeypatch):
    """generate and chat had no --quiet (every other long command has one): their speed lines and
    chat's help line could not be turned off; --quiet leaves stderr empty and stdout as it was."""
    flags = ["--model", str(tiny_dir), "--max-new-tokens", "6", "--seed", "0"]
    for command, stdin in (["generate", "--prompt", "Bonjour"], ""), (["chat"], "Hello\n/reset\nAgain\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert main([*command, *flags]) == 0
        loud = capsys.readouterr()
        assert "tokens/s" in loud.err
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert main([*command, *flags, "--quiet"]) == 0
        quiet = capsys.readouterr()
        assert quiet.out == loud.out and quiet.err == ("(conversation cleared)\n" if stdin else "")


def test_generate_prompt_dash_reads_stdin(tiny_dir, capsys, monkeypatch):
    """`mixlab generate --prompt - < prompt.txt`: '-' was the prompt itself (a long prompt had to be an argument)."""
    flags = ["--model", str(tiny_dir), "--max-new-tokens", "8", "--dtype", "float32"]
    assert main(["generate", "--prompt", "Bonjour, le monde", *flags]) == 0
    want = capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Bonjour, le monde\n"))  # the file's last newline is dropped
    assert main(["generate", "--prompt", "-", *flags]) == 0
    got = capsys.readouterr()
    assert got.out == want.out and got.err.split(" tokens")[0] == want.err.split(" tokens")[0]


def test_a_prompt_or_system_prompt_that_is_not_utf8_is_named_before_the_model_loads(tiny_dir, capsys, monkeypatch):
    """A prompt file in Latin-1 through `--prompt -`: under a strict locale (en_US.UTF-8's) reading it raised
    "'utf-8' codec can't decode byte 0xe9 in position 3", of no flag, and only after the model had loaded."""
    import mixlab.cli.run as run

    monkeypatch.setattr(run, "_load", lambda args: pytest.fail("the model loaded"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n"), encoding="utf-8"))
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "-"]) == 1
    assert capsys.readouterr().err == ("mixlab generate: error: --prompt - (stdin) is not valid UTF-8: bytes e9 at "
                                       "character 3 (an undecodable byte or a lone surrogate); pass UTF-8 text\n")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "caf\udce9"]) == 1  # argv, as os.fsdecode holds it
    assert "error: --prompt is not valid UTF-8: bytes e9 at character 3" in capsys.readouterr().err
    # chat's --system was told as "message 0's content is not valid UTF-8", once the model had loaded
    assert main(["chat", "--model", str(tiny_dir), "--system", "caf\udce9"]) == 1
    assert "mixlab chat: error: --system is not valid UTF-8: bytes e9 at character 3" in capsys.readouterr().err


def test_ctrl_c_mid_stream_ends_the_text_line(tiny_dir, capsys, monkeypatch):
    """The text so far then "interrupted" on a line of its own (it ran on after the text: 'saddlemixlab generate:')."""
    import mixlab.cli.run as run

    real = run.generate_stream

    def interrupted(model, prompts, **kw):
        for i, step in enumerate(real(model, prompts, **kw)):
            if i == at:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(run, "generate_stream", interrupted)
    for at in (3, 0):  # before any text: no empty line
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "Bonjour", "--max-new-tokens", "8"]) == 130
        out, err = capsys.readouterr()
        assert (out.count("\n") == 1 and out.endswith("\n") and len(out) > 1) if at else out == ""
        assert err == "mixlab generate: interrupted\n"


def test_every_dtype_flag_takes_the_same_spellings(capsys):
    """`--dtype bf16` worked in generate, eval, convert, analyze and upcycle but was an 'invalid choice'
    in train, sft, dpo and plan."""
    from mixlab.cli import build_parser

    parser = build_parser()
    for argv in (["train"], ["sft", "--model", "m", "--data", "d", "--out", "o"],
                 ["dpo", "--model", "m", "--data", "d", "--out", "o"], ["plan", "tiny-moe"]):
        assert parser.parse_args([*argv, "--dtype", "bf16"]).dtype == "bfloat16"
        assert parser.parse_args([*argv, "--dtype", "fp32"]).dtype == "float32"
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*argv, "--dtype", "half"])
        assert e.value.code == 2 and "expected one of float32, bfloat16" in capsys.readouterr().err


def test_home_in_a_path_on_the_command_line_is_expanded(tiny_dir, tmp_path, monkeypatch, capsys):
    """`--out=~/x` or a quoted '~/x' (no shell expands them) wrote ./~/x; a config file's paths were expanded."""
    import argparse
    import shutil

    from mixlab.cli import build_parser, model_path, user_path

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "~/ck", "--overwrite", "~/out", "--quiet"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "~").exists()
    paths = {"model", "data", "out", "tokenizer", "src", "dst", "sources", "config", "init_from", "valid_data"}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())
            elif a.dest in paths or (a.dest == "json" and a.nargs == "?"):
                # model_path: user_path's, a run folder read as its hf/ export (upcycle's --from too)
                types = (user_path, model_path) if a.dest in ("model", "src") else (user_path,)
                assert a.type in types, f"mixlab {name} {a.dest}"

    walk(build_parser(), "")


def test_too_many_threads_is_a_warning_line_as_every_warning_is(tiny_dir, capsys, monkeypatch):
    """It printed "warning: --threads ..." without the command, unlike every other warning of the CLI
    ("mixlab generate: warning: ...", through warnings so that -W filters apply)."""
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    threads = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "a", "--max-new-tokens", "1",
                     "--threads", "4", "--dtype", "float32"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "mixlab generate: warning: --threads 4 is more than the 1 CPUs here; using 1\n" in err


def test_ctrl_c_while_torch_imports_is_one_line_and_130():
    # Ctrl-C in a command's first seconds landed in `import torch`, run by `import mixlab` before the
    # CLI's handler: a traceback (or, inside torch's import of numpy, swallowed and numpy broken).
    # Here SIGINT arrives as torch starts to import, as `python -m mixlab` (and the console script) run.
    import subprocess
    import sys

    code = ("import os, signal, sys, runpy\n"
            # SIGINT as at a terminal: a script's background job inherits it ignored (and the CLI leaves it so)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['mixlab', 'info', 'tiny-moe']\n"
            "runpy.run_module('mixlab', run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr, done.stdout) == (130, "mixlab: interrupted\n", "")


def test_import_mixlab_waits_for_torch_only_when_the_api_is_used():
    import subprocess
    import sys

    code = ("import sys, mixlab\n"
            "assert 'torch' not in sys.modules\n"
            "import mixlab.generate\n"  # the submodule of the function's name leaves the function in place
            "from mixlab import atomic, load_model\n"
            "assert callable(mixlab.generate) and mixlab.generate is mixlab.generate.__globals__['generate']\n"
            "assert mixlab.Transformer.__name__ == 'Transformer' and atomic.__name__ == 'mixlab.atomic'\n"
            "assert set(mixlab.__all__) <= set(dir(mixlab))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv,message", [
    ([], "COMMAND ...\n\nMixtral-style sparse MoE models.\n"),  # it said only 'arguments are required: COMMAND'
    (["genrate"], "mixlab: error: unknown command 'genrate' (did you mean 'generate'?); commands: info, convert,"),
    # a group's subcommand alone, another tool's name: no close spelling, so no hint at all
    (["prepare", "x", "--out", "y"], "mixlab: error: unknown command 'prepare' (did you mean 'data prepare'?); "),
    (["check", "x"], "mixlab: error: unknown command 'check' (did you mean 'data check'?); "),
    (["finetune", "--model", "m"], "mixlab: error: unknown command 'finetune' (did you mean 'sft' or 'dpo'?); "),
    (["generate", "--model", "m", "--prompt", "x", "--temprature", "1"],
     "mixlab generate: error: unrecognized arguments: --temprature (did you mean '--temperature'?)\n"),
    (["data", "prepare", "x", "--out", "y", "--tokeniser=bytes"],
     "mixlab data prepare: error: unrecognized arguments: --tokeniser=bytes (did you mean '--tokenizer'?)\n"),
    # a required flag misspelled: argparse said only 'the following arguments are required: --model'
    (["generate", "--modle", "m", "--prompt", "x"],
     "mixlab generate: error: unrecognized arguments: --modle (did you mean '--model'?)\n"),
    (["data", "prepare", "x", "--ot", "y"],
     "mixlab data prepare: error: unrecognized arguments: --ot (did you mean '--out'?)\n"),
    (["info", "tiny-moe", "x"], "mixlab info: error: unrecognized arguments: x\n"),  # not a flag: argparse's extra
])
def test_no_command_or_a_misspelled_one_is_a_helpful_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_a_value_that_begins_with_dashes_is_not_taken_for_a_misspelled_flag():
    """The check for misspelled flags before argparse's own reads words as argparse does: one with a
    space is a value, and `--` ends the flags."""
    from mixlab.cli import _parse_args, build_parser

    args = _parse_args(build_parser(), ["generate", "--model", "m", "--prompt", "--- a title", "--stop=--x"])
    assert (args.prompt, args.stop) == ("--- a title", ["--x"])


RUNS_A_MODEL = ("generate", "chat", "serve", "eval", "analyze")


def test_every_command_that_runs_a_model_takes_a_run_folder_as_its_export(tiny_dir, tmp_path, capsys):
    """`generate --model RUN` said "no config.json ... found (a training run folder: its exported model is
    RUN/hf)" and chat, serve, eval and analyze the same, where sft and dpo --model, train --init-from, convert
    and info read the run's hf/: one rule for a run folder in every command that takes a model."""
    import shutil

    from mixlab.cli import build_parser

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "hf")
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "state.json").write_text("{}")
    parser = build_parser()
    extra = {"generate": ["--prompt", "a"], "eval": ["--data", "d.jsonl"],
             "analyze": ["--data", "d.jsonl", "--out", "r"]}
    for command in RUNS_A_MODEL:
        for given, read in ((run, run / "hf"), (f"{run}/", f"{run}/hf"), (run / "hf", run / "hf"),
                            (tiny_dir, tiny_dir)):
            args = parser.parse_args([command, "--model", str(given), *extra.get(command, [])])
            assert args.model == str(read), (command, given)
    flags = ["--prompt", "Bonjour", "--max-new-tokens", "6", "--dtype", "float32", "--quiet"]
    assert main(["generate", "--model", str(run / "hf"), *flags]) == 0
    exported = capsys.readouterr().out
    assert main(["generate", "--model", str(run), *flags]) == 0
    assert capsys.readouterr().out == exported
    # a checkpoint is no model folder: its error still names the command that writes it as one
    step = run / "checkpoints" / "step_00000002"
    assert main(["generate", "--model", str(step), *flags]) == 1
    assert f"`mixlab convert {step} OUT`" in capsys.readouterr().err
