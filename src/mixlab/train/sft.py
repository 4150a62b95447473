"""Supervised fine-tuning data: chat JSONL -> Mixtral-Instruct tokens with an assistant-only loss,
packed several conversations to a row without attention across them.

Shape legend: B batch (rows), T tokens per row.

Data: one JSON object per line with `messages`, a list of `{"role": "system" | "user" | "assistant",
"content": str}` (OpenAI roles; system optional) ending with an assistant message (one with
`"weight": 0`, mistral-finetune's, is context: not trained), or TRL's
prompt-completion format: `prompt` (chat turns ending with a user turn, or a string: a Human:/Assistant:
transcript becomes its turns, anything else one user turn, as in DPO data) and `completion` (a string
or one assistant message). The conversation is rendered with the tokenizer's Mistral-Instruct template,
exactly as `Tokenizer.encode_chat` does (`Tokenizer.chat_turns`); v1's, Mixtral 8x7B's:

    <s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]{assistant}</s>

(v2/v3, Mixtral 8x22B's: [INST] and [/INST] control tokens, the system prompt in the last user turn.)

Each piece is tokenized on its own (as mistral-common does), so every token belongs to one turn; the
loss covers the tokens of assistant turns and their `</s>` (the model learns to stop), nothing else;
with `prompt`/`completion`, only the completion's (TRL's completion-only loss: assistant turns in the
prompt are context).

Packing: conversations are laid end to end in rows of T tokens. Positions restart at 0 for each and
a segment id per conversation makes attention block-diagonal causal (`Transformer.forward(
segments_BT=...)`), so a packed conversation gets exactly the logits and loss it gets alone
(tests/test_finetune.py). A conversation longer than T + 1 tokens is cut to its first T + 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab.corpus import full_tokenizer, json_line
from mixlab.tokenizer import ChatError
from mixlab.train.data import DataError, TrainTokenizer
from mixlab.train.losses import IGNORE


@dataclass
class Example:
    ids: list[int]  # the whole conversation
    train: list[bool]  # True for tokens of assistant turns (predicting them is trained)
    where: str = ""  # "file:line"


def render_turns(messages: Sequence[Mapping[str, Any]], tok: TrainTokenizer, *,
                 final_assistant: bool) -> tuple[list[int], list[bool]]:
    """Token ids and the assistant mask of a conversation in the Mixtral-Instruct template.
    `final_assistant`: the conversation ends with an assistant turn (closed by `</s>`); otherwise it
    ends with a user turn, ready for the model's reply (`Tokenizer.encode_chat`)."""
    msgs = [dict(m) for m in messages]
    if final_assistant:
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ChatError("the last message must be an assistant message (the reply to train on)")
        msgs[-1]["prefix"] = True  # lets the chat validator accept a trailing assistant turn
    turns = full_tokenizer(tok).chat_turns(msgs)
    if final_assistant:  # the reply trained on is closed by </s>
        turns[-1][1].append(tok.eos_id)
    trained = iter(_assistant_turns_trained(msgs))
    ids, train = [tok.bos_id], [False]
    for role, seg in turns:  # a prompt's last assistant turn with prefix=True is continued by the reply: no </s>
        ids += seg
        train += [role == "assistant" and next(trained)] * len(seg)
    return ids, train


def _assistant_turns_trained(msgs: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Whether each assistant turn (a run of assistant messages, which the template joins) is trained:
    not when its messages have `"weight": 0` (mistral-finetune's context-only assistant message)."""
    runs: list[list[bool]] = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            if i == 0 or msgs[i - 1]["role"] != "assistant":
                runs.append([])
            runs[-1].append(m.get("weight") != 0)
    for i, run in enumerate(runs):
        if len(set(run)) > 1:
            raise ChatError(f"assistant turn {i + 1} joins consecutive assistant messages of weight 0 and 1; give "
                            "them one weight (or make them one message)")
    return [run[0] for run in runs]


def _messages(obj: Any, where: str, field: str = "messages") -> list[dict[str, Any]]:
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: expected a JSON object with a '{field}' field, found: {keys}")
    msgs = obj[field]
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if isinstance(msgs, list) else type(msgs).__name__  # "got list" read as a contradiction
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages, got {got}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:  # a field of another name ('text'): say which ones the message has
                raise DataError(f"{where}: field '{field}[{i}].{key}' is missing (the message has: "
                                f"{', '.join(sorted(m)) or 'no fields'})")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field '{field}[{i}].{key}' must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field '{field}[{i}].role' is {m['role']!r}; expected 'system', 'user' "
                            "or 'assistant'")
        w = m.get("weight")  # mistral-finetune's: 0 makes an assistant message context (no loss)
        if w is not None and (isinstance(w, bool) or w not in (0, 1)):
            raise DataError(f"{where}: field '{field}[{i}].weight' is {json.dumps(w)}; expected 0 (the message is "
                            "context, not trained) or 1 (trained, as without a weight)")
    return msgs


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def transcript_turns(prompt: str) -> list[dict[str, str]]:
    """'Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant messages (a, b, c).
    A string that is not such a transcript is one user message."""
    marks = list(_TURN.finditer(prompt))
    if not marks or marks[0].start() != 0 or marks[0].group(1) != "Human":
        return [{"role": "user", "content": prompt}]
    msgs = []
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        content = prompt[m.end(): nxt.start() if nxt is not None else len(prompt)].strip()
        msgs.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content})
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # the trailing "Assistant:" the reply continues
    return msgs


