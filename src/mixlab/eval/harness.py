"""mixlab as an lm-evaluation-harness model (`lm-eval` is an optional extra: `pip install mixlab[eval]`).

    import lm_eval, mixlab.eval.harness                      # importing registers the name "mixlab"
    lm = mixlab.eval.harness.MixlabLM.from_path("ckpt/", dtype="float32", batch_size=8)
    tasks = lm_eval.tasks.TaskManager(include_path="tasks/", include_defaults=False)  # tasks/ only, not lm-eval's own
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=tasks)

From the command line, `python -m mixlab.eval.harness` is `lm_eval` with the model registered:

    python -m mixlab.eval.harness run --model mixlab --model_args pretrained=ckpt/,dtype=float32 --tasks ...

(lm_eval's default `--device cuda:0` becomes the CPU where there is no GPU, as for its `hf` model.)

It follows the conventions of lm-eval's `hf` model, so the two give the same numbers on the same
checkpoint: texts are encoded without BOS unless `add_bos_token=True`; an empty context is
replaced by the BOS token; context and continuation are encoded together and split (trailing
spaces of the context move to the continuation, `TemplateLM._encode_pair`); rolling
log-likelihoods use disjoint windows of `max_length` tokens (`mixlab.eval.perplexity`);
generation is greedy unless `do_sample`/`temperature` ask otherwise, stops at each `until` string
and at EOS, and the text is cut at the first stop string.

Scoring is batched: requests are sorted by length (longest first) and right-padded into batches.

Chat-templated runs (lm_eval's `--apply_chat_template`, `simple_evaluate(apply_chat_template=True)`)
use the Mixtral-Instruct template `Tokenizer.encode_chat` encodes: lm-eval asks for each prompt as
text (`apply_chat_template`), written `<s>[INST] {system}\n\n{user} [/INST] {reply}</s>[INST] {user}
[/INST]`, and `tok_encode` reads that text back into `encode_chat`'s ids, with the text after the
prompt (a continuation, or a task's `gen_prefix`) encoded as the reply the model writes there: the
model sees exactly what `mixlab chat` and `mixlab serve` give it, not SentencePiece's reading of the
template's text (`<s>` is not BOS there, and the reply would lose the space it starts with).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models: its registry fills itself only while empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra: a line naming it, for `python -m` without a traceback
    _hint = f"mixlab.eval.harness needs lm-eval: pip install 'mixlab[eval]' ({e})"
    if __name__ == "__main__":
        sys.exit(f"python -m {_hint}")
    raise ImportError(_hint) from e

from mixlab.dtypes import parse_dtype
from mixlab.errors import ConfigError, DataError, MixlabError
from mixlab.eval.perplexity import rolling_windows, score_batch
from mixlab.generate import generate
from mixlab.model import Transformer
from mixlab.tokenizer import Tokenizer, _normalize_chat, load_tokenizer, model_tokenizer

# What `chat_template` returns (lm-eval logs it and keys its request cache with it).
CHAT_TEMPLATE = "<s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST]"


@contextlib.contextmanager
def _naming_model_arg(name: str, value: object, also: str = "") -> Iterator[None]:
    """A bad `--model_args` value (`dtype=bogus`, `tokenizer=missing.model`) as a ConfigError naming it,
    which `main` prints on one line: a ValueError or FileNotFoundError was a traceback through lm-eval."""
    try:
        yield
    except MixlabError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"--model_args {name}={value}: {e}{also}") from e


@register_model("mixlab")
class MixlabLM(TemplateLM):
    def __init__(self, model: Transformer | None = None, tokenizer: Tokenizer | str | None = None, *,
                 pretrained: str | None = None, dtype: str | None = None, device: str = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = False, **unused: Any) -> None:
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line passes device="cuda:0" unless told otherwise; its `hf` model
            # then runs on the CPU when there is no GPU, and so does this one
            if device is not None:
                print(f"mixlab: device {device!r} is not available (no CUDA); using cpu", file=sys.stderr)
            device = "cpu"
        if model is None:
            if pretrained is None:
                raise ConfigError("MixlabLM needs a model or pretrained=PATH")
            from mixlab.checkpoint import load_model

            # dtype=auto (lm-eval's `hf` convention): as the checkpoint stores it
            with _naming_model_arg("dtype", dtype, also=", or auto (as the checkpoint stores it)"):
                parse_dtype(None if dtype == "auto" else dtype)
            model = load_model(pretrained, dtype=None if dtype == "auto" else dtype, device=device)
        if tokenizer is None:
            tokenizer = model_tokenizer(pretrained) if pretrained is not None else load_tokenizer()
        elif isinstance(tokenizer, str):  # `--model_args tokenizer=bytes|mixtral|PATH`, as `mixlab eval --tokenizer`
            with _naming_model_arg("tokenizer", tokenizer):
                tokenizer = load_tokenizer(tokenizer)  # (it was an AttributeError on the string)
        if tokenizer.vocab_size > model.config.vocab_size:  # as `mixlab eval`; it was an IndexError in the embedding
            raise ConfigError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary has {model.config.vocab_size}; pass the model's own (tokenizer=bytes, "
                             "mixtral or a tokenizer file)")
        self.model = model.eval()
        self.tok = tokenizer
        # lm_eval's "auto" and "auto:N" (search the largest batch N times): a fixed 8 here
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:  # 0 failed in range(); a negative size scored nothing and returned []
            raise ConfigError(f"invalid batch_size={batch_size!r}: expected an integer >= 1 or 'auto'")
        self._max_length = int(max_length or 0) or model.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        # 0 or absent is the model's length, as the `hf` model takes it; a negative one was refused only by the
        # first request it could not score ("a continuation of 2 tokens is longer than max_length=-5"), after the
        # others had run, and max_gen_toks=-1 by generate
        if self._max_length < 1:
            raise ConfigError(f"invalid max_length={max_length!r}: expected an integer >= 1 (or 0: the model's "
                              f"{model.config.max_seq_len} positions)")
        if self.max_gen_toks < 1:
            raise ConfigError(f"invalid max_gen_toks={max_gen_toks!r}: expected an integer >= 1")
        self.add_bos_token = bool(add_bos_token) if not isinstance(add_bos_token, str) \
            else add_bos_token.lower() == "true"

    @classmethod
    def from_path(cls, path: str, **kw: Any) -> MixlabLM:
        return cls(pretrained=path, **kw)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> MixlabLM:
        """How lm-eval makes the model of `--model mixlab`: its own flags (`--batch_size`, `--device`,
        `--max_batch_size`: `additional_config`) fill what `--model_args` did not say. TemplateLM's passed
        both: `--batch_size 4 --model_args ...,batch_size=8` was a TypeError ('got multiple values for
        keyword argument'), as it still is for lm-eval 0.4's own `hf` model."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> MixlabLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what TemplateLM needs ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
        chat = self._chat_ids(string)
        if chat is not None:  # a prompt apply_chat_template wrote: its BOS is in it
            return chat
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    # -- chat templates (lm-eval's --apply_chat_template) -------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path).replace("/", "__")  # as lm-eval's `hf` model names its tokenizer

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text (module docstring); `add_generation_prompt=False` (a task's
        `gen_prefix`): the last message, an assistant one, is left open for the reply to continue."""
        if self.tok.chat_version != 1:  # the text would be read back as v1's (DataError: "holds the markers")
            raise DataError(f"--apply_chat_template: {self.tok.path} takes Mistral's v{self.tok.chat_version} chat "
                            "template, whose [INST] is a control token that lm-eval's text prompts cannot carry; only "
                            "the v1 template (Mixtral 8x7B Instruct's) is applied here")
        messages: list[dict[str, Any]] = [dict(m) for m in chat_history]
        if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
            messages[-1]["prefix"] = True
        system, turns = _normalize_chat(messages)
        text = "<s>"
        for i, (role, content, prefix, *_) in enumerate(turns):
            if role == "user":
                text += f"[INST] {system + chr(10) * 2 + content if i == 0 and system else content} [/INST]"
            else:
                text += f" {content}" + ("" if prefix else "</s>")
        if self._chat_ids(text) != self.tok.encode_chat(messages):  # the text holds the template's own markers
            raise DataError(f"a message holds the chat template's markers ([INST], [/INST], </s>), so its "
                            f"prompt cannot be written as text for lm-eval: {chat_history!r}")
        return text

    def _chat_ids(self, text: str) -> list[int] | None:
        """`encode_chat`'s ids of a text `apply_chat_template` wrote, the text after it the last reply
        (its first space the template's); None for any other text."""
        if not text.startswith("<s>[INST] "):
            return None
        messages: list[dict[str, Any]] = []
        parts = text[len("<s>"):].split("</s>")
        for i, part in enumerate(parts):
            user, sep, reply = part.removeprefix("[INST] ").partition(" [/INST]")
            if not part.startswith("[INST] ") or not sep:
                return None
            messages.append({"role": "user", "content": user})
            reply, last = reply.removeprefix(" "), i == len(parts) - 1
            if reply or not last:
                messages.append({"role": "assistant", "content": reply, "prefix": last})
        return self.tok.encode_chat(messages)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kw: Any) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (log-likelihood, is greedy), as the `hf`
        model: the input is (context + continuation)[-(max_length + 1):][:-1]."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            inputs, targets = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if len(cont) > self.max_length:  # its first tokens have no input position to be predicted at
                    raise DataError(f"a continuation of {len(cont)} tokens is longer than max_length="
                                    f"{self.max_length}, so it cannot be scored (it starts "
                                    f"{self.tok_decode(cont[:8])!r})")
                inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])
                targets.append(cont)
            for i, res in zip(idx, score_batch(self.model, inputs, targets), strict=True):
                out[i] = res
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            bar.update(len(idx))
        bar.close()
        return [r for r in out if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The summed log-probability of each text, every token predicted once (disjoint windows)."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            ids = self.tok_encode(text)
            seq = [self.prefix_token_id, *ids]
            windows, pos = [], 0
            for x, n in rolling_windows(ids, prefix=self.prefix_token_id, context=self.max_length):
                windows.append((None, x, seq[pos + 1: pos + 1 + n]))
                pos += n
            # each window is scored on its own inputs: (context, continuation) = (x minus the
            # continuation's inputs, continuation)
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start: start + self.batch_size]
                total += sum(lp for lp, _ in score_batch(self.model, [w[1] for w in chunk], [w[2] for w in chunk]))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Batched generation: requests with the same generation settings run together (each
        sequence stops on its own), longest context first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1] or {}, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            kw = dict(requests[members[0]].args[1] or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else [s for s in (until or []) if s]
            # lm-eval's reading (`normalize_gen_kwargs`, as its `hf` model): the token limit under any of
            # its names, in this order; do_sample=False is greedy whatever the temperature, and an
            # absent do_sample samples when the temperature is above 0
            names = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
            max_gen = int(next((kw[n] for n in names if kw.get(n) is not None), self.max_gen_toks))
            do_sample = kw.get("do_sample")
            if do_sample is None:
                do_sample = float(kw.get("temperature", 0.0) or 0.0) > 0
            temperature = float(kw.get("temperature", 1.0) or 0.0) if do_sample else 0.0
            top_p = float(kw.get("top_p", 1.0) or 1.0) if do_sample else 1.0
            top_k = int(kw.get("top_k", 0) or 0) if do_sample else 0
            if max_gen >= self.max_length:  # as the `hf` model; the slice below kept ctx[-0:] (all) or ctx[k:]
                raise ConfigError(f"max_gen_toks={max_gen} leaves no room for a context in max_length="
                                  f"{self.max_length}: generate fewer tokens or raise max_length")
            ctx = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in members}
            members = sorted(members, key=lambda i: -len(ctx[i]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start: start + self.batch_size]
                news = generate(self.model, [ctx[i] for i in batch], max_new_tokens=max_gen, temperature=temperature,
                                top_p=top_p, top_k=top_k, stop=until or None, tokenizer=self.tok,
                                seed=int(kw.get("seed", 0)))
                for i, new in zip(batch, news, strict=True):
                    if new and new[-1] == self.eot_token_id:
                        new = new[:-1]
                    text = self.tok.decode(new)
                    for s in until:  # cut at the first stop string, as lm-eval does
                        text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out


def main() -> None:
    """`lm_eval`'s command line with the `mixlab` model registered. mixlab's own errors (a missing
    checkpoint, a tokenizer larger than the model's vocabulary, a bad `--model_args` value) and an unknown
    `--tasks` name are one line, as `mixlab eval`'s."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except MixlabError as e:  # was a traceback through lm_eval's model construction
        sys.exit(f"python -m mixlab.eval.harness: error: {e}")
    except ValueError as e:  # lm-eval's own check of --tasks, before the model loads: a traceback too
        if not str(e).startswith("Tasks not found: "):
            raise
        missing = str(e).removeprefix("Tasks not found: ")
        sys.exit(f"python -m mixlab.eval.harness: error: --tasks: no such task: {missing} (`lm_eval ls tasks` lists "
                 "lm-eval's; a task of your own: --include_path DIR, the folder of its YAML file)")


if __name__ == "__main__":
    main()