def prompt_turns(obj: dict, where: str) -> tuple[list[dict[str, Any]], str]:
    """The chat turns of a row's prompt and the field they came from: `messages`, or `prompt` as chat
    turns (TRL's conversational format) or a string (`transcript_turns`)."""
    if "messages" in obj:
        return _messages(obj, where), "messages"
    if isinstance(obj.get("prompt"), list):
        return _messages(obj, where, "prompt"), "prompt"
    if isinstance(obj.get("prompt"), str):
        return transcript_turns(obj["prompt"]), "prompt"
    if "prompt" in obj:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got "
                        f"{type(obj['prompt']).__name__}")
    raise DataError(f"{where}: expected a field 'prompt' (a string or a list of messages) or 'messages' (a "
                    f"list of messages), found: {', '.join(sorted(obj)) or 'no fields'}")


def reply_text(obj: dict, field: str, where: str) -> str:
    """A row's reply: a non-empty string, or a list holding one assistant message."""
    if field not in obj:
        raise DataError(f"{where}: field '{field}' is missing (the row has: {', '.join(sorted(obj))})")
    v = obj[field]
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        v = v[0].get("content")
    elif isinstance(v, list):  # TRL also takes several messages (tool calls and results, then the answer)
        roles = ", ".join(repr(m.get("role")) if isinstance(m, dict) else type(m).__name__ for m in v[:4])
        raise DataError(f"{where}: field '{field}' is a list of {len(v)} message(s){f' ({roles}' if v else ''}"
                        f"{', ...)' if len(v) > 4 else ')' if v else ''}; expected one assistant message (or a "
                        "non-empty string): a row trains one reply, and the turns before it belong in the prompt")
    if not isinstance(v, str) or not v:
        raise DataError(f"{where}: field '{field}' must be a non-empty string (or one assistant message), got "
                        f"{type(v).__name__ if not isinstance(v, str) else 'an empty string'}")
    return v


def read_jsonl(path: str | Path) -> list[tuple[Any, str]]:
    """(object, "file:line") of every non-empty line; invalid JSON is an error naming the line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such data file") from None
    except IsADirectoryError:  # said only "Is a directory"
        raise DataError(f"{p}: a folder, not a JSONL file; pass the file (--data FILE.jsonl)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # name the line, as every other error here does
        lineno, line_start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{p}:{lineno}: not UTF-8 text ({raw[e.start:e.start + 1]!r} at byte {e.start - line_start} "
                        "of the line); convert the file to UTF-8") from None
    rows = []
    # Lines end at "\n" only (JSON Lines): str.splitlines() also breaks at U+2028, U+0085 and others,
    # which JSON strings may hold unescaped (json.dumps(ensure_ascii=False) writes them so).
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rows.append((json_line(line, f"{p}:{lineno}"), f"{p}:{lineno}"))
    if not rows:
        raise DataError(f"{p}: no examples (the file is empty)")
    return rows


def read_sft(path: str | Path, tok: TrainTokenizer) -> list[Example]:
    """Every conversation of a chat JSONL file (`messages`, or `prompt` and `completion`), tokenized;
    errors name the file, line and field."""
    out = []
    for obj, where in read_jsonl(path):
        if not isinstance(obj, dict) or not {"messages", "prompt", "completion"} & obj.keys():
            raise DataError(f"{where}: expected a JSON object with 'messages' (or 'prompt' and 'completion'), found: "
                            f"{', '.join(sorted(obj)) or 'no fields' if isinstance(obj, dict) else type(obj).__name__}")
        if "completion" not in obj and {"chosen", "rejected"} <= obj.keys():
            raise DataError(f"{where}: a preference pair ('chosen' and 'rejected'), which mixlab dpo trains on; sft "
                            "takes 'messages', or 'prompt' and 'completion'")
        if "messages" in obj:
            msgs, field, completion = _messages(obj, where), "messages", None
        else:  # TRL's prompt-completion format
            msgs, field = prompt_turns(obj, where)
            completion = reply_text(obj, "completion", where)
            # a completion message's "weight" is read as a `messages` reply's is (0: context, not trained)
            trained = not isinstance(obj["completion"], list) or \
                _messages(obj, where, "completion")[0].get("weight") != 0
        try:
            ids, train = render_turns(msgs, tok, final_assistant=completion is None)
        except ChatError as e:
            raise DataError(f"{where}: field '{field}': {e}") from None
        if completion is not None:  # only the completion is trained
            reply = tok.encode(completion, bos=False, eos=True)
            ids, train = ids + reply, [False] * len(ids) + [trained] * len(reply)
        out.append(Example(ids, train, where))
    return out


@dataclass
class Packed:
    """One batch of packed rows: inputs, targets (IGNORE where not trained), positions (-1 padding)
    and segment ids (-1 padding), each `[B, T]`."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:  # real (non-padding) tokens: the router losses count these
        return self.positions >= 0


def pack(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Greedy packing in the given order: lists of example indices whose inputs (len - 1 tokens,
    at most `seq_len`) fit one row."""
    rows: list[list[int]] = []
    used = seq_len
    for i, ex in enumerate(examples):
        n = min(len(ex.ids) - 1, seq_len)
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int) -> Packed:
    B, T = len(rows), seq_len
    tokens = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = min(len(ex.ids) - 1, seq_len)
            if t + n > T:
                raise ValueError(f"row {b} holds {t + n} or more tokens, more than seq_len {T}")
            ids = torch.tensor(ex.ids[: n + 1])
            train = torch.tensor(ex.train[1: n + 1])
            tokens[b, t: t + n] = ids[:-1]
            targets[b, t: t + n] = torch.where(train, ids[1:], IGNORE)
            positions[b, t: t + n] = torch.arange(n)
            segments[b, t: t + n] = s
            t += n
    return Packed(tokens, targets, positions, segments)


class PackedLoader:
    """Deterministic, resumable batches of packed rows. Each epoch shuffles the conversations with a
    permutation seeded by (seed, epoch) and packs them in that order; the position is (epoch,
    cursor over rows), stored in checkpoints like `BatchLoader`'s."""

    def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not examples:
            raise DataError("no training conversations")
        self.examples, self.seq_len, self.batch_size, self.seed, self.shuffle = (
            examples, seq_len, batch_size, seed, shuffle)
        self.epoch, self.cursor = 0, 0
        self._rows = self._pack(0)

    def _pack(self, epoch: int) -> list[list[int]]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)) if self.shuffle
                 else np.arange(len(self.examples)))
        return [[int(order[i]) for i in row] for row in pack([self.examples[int(i)] for i in order], self.seq_len)]

    def next_batch(self) -> Packed:
        rows = []
        for _ in range(self.batch_size):
            if self.cursor >= len(self._rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._rows = self._pack(self.epoch)
            rows.append(self._rows[self.cursor])
            self.cursor += 1
        return collate(self.examples, rows, self.seq_len)

    def all_batches(self) -> list[Packed]:
        """Every row of epoch 0 once, in order (evaluation)."""
        rows = self._pack(0)
        return [collate(self.examples, rows[i: i + self.batch_size], self.seq_len)
                for i in range(0, len(rows), self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "epoch": self.epoch,
                "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "seq_len", "batch_size"):
            if state.get(k) != getattr(self, k):
                raise DataError(f"data position in the checkpoint has {k}={state.get(k)!r}, "
                                f"but this run uses {getattr(self, k)!r}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._rows = self._pack(self.epoch)


def split_holdout(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): a seeded `fraction` of the items held out (at least one when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {fraction}")
    n_val = max(1, round(len(items) * fraction)) if fraction > 0 else 0
    perm = np.random.default_rng([seed, 12345]).permutation(len(items))
    val = set(int(i) for i in perm[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
