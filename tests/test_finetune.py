"""Fine-tuning: SFT data and packing, DPO losses against TRL and the papers, LoRA (zero init, merge,
int8/bf16 base, PEFT round trip), exact resume of SFT and DPO runs, clear errors on bad data."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import step_clock
from mixlab import atomic
from mixlab.checkpoint import save_model
from mixlab.config import ConfigError, ModelConfig, MoEConfig
from mixlab.model import Transformer
from mixlab.train import checkpoints, dpo, sft
from mixlab.train.data import ByteTokenizer, DataError
from mixlab.train.finetune import finetune, load_finetune_config
from mixlab.train.lora import LoraConfig, apply_lora, expert_lora, merge, save_peft
from mixlab.train.losses import IGNORE, lm_loss

CFG = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=48,
                  max_seq_len=256, rope_theta=1e4, moe=MoEConfig(num_experts=4, top_k=2))
TOK = ByteTokenizer()
CONVS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


CFG4 = dataclasses.replace(CFG, ffn_dim=64)  # a LoRA base held int4 needs multiples of 32 inputs per row


def _model(seed: int = 0, cfg: ModelConfig = CFG) -> Transformer:
    m = Transformer(cfg)
    m.init_weights(std=0.1, seed=seed)
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "hf"
    save_model(_model(), root)
    (root / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    return root


@pytest.fixture(scope="module")
def ckpt4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base4") / "hf"
    save_model(_model(cfg=CFG4), root)
    (root / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    return root


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chat")
    rows = []
    for i in range(24):
        rows.append({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = []
    for i in range(24):
        pairs.append({"prompt": f"Human: Say the number {i}.\n\nAssistant:", "chosen": f"{i}",
                      "rejected": f"I will not say {i + 1}."})
    (root / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root / "sft.jsonl", root / "dpo.jsonl"


# -- SFT data ----------------------------------------------------------------------------------------


def test_render_matches_encode_chat() -> None:
    """The rendering is Tokenizer.encode_chat's (mistral-common's v1 template) plus the final reply."""
    from mixlab.tokenizer import default_tokenizer_path, load_tokenizer

    if not default_tokenizer_path().exists():
        pytest.skip("the Mixtral tokenizer (mistral-common) is not installed")
    tok = load_tokenizer(default_tokenizer_path())
    from mixlab.train.data import FileTokenizer

    ft = FileTokenizer(None, name="mixtral")
    for conv in CONVS:
        ids, train = sft.render_turns(conv, ft, final_assistant=True)
        want = tok.encode_chat([*conv[:-1], {**conv[-1], "prefix": True}]) + [tok.eos_id]
        assert ids == want
        assert tok.decode([i for i, t in zip(ids, train, strict=True) if t]).replace("</s>", "") == \
            tok.decode(tok.encode(" ".join(m["content"] for m in conv if m["role"] == "assistant"), bos=False))


def test_render_in_the_v3_template() -> None:
    """A v3 tokenizer (Mixtral 8x22B Instruct's) renders SFT data in its own template, mistral-common's: [INST]
    and [/INST] as control tokens, the system prompt in the last user turn; the replies alone trained."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixlab.tokenizer import default_tokenizer_path
    from mixlab.train.data import FileTokenizer

    path = next(default_tokenizer_path().parent.glob("mistral_instruct_tokenizer_*.model.v3"))
    ft, mt = FileTokenizer(path), MistralTokenizer.from_file(str(path))
    for conv in CONVS:
        ids, train = sft.render_turns(conv, ft, final_assistant=True)
        prompt = [*conv[:-1], {**conv[-1], "prefix": True}]
        assert ids == mt.encode_chat_completion(ChatCompletionRequest(messages=prompt)).tokens + [ft.eos_id]
        replies = [ft.encode(m["content"], eos=True) for m in conv if m["role"] == "assistant"]
        assert [i for i, t in zip(ids, train, strict=True) if t] == [i for r in replies for i in r]
        assert ids[1] == ft.tok.encode_chat(conv[:1])[1] == 3  # [INST]


def test_loss_only_on_assistant_tokens() -> None:
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS]
    b = sft.collate(ex, [[0, 1, 2]], 220)
    trained = b.targets[b.targets != IGNORE]
    want = "".join(m["content"] + "\x00" for c in CONVS for m in c if m["role"] == "assistant")
    assert TOK.decode([int(t) if t != TOK.eos_id else 3 for t in trained]) == want  # 3 = byte 0 stands for </s>
    # Changing the target of any non-assistant token leaves the loss unchanged; an assistant one changes it.
    m = _model()
    logits = m(b.tokens, positions_BT=b.positions, segments_BT=b.segments)
    raw = torch.cat([b.tokens[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)  # next tokens (inputs shifted)
    mask = b.targets != IGNORE
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(3, 259, raw.shape, generator=g)
    changed = torch.where(mask, raw, noise)
    base = lm_loss(logits, torch.where(mask, raw, IGNORE))
    assert torch.equal(lm_loss(logits, torch.where(mask, changed, IGNORE)), base)
    j = int(mask.nonzero()[0, 1])
    raw2 = raw.clone()
    raw2[0, j] = (raw2[0, j] + 1) % 259
    assert not torch.equal(lm_loss(logits, torch.where(mask, raw2, IGNORE)), base)


def test_packed_batch_equals_each_conversation_alone() -> None:
    m = _model()
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS]
    packed = sft.collate(ex, [[0, 1, 2]], 230)
    logits = m(packed.tokens, positions_BT=packed.positions, segments_BT=packed.segments)
    total = torch.nn.functional.cross_entropy(logits[0], packed.targets[0], ignore_index=IGNORE, reduction="sum")
    alone_total = torch.zeros(())
    for s, e in enumerate(ex):
        one = sft.collate([e], [[0]], len(e.ids) - 1)
        lo = m(one.tokens)  # plain causal attention, positions 0..n-1
        seg = packed.segments[0] == s
        torch.testing.assert_close(logits[0, seg], lo[0], rtol=0, atol=1e-5)
        alone_total += torch.nn.functional.cross_entropy(lo[0], one.targets[0], ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(total, alone_total, rtol=1e-6, atol=1e-5)


def test_sft_loss_equals_trl_and_transformers(tmp_path: Path) -> None:
    """The assistant-token loss of a batch, unpacked or packed, equals the loss transformers'
    MixtralForCausalLM computes from TRL's SFT collator on the same conversations, one per row with
    labels -100 outside the assistant turns (what SFTTrainer's assistant_only_loss builds): the same
    tokens, the same shift, one mean over the batch's trained tokens."""
    pytest.importorskip("trl")
    from transformers import MixtralForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mixlab.train.finetune import sft_forward

    m = _model()
    save_model(m, tmp_path / "base")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32).eval()
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS]
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(
        [{"input_ids": e.ids, "labels": [i if t else IGNORE for i, t in zip(e.ids, e.train, strict=True)]} for e in ex])
    with torch.no_grad():
        want = hf(**batch).loss
        for rows in ([[0], [1], [2]], [[0, 1, 2]], [[0, 2], [1]]):
            s, n, _ = sft_forward(m, sft.collate(ex, rows, 230), torch.device("cpu"))
            assert int(n) == int((batch["labels"][:, 1:] != IGNORE).sum())
            torch.testing.assert_close(s / n, want, rtol=1e-6, atol=1e-6)


def test_sft_evaluation_logs_trls_mean_token_accuracy() -> None:
    """eval_mean_token_accuracy (TRL's SFT metric: the share of trained tokens that are the model's
    argmax) over packed held-out conversations equals it over each conversation alone; eval_loss too."""
    from mixlab.train.finetune import evaluate_sft

    m = _model()
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS]
    got = evaluate_sft(m, ex, load_finetune_config(None, model="m", data="d", seq_len=230, batch_size=1, threads=1))
    correct = total = 0
    loss = torch.zeros(())
    for e in ex:
        one = sft.collate([e], [[0]], len(e.ids) - 1)
        logits, mask = m(one.tokens)[0], one.targets[0] != IGNORE
        correct += int((logits.argmax(-1)[mask] == one.targets[0][mask]).sum())
        total += int(mask.sum())
        loss += torch.nn.functional.cross_entropy(logits[mask], one.targets[0][mask], reduction="sum")
    assert got["eval_tokens"] == total and 0 < correct < total
    assert got["eval_mean_token_accuracy"] == correct / total
    assert math.isclose(got["eval_loss"], float(loss) / total, rel_tol=1e-5)


def test_one_conversation_per_row_takes_the_causal_path() -> None:
    """Rows holding one conversation each (then right padding) skip the block-diagonal mask: the
    same loss, token count and routing of the real tokens as the masked forward."""
    from mixlab.train.finetune import sft_forward

    m = _model()
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS]
    b = sft.collate(ex, [[0], [1], [2]], 120)
    assert bool((b.segments <= 0).all()) and bool((b.positions < 0).any())
    s, n, routings = sft_forward(m, b, torch.device("cpu"))
    logits = m(b.tokens, positions_BT=b.positions, segments_BT=b.segments)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-5)
    assert int(n) == int((b.targets != IGNORE).sum())
    real = b.valid.flatten()
    for r, o in zip(routings, m.forward_output(b.tokens, positions_BT=b.positions, segments_BT=b.segments).routing,
                    strict=True):
        assert torch.equal(r.idx_TK[real], o.idx_TK[real])


def test_packing_and_loader_resume() -> None:
    ex = [sft.Example(*sft.render_turns(c, TOK, final_assistant=True)) for c in CONVS * 10]
    a = sft.PackedLoader(ex, seq_len=96, batch_size=2, seed=1)
    for _ in range(7):
        a.next_batch()
    b = sft.PackedLoader(ex, seq_len=96, batch_size=2, seed=1)
    b.load_state_dict(a.state_dict())
    x, y = a.next_batch(), b.next_batch()
    assert torch.equal(x.tokens, y.tokens) and torch.equal(x.segments, y.segments)
    rows = sft.pack(ex, 96)
    assert sorted(i for r in rows for i in r) == list(range(len(ex)))


@pytest.mark.parametrize("line, match", [
    ("not json", r"bad.jsonl:2: not valid JSON \(.*\); expected JSON Lines, one JSON value per line"),
    ('{"msgs": []}', r"bad.jsonl:2: expected a JSON object with 'messages' \(or 'prompt' and 'completion'\), found: "
                     "msgs"),
    ('{"prompt": "Hi"}', r"bad.jsonl:2: field 'completion' is missing \(the row has: prompt\)$"),
    ('{"prompt": "Hi", "completion": 3}', r"bad.jsonl:2: field 'completion' must be a non-empty string \(or one "
                                          r"assistant message\), got int$"),
    # A completion of several messages (TRL takes them) said only 'must be a non-empty string ..., got list'.
    ('{"prompt": "Hi", "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}', r"bad.jsonl:2: field 'completion' is a list of 3 message\(s\) "
                                                r"\('assistant', 'user', 'assistant'\); expected one assistant message "
                                                r"\(or a non-empty string\): a row trains one reply, and the turns "
                                                "before it belong in the prompt$"),
    ('{"prompt": "Hi", "completion": [{"role": "user", "content": "a"}]}', r"bad.jsonl:2: field 'completion' is a list "
                                                                           r"of 1 message\(s\) \('user'\); expected"),
    ('{"prompt": "Hi", "completion": []}', r"bad.jsonl:2: field 'completion' is a list of 0 message\(s\); expected"),
    ('{"prompt": {"role": "user"}, "completion": "x"}', r"bad.jsonl:2: field 'prompt' must be a string or a list of "
                                                        "messages, got dict$"),
    ('{"prompt": [{"role": "user", "content": 1}], "completion": "x"}', r"bad.jsonl:2: field 'prompt\[0\].content' "
                                                                       "must be a string"),
    ('{"prompt": [{"role": "assistant", "content": "a"}], "completion": "x"}', r"bad.jsonl:2: field 'prompt': "),
    ('{"completion": "x"}', r"bad.jsonl:2: expected a field 'prompt' \(a string or a list of messages\)"),
    ('{"messages": []}', r"bad.jsonl:2: field 'messages' must be a non-empty list of messages, got an empty list$"),
    ('{"prompt": [], "completion": "x"}', r"bad.jsonl:2: field 'prompt' must be a non-empty list of messages, got an "
                                          "empty list$"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad.jsonl:2: field 'messages\[0\].role' is 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"bad.jsonl:2: field 'messages\[0\].content' must be a string"),
    ('{"messages": [{"role": "user", "text": "hi"}]}', r"bad.jsonl:2: field 'messages\[0\].content' is missing \(the "
                                                       r"message has: role, text\)$"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:2: field 'messages': the last message must be "
                                                          "an assistant"),
])
def test_malformed_sft_data(tmp_path: Path, line: str, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": CONVS[0]}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        sft.read_sft(f, TOK)


def test_prompt_completion_is_trl_format(tmp_path: Path) -> None:
    """TRL's prompt-completion rows, conversational and standard, read as the `messages` line they
    stand for (the same tokens and loss mask); the loss covers only the completion, so an assistant
    turn in the prompt is context. They were refused ('expected a JSON object with a 'messages' field')."""
    system, user, reply = CONVS[1][:2], CONVS[1][3], CONVS[1][4]
    rows = [{"prompt": [*system, CONVS[1][3]], "completion": [reply]},
            {"messages": [*system, user, reply]},
            {"prompt": "and 3+3?", "completion": "6, of course."},
            {"messages": [user, reply]},
            {"prompt": CONVS[1][:4], "completion": reply["content"]}]
    f = tmp_path / "pc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conv, conv_msgs, std, std_msgs, multi = sft.read_sft(f, TOK)
    assert (conv.ids, conv.train) == (conv_msgs.ids, conv_msgs.train)
    assert (std.ids, std.train) == (std_msgs.ids, std_msgs.train)
    full_ids, full_train = sft.render_turns(CONVS[1], TOK, final_assistant=True)
    assert multi.ids == full_ids
    n = len(TOK.encode(reply["content"], eos=True))  # the completion and its </s>
    assert multi.train == [False] * (len(full_ids) - n) + [True] * n
    assert sum(full_train) > n  # `messages` trains the earlier assistant turn too


def test_an_assistant_message_of_weight_0_is_context(tmp_path: Path) -> None:
    """mistral-finetune's `"weight": 0` on an assistant message makes it context: its tokens are not
    trained (1 or no weight: trained). It was ignored, so the message was trained on."""
    conv = [dict(m) for m in CONVS[1]]
    f = tmp_path / "w.jsonl"
    rows = [{"messages": [*conv[:2], {**conv[2], "weight": 0}, conv[3], {**conv[4], "weight": 1}]},
            {"messages": [*conv[:4], {**conv[4], "weight": 0}]},
            {"prompt": conv[:4], "completion": [conv[4]]},
            {"prompt": conv[:4], "completion": [{**conv[4], "weight": 0}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weighted, last_zero, prompt_completion, zero_completion = sft.read_sft(f, TOK)
    assert zero_completion.ids == prompt_completion.ids and not any(zero_completion.train)
    full_ids, full_train = sft.render_turns(conv, TOK, final_assistant=True)
    assert weighted.ids == last_zero.ids == full_ids
    assert weighted.train == prompt_completion.train != full_train  # only the last reply is trained
    assert [a or b for a, b in zip(weighted.train, last_zero.train, strict=True)] == full_train
    assert sum(last_zero.train) == len(conv[2]["content"]) + 1  # "4</s>": the earlier reply only
    for w in (0.5, 2, "0", True):
        f.write_text(json.dumps({"messages": [conv[0], {**CONVS[0][1], "weight": w}]}) + "\n")
        with pytest.raises(DataError, match=rf"w.jsonl:1: field 'messages\[1\].weight' is {re.escape(json.dumps(w))}; "
                                            r"expected 0 \(the message is context, not trained\) or 1"):
            sft.read_sft(f, TOK)
        f.write_text(json.dumps({"prompt": [conv[0]], "completion": [{**CONVS[0][1], "weight": w}]}) + "\n")
        with pytest.raises(DataError, match=r"w.jsonl:1: field 'completion\[0\].weight' is "):
            sft.read_sft(f, TOK)
    f.write_text(json.dumps({"messages": [conv[2], {**conv[2], "weight": 0}, conv[4]]}) + "\n")
    with pytest.raises(DataError, match=r"w.jsonl:1: field 'messages': assistant turn 1 joins consecutive assistant "
                                        "messages of weight 0 and 1"):
        sft.read_sft(f, TOK)


def test_a_dpo_reply_of_weight_0_is_refused(tmp_path: Path) -> None:
    """A reply message's mistral-finetune weight was ignored in DPO data: `"weight": 0` (in sft: context,
    not trained) trained the reply anyway, and a weight of 0.5 passed unchecked. 1 reads as no weight; 0 is
    refused naming the line and field (a pair with an untrained reply is no preference), any other
    weight as in SFT; the prompt's assistant turns are context whatever their weight, as in SFT's prompt."""
    conv = [dict(m) for m in CONVS[1]]
    reply = {"role": "assistant", "content": "6."}
    f = tmp_path / "w.jsonl"
    f.write_text(json.dumps({"prompt": conv[:4], "chosen": [reply], "rejected": "7."}) + "\n"
                 + json.dumps({"prompt": [*conv[:2], {**conv[2], "weight": 0}, conv[3]],
                               "chosen": [{**reply, "weight": 1}], "rejected": "7."}) + "\n")
    plain, weighted = dpo.read_pairs(f, TOK)
    assert (plain.prompt, plain.chosen, plain.rejected) == (weighted.prompt, weighted.chosen, weighted.rejected)
    implicit = {"chosen": [*conv[:4], reply], "rejected": [*conv[:4], {"role": "assistant", "content": "7."}]}
    for field in ("chosen", "rejected"):
        for row in ({"prompt": conv[:4], "chosen": [reply], "rejected": [reply]},
                    {"messages": conv[:4], "chosen": [reply], "rejected": [reply]}, implicit):
            row = {**row, field: [*row[field][:-1], {**row[field][-1], "weight": 0}]}
            f.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
            with pytest.raises(DataError, match=rf"w.jsonl:2: field '{field}' is a message of \"weight\": 0 \(context, "
                                                r"not trained, as in sft data\); DPO trains both replies of a pair: "
                                                r"drop the weight, or the pair$"):
                dpo.read_pairs(f, TOK)
    f.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": [{**reply, "weight": 0.5}]}) + "\n")
    with pytest.raises(DataError, match=r"w.jsonl:1: field 'rejected\[0\].weight' is 0.5; expected 0"):
        dpo.read_pairs(f, TOK)


def test_a_prompt_ending_in_an_assistant_prefix_is_continued(tmp_path: Path) -> None:
    """A prompt whose last message is an assistant one with prefix=True (mistral-common's, as
    Tokenizer.encode_chat renders it) is continued by the completion or reply: no </s> after the
    prefix (there was one, so the model was trained to go on after its own end of turn)."""
    from mixlab.tokenizer import default_tokenizer_path, load_tokenizer
    from mixlab.train.data import FileTokenizer

    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure,", "prefix": True}]
    f = tmp_path / "prefix.jsonl"
    f.write_text(json.dumps({"prompt": prompt, "completion": " here."}) + "\n"
                 + json.dumps({"messages": [prompt[0], {"role": "assistant", "content": "Sure, here."}]}) + "\n")
    ex, whole = sft.read_sft(f, TOK)
    assert ex.ids == whole.ids and sum(ex.train) == len(" here.") + 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": " here.", "rejected": " no."}) + "\n")
    (pair,) = dpo.read_pairs(pairs, TOK)
    assert pair.prompt == ex.ids[:-len(pair.chosen)]
    if default_tokenizer_path().exists():  # the Mixtral tokenizer (mistral-common)
        want = load_tokenizer(default_tokenizer_path()).encode_chat(prompt)
        assert sft.render_turns(prompt, FileTokenizer(None, name="mixtral"), final_assistant=False)[0] == want


def test_sft_and_dpo_name_each_others_data(chat_files: tuple[Path, Path]) -> None:
    """sft on DPO pairs said "field 'completion' is missing (the row has: chosen, prompt, rejected)", dpo on
    SFT conversations "field 'chosen' is missing (the row has: messages)"; each names the other command."""
    with pytest.raises(DataError, match=r"dpo.jsonl:1: a preference pair \('chosen' and 'rejected'\), which mixlab "
                                        "dpo trains on; sft takes 'messages', or 'prompt' and 'completion'$"):
        sft.read_sft(chat_files[1], TOK)
    with pytest.raises(DataError, match=r"sft.jsonl:1: a conversation to imitate \('messages'\), which mixlab sft "
                                        "trains on; dpo takes 'chosen' and 'rejected' replies to a prompt$"):
        dpo.read_pairs(chat_files[0], TOK)
    typo = chat_files[0].parent / "typo.jsonl"  # a DPO prompt in `messages` ends with a user turn: not SFT's
    typo.write_text(json.dumps({"messages": CONVS[0][:1], "choosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"typo.jsonl:1: field 'chosen' is missing"):
        dpo.read_pairs(typo, TOK)


def test_a_data_folder_is_named_as_one(tmp_path: Path) -> None:
    """--data FOLDER said '/tmp/x: Is a directory' (an OSError), as if the folder were broken."""
    (tmp_path / "chat").mkdir()
    with pytest.raises(DataError, match=r"chat: a folder, not a JSONL file; pass the file \(--data FILE.jsonl\)$"):
        sft.read_sft(tmp_path / "chat", TOK)


def test_line_separators_inside_json_strings_stay_in_their_line(tmp_path: Path) -> None:
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False),
    datasets' to_json(force_ascii=False)); str.splitlines() broke the line there ('not valid JSON
    (Unterminated string ...)'). Lines end at \\n (and \\r\\n) only."""
    conv = [{"role": "user", "content": "a\u2028b\u2029c\x85d\x1ce"}, {"role": "assistant", "content": "f\u2028g"}]
    f = tmp_path / "chat.jsonl"
    f.write_bytes((json.dumps({"messages": CONVS[0]}) + "\r\n" + json.dumps({"messages": conv}, ensure_ascii=False)
                   + "\n").encode())
    exs = sft.read_sft(f, TOK)
    assert [e.where for e in exs] == [f"{f}:1", f"{f}:2"]
    assert exs[1].ids == sft.render_turns(conv, TOK, final_assistant=True)[0]


def test_bytes_that_are_not_utf8_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "chat.jsonl"
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'
    f.write_bytes(json.dumps({"messages": CONVS[0]}).encode() + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: not UTF-8 text \(b'\\xe9' at byte 46 of the line\)"):
        sft.read_sft(f, TOK)


@pytest.mark.parametrize("obj, match", [
    ({"prompt": "Hi", "chosen": "a", "reject": "b"}, r"bad.jsonl:1: field 'rejected' is missing \(the row has: "
                                                     r"chosen, prompt, reject\)$"),
    ({"prompt": "Hi", "chosen": "", "rejected": "b"}, r"bad.jsonl:1: field 'chosen' must be a non-empty string"),
    ({"chosen": "a", "rejected": "b"}, r"bad.jsonl:1: no field 'prompt' or 'messages', so 'chosen' and 'rejected' "
                                        r"must be whole conversations .*; they share no first turn$"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "more"}, {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     r"bad.jsonl:1: .*after the 1 turn\(s\) they share, 'chosen' has 3 turn\(s\), the first by 'assistant'$"),
    ({"chosen": 3, "rejected": "b"}, r"bad.jsonl:1: field 'chosen' must be a string or a list of messages, got int$"),
    ({"prompt": "Hi", "rejected": "b"}, r"bad.jsonl:1: field 'chosen' is missing"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], "chosen": "a", "rejected": "b"},
     r"bad.jsonl:1: field 'prompt\[1\].role' is 'robot'"),
    ({"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     r"bad.jsonl:1: field 'messages': "),
])
def test_malformed_dpo_data(tmp_path: Path, obj: dict, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(obj) + "\n")
    with pytest.raises(DataError, match=match):
        dpo.read_pairs(f, TOK)


def test_a_prompt_of_messages_is_trl_conversational_format(tmp_path: Path) -> None:
    """TRL's conversational preference rows (prompt, chosen and rejected as message lists) read as the
    same pair as `messages` + string replies; the prompt list was refused ('expected a string field
    'prompt' or a list field 'messages', found: chosen, prompt, rejected')."""
    conv = CONVS[1][:-1]
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": conv, "chosen": [{"role": "assistant", "content": "6."}],
                             "rejected": [{"role": "assistant", "content": "7."}]}) + "\n"
                 + json.dumps({"messages": conv, "chosen": "6.", "rejected": "7."}) + "\n")
    trl_row, ours = dpo.read_pairs(f, TOK)
    assert (trl_row.prompt, trl_row.chosen, trl_row.rejected) == (ours.prompt, ours.chosen, ours.rejected)
    assert trl_row.prompt == sft.render_turns(conv, TOK, final_assistant=False)[0]


def test_an_implicit_prompt_is_split_as_trl_does(tmp_path: Path) -> None:
    """TRL's implicit-prompt rows (`chosen` and `rejected` whole conversations, no `prompt`) read as
    the explicit rows trl.extract_prompt makes of them; raw Anthropic HH rows (transcript strings) as
    their turns. They were refused ('expected a field 'prompt' ... found: chosen, rejected')."""
    pytest.importorskip("trl")
    from trl import extract_prompt

    conv = CONVS[1][:-1]
    rows = [{"chosen": [*conv, {"role": "assistant", "content": "6."}],
             "rejected": [*conv, {"role": "assistant", "content": "7."}]},
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 6.",
             "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 7."}]
    f = tmp_path / "implicit.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extract_prompt(rows[0]),
                                                        {"messages": CONVS[1][1:4], "chosen": "6.", "rejected": "7."}]))
    implicit, hh, explicit, hh_explicit = dpo.read_pairs(f, TOK)
    for got, want in ((implicit, explicit), (hh, hh_explicit)):
        assert (got.prompt, got.chosen, got.rejected) == (want.prompt, want.chosen, want.rejected)
    assert TOK.decode(hh.prompt) == "[INST] 2+2? [/INST]4[INST] and 3+3? [/INST]"  # (decode drops <s>, </s>)


def test_transcripts_become_chat_turns() -> None:
    assert sft.transcript_turns("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert sft.transcript_turns("just a question") == [{"role": "user", "content": "just a question"}]
    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "chat" / "dpo.jsonl"
    if not corpus.is_file():
        pytest.skip("shared corpus not found")
    rows = [json.loads(ln) for ln in corpus.read_text(encoding="utf-8").splitlines()[:300]]
    same = [sft.transcript_turns(r["prompt"]) == r["prompt_messages"] for r in rows if "prompt_messages" in r]
    assert len(same) > 100 and sum(same) / len(same) > 0.97


# -- DPO losses ----------------------------------------------------------------------------------------


def _trl_loss(per_tok: torch.Tensor, comp: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *,
              loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL's DPOTrainer._compute_loss on the given per-token log-probs (its model replaced by a stub
    returning them; precomputed reference log-probs)."""
    from trl import DPOTrainer

    n2, L = comp.shape
    out = types.SimpleNamespace(log_probs=per_tok * comp[:, 1:], entropy=torch.zeros(n2, L - 1),
                                mean_logits=torch.zeros(n2, L - 1), is_top1=torch.zeros(n2, L - 1, dtype=torch.bool))
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    metrics: dict = defaultdict(lambda: defaultdict(list))
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n2, L, dtype=torch.long), "attention_mask": torch.ones(n2, L, dtype=torch.long),
              "completion_mask": comp, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "reference_free"])
def test_dpo_loss_equals_trl_and_the_paper(loss_type: str) -> None:
    """Loss, gradients and logged metrics equal TRL 1.16's on the same per-token log-probs; its `ipo`
    and `sigmoid_norm` are mixlab's loss with `lengths` (length_normalize), its rewards sums."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    N, L, beta = 5, 12, 0.3
    comp = torch.zeros(2 * N, L, dtype=torch.long)
    for i in range(2 * N):
        comp[i, 3 + i % 4:] = 1  # replies of different lengths
    per_tok = (-torch.rand(2 * N, L - 1, generator=g) * 3).requires_grad_()
    ref = -torch.rand(2 * N, generator=g) * 20
    ref_c, ref_r = ref[:N], ref[N:]
    if loss_type == "reference_free":  # TRL has no switch for it: the reference-free loss is h with ref = 0
        ref_c, ref_r = torch.zeros(N), torch.zeros(N)
    want, trl_metrics = _trl_loss(per_tok, comp, ref_c, ref_r, beta=beta,
                                  loss_type="sigmoid" if loss_type == "reference_free" else loss_type)
    (g_want,) = torch.autograd.grad(want, per_tok)
    mask = comp[:, 1:].bool()
    # sequence_logps on logits whose log-softmax at the target is per_tok: a 2-way vocabulary.
    logits = torch.stack([per_tok, torch.log1p(-per_tok.exp().clamp(max=1 - 1e-7))], -1)
    lp = dpo.sequence_logps(logits, torch.zeros_like(mask, dtype=torch.long), mask)
    n = mask.sum(-1)
    got, m = dpo.dpo_loss(lp[:N], lp[N:], ref_c, ref_r, beta=beta, loss_type="ipo" if loss_type == "ipo" else "sigmoid",
                          reference_free=loss_type == "reference_free",
                          lengths=(n[:N], n[N:]) if loss_type in ("ipo", "sigmoid_norm") else None)
    (g_got,) = torch.autograd.grad(got, per_tok)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert float(m[k]) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-6), k
    # The paper's formulas, written out per pair.
    with torch.no_grad():
        pc, pr = lp[:N].double(), lp[N:].double()
        rc, rr = ref_c.double(), ref_r.double()
        h = (pc - rc) - (pr - rr)
        hn = (pc - rc) / n[:N] - (pr - rr) / n[N:]  # per-token log-ratios
        if loss_type == "ipo":
            paper = ((hn - 1 / (2 * beta)) ** 2).mean()  # Azar et al. eq. 17
        else:
            paper = (-torch.log(1 / (1 + torch.exp(-beta * (hn if loss_type == "sigmoid_norm" else h))))).mean()
        assert float(got) == pytest.approx(float(paper), rel=1e-6)
    if loss_type == "ipo":  # the rewards are sums, not beta times the per-token log-ratios the loss takes
        assert float(m["rewards/margins"]) == pytest.approx(float(beta * h.mean()), rel=1e-5)
        assert abs(float(m["rewards/margins"]) - float(beta * hn.mean())) > 0.1


def test_long_pairs_keep_the_prompt_end_and_the_reply_start() -> None:
    """docs/instruct.md, "Truncation": BOS + the prompt's end + the reply's start (at most half when
    the prompt is longer), max_len tokens in all; a pair that fits is unchanged."""
    prompt, reply = [1, *range(100, 130)], [*range(200, 240), 2]
    assert dpo.fit(prompt, reply, 80) == (prompt, reply)
    p, r = dpo.fit(prompt, reply, 20)
    assert (p, r) == ([1, *range(121, 130)], list(range(200, 210)))
    p, r = dpo.fit(prompt[:4], reply, 20)  # a short prompt stays whole; the reply takes the rest
    assert (p, r) == (prompt[:4], list(range(200, 216)))
    b = dpo.collate_pairs([dpo.Pair(prompt, reply, reply[:3])], [0], 19)
    assert b.tokens.shape == (2, 19) and int(b.reply[0].sum()) == 10 and int(b.reply[1].sum()) == 3


def test_label_smoothing_is_conservative_dpo() -> None:
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    eps, beta = 0.2, 0.5
    got, _ = dpo.dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    h = beta * ((c - rc) - (r - rr)).double()
    want = (-(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))).mean()  # cDPO
    assert float(got) == pytest.approx(float(want), rel=1e-6)


# -- LoRA ----------------------------------------------------------------------------------------------

ALL = ("attention", "experts", "router")


def _randomize_B(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_zero_init_adapters_leave_logits_unchanged() -> None:
    x = torch.randint(0, 259, (2, 20))
    ref = _model()(x)
    m = apply_lora(_model(), LoraConfig(rank=4, targets=ALL))
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    assert {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16", "int8", "int4"])
def test_merged_weights_equal_the_adapter_model(base_dtype: str) -> None:
    x = torch.randint(0, 259, (2, 20))
    m = apply_lora(_model(cfg=CFG4 if base_dtype == "int4" else CFG),
                   LoraConfig(rank=4, alpha=8, targets=ALL, base_dtype=base_dtype))
    _randomize_B(m)
    want = m(x)
    got = merge(m)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if base_dtype != "float32":  # the frozen base is really held low-precision
        held = expert_lora(m.layers[0].ffn, "w13").base
        stored = held.w if base_dtype == "bfloat16" else held.q
        assert stored.dtype == {"bfloat16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[base_dtype]
        router = m.layers[0].ffn.gate.parametrizations.weight[0].base  # int4: float32, as int4 inference keeps it
        assert router.dtype == ("float32" if base_dtype == "int4" else base_dtype)


def test_an_int4_base_holds_what_int4_inference_holds() -> None:
    """`base_dtype="int4"` keeps each targeted weight as `prepare_for_inference(quant="int4")` does (Q4_0's
    rounding, a float16 scale per 32 inputs: half a byte and 1/16 of a byte per weight), so an adapter
    trained over it is served over the same weights; the fresh adapter model is the model with those
    weights dequantised."""
    from mixlab.model.formats import Int4Experts
    from mixlab.model.inference import quantize_model_int4
    from mixlab.ops.quant import Int4Linear, dequantize_int4

    x = torch.randint(0, 259, (2, 20))
    served = quantize_model_int4(_model(cfg=CFG4))
    m = apply_lora(_model(cfg=CFG4), LoraConfig(rank=4, targets=("attention", "experts"), base_dtype="int4"))
    plain = _model(cfg=CFG4)
    for block, ref, out in zip(m.layers, served.layers, plain.layers, strict=True):
        experts = ref.ffn.experts
        assert isinstance(experts, Int4Experts)
        for name in ("w13", "w2"):
            held = expert_lora(block.ffn, name).base
            assert torch.equal(held.q, getattr(experts, name))
            assert torch.equal(held.s, getattr(experts, f"{name}_scale"))
            assert held.q.numel() * 2 == held.s.numel() * 32 == getattr(out.ffn.experts, name).numel()
            getattr(out.ffn.experts, name).data.copy_(dequantize_int4(held.q, held.s, torch.float32))
        for name in ("wqkv", "wo"):
            lin = getattr(ref.attn, name)
            assert isinstance(lin, Int4Linear)
            held = getattr(block.attn, name).base
            assert torch.equal(held.q, lin.weight) and torch.equal(held.s, lin.scale)
            getattr(out.attn, name).weight.data.copy_(dequantize_int4(held.q, held.s, torch.float32))
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=1e-6)


def test_an_int4_base_refuses_widths_outside_its_groups() -> None:
    m = _model()  # ffn_dim 48: the experts' down projections have 48 inputs per row
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=r"'int4' holds weights in groups of 32 inputs; experts.w2 has 48 inputs "
                                         r"per row \(target 'experts'\).*the model is unchanged"):
        apply_lora(m, LoraConfig(rank=4, base_dtype="int4"))
    after = dict(m.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], p) and p.requires_grad for n, p in after.items())
    apply_lora(m, LoraConfig(rank=4, targets=("attention",), base_dtype="int4"))  # 32 inputs: fine


def test_adapters_are_made_on_the_device_of_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_lora made every factor on the CPU (its seeded generator's device): over a model on a GPU the
    first forward failed ('Expected all tensors to be on the same device'), so `mixlab sft --device cuda
    --lora-rank R` could not run. No GPU here: the meta device stands in for another one."""
    from mixlab.train import lora

    monkeypatch.setattr(lora, "check_model", lambda m: None)  # it refuses meta weights (no data), rightly
    with torch.device("meta"):
        m = Transformer(CFG)
    apply_lora(m, LoraConfig(rank=2, targets=("attention", "experts", "router")))
    assert {n: p.device.type for n, p in m.named_parameters() if p.device.type != "meta"} == {}


def test_lora_gradients_reach_every_expert_factor() -> None:
    m = apply_lora(_model(), LoraConfig(rank=2, targets=ALL))
    _randomize_B(m)
    m.train()
    x = torch.randint(0, 259, (4, 32))
    lm_loss(m(x), x).backward()
    p13 = expert_lora(m.layers[0].ffn, "w13")
    assert p13.lora_A.grad is not None and (p13.lora_A.grad.abs().sum((1, 2)) > 0).all()  # every expert used


def test_lora_arguments_are_checked_by_name() -> None:
    # targets="attention" was read letter by letter; dropout="0.1" was a TypeError from a comparison;
    # apply_lora over adapters a KeyError from torch ("attribute 'w13' already exists"), a str config an
    # AttributeError.
    assert LoraConfig(targets="attention").targets == ("attention",)
    assert LoraConfig(targets="attention, router") == LoraConfig(targets=["attention", "router"])
    for kw, match in (({"targets": "attn"}, r"LoRA targets \['attn'\]"), ({"targets": 5}, r"LoRA targets \[5\]"),
                      ({"dropout": "0.1"}, "dropout must be a number"), ({"rank": True}, "rank must be"),
                      ({"seed": "1"}, "seed must be an integer")):
        with pytest.raises(ValueError, match=match):
            LoraConfig(**kw)
    m = apply_lora(_model(), LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"already holds LoRA adapters \(layers.0.attn.wqkv.lora_A\)"):
        apply_lora(m, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="apply_lora takes a LoraConfig"):
        apply_lora(_model(), "r8")  # type: ignore[arg-type]


def test_peft_module_names_as_targets_say_which_group_holds_them() -> None:
    """`--lora-targets q_proj,v_proj` (PEFT's default for Mixtral) said only 'expected some of attention,
    experts, router': the refusal now maps each PEFT name it knows onto mixlab's group."""
    with pytest.raises(ValueError, match=r"^LoRA targets \['q_proj', 'v_proj', 'w2', 'gate'\]: expected some of "
                                         r"attention, experts, router \(PEFT's module names map onto these groups: "
                                         r"q_proj -> attention, v_proj -> attention, w2 -> experts, gate -> router; "
                                         r"a group adapts all of its modules\)$"):
        LoraConfig(targets=("q_proj", "v_proj", "w2", "gate"))
    with pytest.raises(ValueError, match=r"^LoRA targets \['mlp'\]: expected some of attention, experts, router$"):
        LoraConfig(targets=("mlp",))


def test_lora_on_a_dense_model_equals_peft_and_refuses_a_router(tmp_path: Path) -> None:
    """A dense (Mistral) model's adapters ("experts": its FFN) load in PEFT with mixlab's logits; the
    target "router" added no adapter there, silently, so a router-only run failed in backward with
    'element 0 of tensors does not require grad'."""
    dense = ModelConfig(**{**vars(CFG), "moe": None})
    with pytest.raises(ValueError, match=r"LoRA target 'router': the model is dense \(no MoE layer, so no router\)"):
        apply_lora(Transformer(dense), LoraConfig(rank=2, targets=("router",)))
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = Transformer(dense)
    base.init_weights(std=0.1, seed=0)
    save_model(base, tmp_path / "base")
    m = apply_lora(base, LoraConfig(rank=4, alpha=8, targets=("attention", "experts")))
    _randomize_B(m)
    save_peft(m, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                   tmp_path / "adapter").eval()
    x = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), pm(input_ids=x).logits, rtol=0, atol=1e-5)


def test_an_adapter_model_generates_and_preparing_it_asks_for_a_merge() -> None:
    # The engine's native decoder read LoRALinear's float scale as int8 row scales: generate raised
    # an AttributeError from model/native.py; prepare_for_inference did too (int8: "already prepared").
    from mixlab.generate import generate
    from mixlab.model.inference import prepare_for_inference

    m = apply_lora(_model(), LoraConfig(rank=4, targets=ALL))
    _randomize_B(m, seed=1)
    ids = [1, 72, 105]
    with torch.no_grad():
        for _ in range(6):  # greedy by full recompute
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(m, [ids[:3]], max_new_tokens=6, stop_at_eos=False) == [ids[3:]]
    for quant in (None, "int8"):
        with pytest.raises(ValueError, match=r"LoRA adapters \(layers.0.attn.wqkv.lora_A\).*merge"):
            prepare_for_inference(m, quant=quant)
    assert generate(merge(m), [ids[:3]], max_new_tokens=6, stop_at_eos=False) == [ids[3:]]


def test_peft_round_trip(tmp_path: Path) -> None:
    """transformers + peft load mixlab's base checkpoint and adapter and give mixlab's logits."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    base = _model()
    save_model(base, tmp_path / "base")
    m = apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets=ALL))
    _randomize_B(m, seed=3)
    info = save_peft(m, tmp_path / "adapter")
    assert "q_proj" in info.target_modules
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        got = pm(input_ids=x).logits
        want = m(x)
        plain = hf.get_base_model()(input_ids=x).logits if hasattr(hf, "get_base_model") else None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert plain is None or not torch.allclose(plain, want, atol=1e-3)  # the adapter did something
    # PEFT's merge_and_unload gives mixlab's merged weights (attention, experts and router).
    save_model(merge(m), tmp_path / "merged")
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).state_dict()
    theirs = pm.merge_and_unload().state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_lora_runs_adapter_names_its_base_for_auto_peft(ckpt: Path, chat_files: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """RUN/adapter/adapter_config.json had base_model_name_or_path null, so PEFT's
    AutoPeftModelForCausalLM.from_pretrained(RUN/adapter) could not find the base (it asked the Hub
    for 'None'); it now names the checkpoint the run started from, and gives the merged model's logits."""
    pytest.importorskip("peft")
    from peft import AutoPeftModelForCausalLM
    from transformers import MixtralForCausalLM

    out = tmp_path / "lora"
    finetune(_cfg(ckpt, chat_files[0], out, steps=2, lr=1e-2, lora_rank=2, lora_targets="attention,experts,router",
                  eval_every=0, export_hf=True))
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(ckpt.resolve())
    x = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoPeftModelForCausalLM.from_pretrained(out / "adapter", dtype=torch.float32).eval()(x).logits
        want = MixtralForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_first_step_equals_peft_and_its_parameters_do_not(tmp_path: Path) -> None:
    """docs/instruct.md: a fresh adapter exported to PEFT and loaded trainable gives mixlab's loss and
    gradient norm (B = 0: only B has a gradient); PEFT's q/k/v get an A each, 2 r D more parameters per
    layer than mixlab's shared one, so training goes apart from the second step."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    save_model(_model(), tmp_path / "base")
    m = apply_lora(_model(), LoraConfig(rank=4, alpha=8, targets=ALL)).train()
    save_peft(m, tmp_path / "adapter")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).train()
    x = torch.randint(3, 259, (3, 30), generator=torch.Generator().manual_seed(0))
    ours = lm_loss(m(x[:, :-1]), x[:, 1:])
    theirs = pm(input_ids=x, labels=x).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    norms, counts = [], []
    for model in (m, pm):
        trained = [p for p in model.parameters() if p.requires_grad]
        norms.append(torch.sqrt(sum(p.grad.square().sum() for p in trained if p.grad is not None)))
        counts.append(sum(p.numel() for p in trained))
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
    assert counts[1] - counts[0] == CFG.n_layers * 2 * 4 * CFG.dim


# -- runs ----------------------------------------------------------------------------------------------


def _cfg(ckpt: Path, data: Path, out: Path, **kw: Any) -> Any:
    base: dict[str, Any] = dict(model=str(ckpt), data=str(data), out=str(out), seq_len=64, batch_size=3, steps=4,
                                warmup=1, lr=3e-3, eval_every=2, ckpt_every=0, log_every=1, progress=False,
                                valid_fraction=0.2, threads=1)
    base.update(kw)
    return load_finetune_config(None, **base)


@pytest.mark.parametrize("task, lora, base", [("sft", 0, "float32"), ("dpo", 0, "float32"), ("sft", 4, "float32"),
                                              ("dpo", 4, "float32"), ("sft", 4, "int4")])
def test_resume_is_exact(ckpt: Path, ckpt4: Path, chat_files: tuple[Path, Path], tmp_path: Path, task: str,
                         lora: int, base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = chat_files[0] if task == "sft" else chat_files[1]
    kw: dict[str, Any] = dict(task=task, lora_rank=lora, export_peft=lora > 0,
                              **({"lora_targets": "attention,experts,router", "lora_base_dtype": base} if lora else {}))
    if base == "int4":  # the frozen base rebuilt (quantised again) on resume: the same bits
        ckpt = ckpt4
    straight = finetune(_cfg(ckpt, data, tmp_path / "a", **kw))
    # with LoRA the same call twice (resume="auto", --auto-resume): it starts, then continues
    first = finetune(_cfg(ckpt, data, tmp_path / "b", **kw), stop_after=2, resume="auto" if lora else False)
    assert first.step == 2
    ref_file = tmp_path / "b" / "reference_logps.safetensors"
    stamp = ref_file.stat().st_mtime_ns if task == "dpo" else None
    hashed: list[str] = []  # checksum passes over a checkpoint (each reads every byte)
    verify = checkpoints.verify
    monkeypatch.setattr(checkpoints, "verify", lambda p: (hashed.append(Path(p).name), verify(p))[1])
    second = finetune(_cfg(ckpt, data, tmp_path / "b", **kw), resume="auto" if lora else True)
    assert second.step == 4
    assert hashed.count("step_00000002") == 1  # the resume hashes the checkpoint once
    keys = ["loss", "aux_loss"] + (["rewards/accuracies", "rewards/margins", "logps/chosen"] if task == "dpo" else [])
    for k in keys:
        assert [r[k] for r in straight.history] == [r[k] for r in first.history + second.history], k
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    if task == "dpo":
        assert ref_file.stat().st_mtime_ns == stamp  # computed once, reused by the resume
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"} <= set(straight.history[0])
        assert "eval_rewards/accuracies" in straight.evals[-1]
    assert (tmp_path / "a" / "hf" / "config.json").is_file() == (not lora)  # a LoRA run's result: its adapter
    exports = ["adapter"] if lora else ["hf"]
    for name in exports:  # one atomic folder each, its manifest listing mixlab_data.json (replaceable later)
        assert (tmp_path / "a" / name / "mixlab_data.json").is_file()
        assert atomic.foreign_entries(tmp_path / "a" / name) == [], name
    assert not [p.name for p in (tmp_path / "b").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_grad_accum_equals_one_large_batch(ckpt: Path, tmp_path: Path, task: str) -> None:
    """grad_accum micro-batches of b rows = one batch of grad_accum x b rows: the same loss and gradient
    (norm) per step. SFT micro-batches hold different numbers of assistant tokens: the step's loss is
    the mean over all of them (a mean of per-micro-batch means weighted each token by 1 / its
    micro-batch's count). The load-balancing loss is per micro-batch (docs/training.md): off here."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}." + "!" * i}]}
            for i in range(12)]
    pairs = [{"prompt": f"Human: Say {i}.\n\nAssistant:", "chosen": f"{i}", "rejected": f"No, {i + 1}." + "?" * i}
             for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows if task == "sft" else pairs)))
    runs = [finetune(_cfg(ckpt, data, tmp_path / f"r{k}", task=task, batch_size=4 // k, grad_accum=k, steps=2,
                          eval_every=0, valid_fraction=0, export_hf=False, aux_loss_coef=0.0, clip=0.0)).history
            for k in (1, 2, 4)]
    for h in runs[1:]:
        for k in ("loss", "grad_norm"):
            torch.testing.assert_close([r[k] for r in h], [r[k] for r in runs[0]], rtol=2e-6, atol=0, msg=k)


def test_sft_step_equals_trl_sft_trainer(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path) -> None:
    """A whole SFT step against TRL's SFTTrainer (completion-only loss) on the same checkpoint and
    conversations (2 accumulated micro-batches there; one batch and 2 micro-batches here): the same
    loss and gradient norm (load-balancing loss off: transformers' differs by design, docs/training.md)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    exs = sft.read_sft(chat_files[0], TOK)
    assert all(len(e.ids) > 33 for e in exs)  # one conversation per row of 64: mixlab's batch is all of them
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"b{i}": i + 3 for i in range(256)}  # ids given: never used
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ds = Dataset.from_list([{"input_ids": e.ids, "completion_mask": [int(t) for t in e.train]} for e in exs])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(exs) // 2,
                     gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-3, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, max_length=65, completion_only_loss=True,
                     packing=False, router_aux_loss_coef=0.0, disable_tqdm=True, bf16=False)
    trainer = SFTTrainer(model=MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32), args=args,
                         train_dataset=ds, processing_class=tok)
    trainer.train()
    theirs = next(h for h in trainer.state.log_history if "loss" in h)
    for accum in (1, 2):
        ours = finetune(_cfg(ckpt, chat_files[0], tmp_path / f"m{accum}", batch_size=len(exs) // accum,
                             grad_accum=accum, steps=1, eval_every=0, valid_fraction=0, export_hf=False,
                             aux_loss_coef=0.0)).history[0]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6), accum
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), accum


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_steps_equal_trl_dpo_trainer(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                         loss_type: str) -> None:
    """Two DPO steps against TRL's DPOTrainer (sigmoid, or ipo: mixlab's with length_normalize; beta
    0.1, precomputed reference log-probs, the same AdamW, constant lr, clipping at 1) on the same
    checkpoint and pairs, tokenized to the same ids by the byte tokenizer of benchmarks/finetune.py:
    the same loss, gradient norm, rewards and accuracies at each step, one batch here or 2 accumulated
    micro-batches."""
    pytest.importorskip("trl")
    import importlib.util

    from datasets import Dataset
    from tokenizers import processors
    from transformers import MixtralForCausalLM
    from trl import DPOConfig, DPOTrainer

    spec = importlib.util.spec_from_file_location("bench_finetune", Path(__file__).parents[1] / "benchmarks" /
                                                  "finetune.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = bench.byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(chat_files[1].read_text().splitlines(keepends=True)[:8]))
    pairs = dpo.read_pairs(data, TOK)
    rows = [json.loads(ln) for ln in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": TOK.decode(p.prompt[1:]), "chosen": r["chosen"], "rejected": r["rejected"]}
                            for p, r in zip(pairs, rows, strict=True)])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                     lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, beta=0.1, loss_type=[loss_type],
                     precompute_ref_log_probs=True, max_length=None, router_aux_loss_coef=0.0, disable_tqdm=True)
    trainer = DPOTrainer(model=MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32), args=args,
                         train_dataset=ds, processing_class=tok)
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == pairs[0].prompt and first["chosen_ids"] == pairs[0].chosen  # the same ids
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    for accum in (1, 2):
        ours = finetune(_cfg(ckpt, data, tmp_path / f"m{accum}", task="dpo", batch_size=8 // accum, grad_accum=accum,
                             steps=2, warmup=0, min_lr_ratio=1.0, lr=1e-3, beta2=0.999, clip=1.0, eval_every=0,
                             valid_fraction=0, export_hf=False, aux_loss_coef=0.0, loss=loss_type,
                             length_normalize=loss_type == "ipo")).history
        for k in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected"):
            assert [r[k] for r in ours] == pytest.approx([h[k] for h in theirs], rel=1e-5, abs=1e-6), (accum, k)


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8", "int4"])
def test_dpo_over_a_low_precision_lora_base_starts_at_its_reference(ckpt: Path, ckpt4: Path,
                                                                   chat_files: tuple[Path, Path],
                                                                   tmp_path: Path, base_dtype: str) -> None:
    """The reference is the policy before its first step: the adapters at zero over the base as held
    (bf16 / int8), as PEFT's disable_adapter() is in TRL. The first step's loss is log 2 and its
    rewards 0 (the reference was the float32 checkpoint: h was the quantisation error)."""
    res = finetune(_cfg(ckpt4 if base_dtype == "int4" else ckpt, chat_files[1], tmp_path / "r", task="dpo",
                        lora_rank=4, lora_base_dtype=base_dtype,
                        steps=1, export_peft=False, export_hf=False))
    first = res.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first["rewards/margins"]) < 1e-6 and abs(first["rewards/chosen"]) < 1e-6


def test_reference_free_dpo_skips_the_reference_pass(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """reference_free: no reference model, so no pass computing its log-probs and no file of them;
    the loss and the rewards are those of ref = 0 (dpo.dpo_loss), held-out ones included."""
    import mixlab.train.finetune as ft

    real, calls = ft.reference_logps, []

    def counted(model: Any, pairs: Any, cfg: Any, par: Any = None) -> Any:
        calls.append(len(pairs))
        return real(model, pairs, cfg, par)

    monkeypatch.setattr(ft, "reference_logps", counted)
    res = finetune(_cfg(ckpt, chat_files[1], tmp_path / "rf", task="dpo", reference_free=True, steps=2, eval_every=2))
    assert not (tmp_path / "rf" / "reference_logps.safetensors").exists()
    first = res.history[0]
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-5)  # beta x (pi - 0)
    assert len(calls) == len(res.evals)  # only the held-out policy's own log-probs, once per evaluation
    last = res.evals[-1]  # each of TRL's metrics on the held-out pairs too, as TRL's evaluate logs them
    assert {f"eval_{k}" for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                  "logps/chosen", "logps/rejected")} <= last.keys()
    assert last["eval_rewards/chosen"] == pytest.approx(0.1 * last["eval_logps/chosen"], rel=1e-5)
    # the policy's own preference (docs/instruct.md): with ref = 0 its summed accuracy is the rewards' accuracy,
    # its margin the mean chosen - rejected log-prob; per reply token, a share of the pairs too
    assert last["eval_logps/accuracy"] == pytest.approx(last["eval_rewards/accuracies"])
    assert last["eval_logps/margin"] == pytest.approx(last["eval_logps/chosen"] - last["eval_logps/rejected"], rel=1e-5)
    assert 0 <= last["eval_logps/accuracy_per_token"] <= 1


def test_the_dpo_reference_pass_shows_progress(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The reference pass runs over every pair before step 1 (minutes on a large model): it said nothing,
    so a run looked hung between the data's warnings and its first step. Off a terminal a line says what
    runs; on one a bar counts the pairs; progress=False (--quiet): neither."""
    finetune(_cfg(ckpt, chat_files[1], tmp_path / "a", task="dpo", steps=1, eval_every=0, progress=True))
    err = capsys.readouterr().err
    n = len(chat_files[1].read_text().splitlines())
    assert f"reference log-probs of {n} pairs (the starting model, once, before step 1; stored in " in err
    assert err.index("reference log-probs") < err.index("step 1/1")
    finetune(_cfg(ckpt, chat_files[1], tmp_path / "b", task="dpo", steps=1, eval_every=0))
    assert "reference log-probs" not in capsys.readouterr().err

    import mixlab.train.finetune as ft

    class Bar:  # a terminal's bar: it reaches the pair count, training pairs then held-out ones
        disable = False
        n = 0
        seen: list[int] = []

        def update(self, k: int) -> None:
            self.n += k
            self.seen.append(self.n)

        def close(self) -> None:
            pass

    bar = Bar()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "_reference_progress", lambda n_pairs, rf: bar)
        finetune(_cfg(ckpt, chat_files[1], tmp_path / "c", task="dpo", steps=1, eval_every=0, progress=True))
    assert bar.seen == sorted(bar.seen) and bar.seen[-1] == n and len(bar.seen) > 2


def test_sft_learns_and_cli(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from mixlab.cli import main

    res = finetune(_cfg(ckpt, chat_files[0], tmp_path / "a", steps=12, eval_every=12))
    assert res.evals[-1]["eval_loss"] < res.evals[0]["eval_loss"]
    assert main(["sft", "--model", str(ckpt), "--data", str(chat_files[0]), "--out", str(tmp_path / "cli"),
                 "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--threads", "1", "--lora-rank", "2",
                 "--merge"]) == 0
    assert (tmp_path / "cli" / "hf" / "config.json").is_file() and (tmp_path / "cli" / "adapter").is_dir()
    assert main(["dpo", "--model", str(tmp_path / "cli"), "--data", str(chat_files[1]), "--out",
                 str(tmp_path / "cli-dpo"), "--steps", "1", "--seq-len", "64", "--batch-size", "2", "--threads", "1",
                 "--loss", "ipo", "--beta", "0.5"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "hello"}\n')
    assert main(["sft", "--model", str(ckpt), "--data", str(bad), "--out", str(tmp_path / "x"), "--seq-len", "64"]) == 1
    assert "bad.jsonl:1: field 'messages' must be a non-empty list" in capsys.readouterr().err
    # The default seq_len (512) past a small model's context was refused (the demo's model of 256 positions):
    # it is lowered to the context and said once, as eval's --context is; the run records the length it used.
    capsys.readouterr()
    for task, data, rows in (("sft", chat_files[0], "packing rows"), ("dpo", chat_files[1], "pairs cut to sequences")):
        out = tmp_path / f"default-{task}"
        assert main([task, "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
                     "--batch-size", "2", "--threads", "1", "--eval-every", "0", "--quiet"]) == 0
        err = capsys.readouterr().err
        assert err.count("note:") == 1 and (f"mixlab {task}: note: --seq-len's default 512 is past the model's 256 "
                                            f"positions; {rows} of 256 tokens\n") in err
        assert json.loads((out / "finetune_config.json").read_text())["seq_len"] == 256
    # A length given past it stays an error naming where it was given: the flag's a usage error (exit 2), the
    # config file's the file's (exit 1)
    assert main(["sft", "--model", str(ckpt), "--data", str(chat_files[0]), "--out", str(tmp_path / "y"),
                 "--seq-len", "512"]) == 2
    assert ("seq_len 512 is beyond the model's context (max_seq_len 256); set --seq-len (seq_len in a config file) "
            "to 256 or less") in capsys.readouterr().err
    (tmp_path / "long.toml").write_text("seq_len = 512\n")
    assert main(["dpo", str(tmp_path / "long.toml"), "--model", str(ckpt), "--data", str(chat_files[1]), "--out",
                 str(tmp_path / "y")]) == 1
    assert f"{tmp_path / 'long.toml'}: seq_len 512 is beyond the model's context" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_pair_logps_equal_trl_collator_and_transformers(tmp_path: Path) -> None:
    """Sequence log-probs of chosen and rejected replies equal those from TRL's DPO collator
    (prompt + reply, its completion_mask) through transformers' model: the prompt masked, the reply
    and its </s> counted, right padding ignored."""
    pytest.importorskip("trl")
    from transformers import MixtralForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from mixlab.train.finetune import pair_logps

    m = _model()
    save_model(m, tmp_path / "base")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32).eval()
    pairs = [dpo.Pair(sft.render_turns([{"role": "user", "content": f"Say {i}" * (i + 1)}], TOK,
                                       final_assistant=False)[0],
                      TOK.encode(f"{i}!" * (3 - i), bos=False, eos=True),
                      TOK.encode(f"No {i + 1} " * (i + 2), bos=False, eos=True)) for i in range(3)]
    b = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs])
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        want = (lp * b["completion_mask"][:, 1:]).sum(-1)
        got, _ = pair_logps(m, dpo.collate_pairs(pairs, [0, 1, 2], 200), torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)


def test_padded_pair_logps_equal_each_sequence_alone() -> None:
    from mixlab.train.finetune import pair_logps

    m = _model()
    pairs = [dpo.Pair(*(sft.render_turns(c[:-1], TOK, final_assistant=False)[0],
                        TOK.encode(c[-1]["content"], eos=True), TOK.encode("no " + c[-1]["content"], eos=True)))
             for c in CONVS]
    b = dpo.collate_pairs(pairs, range(3), 200)
    got, _ = pair_logps(m, b, torch.device("cpu"))
    for i, p in enumerate(pairs):
        for j, reply in enumerate((p.chosen, p.rejected)):
            ids = torch.tensor([p.prompt + reply])
            lp = torch.log_softmax(m(ids[:, :-1]), -1)[0].gather(-1, ids[0, 1:, None])[:, 0]
            assert float(got[j * 3 + i]) == pytest.approx(float(lp[len(p.prompt) - 1:].sum()), abs=1e-4)


def test_unexpressible_adapter_exports_merged_weights(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import mixlab.train.finetune as ft
    from mixlab.cli import main

    def refuse(*_a: Any, **_k: Any) -> None:
        raise ValueError("PEFT cannot express these adapters: experts")

    monkeypatch.setattr(ft, "save_peft", refuse)
    with pytest.warns(UserWarning, match=r"LoRA adapter was not exported in PEFT's format \(PEFT cannot express"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "a", steps=1, lora_rank=2, export_hf=False, eval_every=0))
    assert (tmp_path / "a" / "hf" / "config.json").is_file()
    assert "experts" in (tmp_path / "a" / "adapter_not_exported.txt").read_text()
    # sft runs data parallel under torchrun (tests/test_finetune_parallel.py); half of torchrun's environment
    # is named, before anything is read or written
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sft", "--model", str(ckpt), "--data", str(chat_files[0]), "--out", str(tmp_path / "b"),
                 "--seq-len", "64"]) == 1
    assert "WORLD_SIZE=2 is set but RANK is not: launch with torchrun" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_an_out_below_a_file_names_the_file(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--out notes.txt/run` said only "notes.txt/run: Not a directory" (mkdir's error)."""
    from mixlab.cli import main

    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "run"
    assert main(["sft", "--model", str(ckpt), "--data", str(chat_files[0]), "--out", str(out), "--steps", "1",
                 "--seq-len", "64", "--quiet"]) == 1
    assert (f"{out}: {tmp_path / 'notes.txt'} is a file, not a folder; the run folder goes there: choose another "
            "--out") in capsys.readouterr().err


def test_hf_export_brings_the_starting_checkpoints_tokenizer_files(ckpt: Path, chat_files: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """RUN/hf held the weights, config.json and mixlab_data.json only: AutoTokenizer, vLLM or a copy of the
    folder elsewhere found no tokenizer, chat template or generation config, which TRL's output folder
    holds. The starting folder's are copied in (full fine-tuning, a merged LoRA run, and a run that
    starts from a run folder)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ckpt, base)
    files = {"tokenizer_config.json": '{"chat_template": "{{ messages }}"}\n', "generation_config.json": "{}\n",
             "special_tokens_map.json": "{}\n"}
    for name, text in files.items():
        (base / name).write_text(text)
    finetune(_cfg(base, chat_files[0], tmp_path / "full", steps=1, eval_every=0))
    finetune(_cfg(base, chat_files[0], tmp_path / "lora", steps=1, eval_every=0, lora_rank=2, export_hf=True))
    finetune(_cfg(tmp_path / "full", chat_files[1], tmp_path / "dpo", task="dpo", steps=1, eval_every=0))
    for run in ("full", "lora", "dpo"):
        for name, text in files.items():
            assert (tmp_path / run / "hf" / name).read_text() == text, (run, name)
    assert not (tmp_path / "lora" / "adapter" / "tokenizer_config.json").exists()  # PEFT's folder: the adapter


@pytest.mark.parametrize("task,ckpt_every", [("sft", 1), ("dpo", 1), ("sft", 0)])
def test_a_non_finite_step_stops_the_run(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                         task: str, ckpt_every: int) -> None:
    """lr 1e8 made every loss NaN from step 2, and the run went on to export NaN weights to hf/ with exit 0;
    `mixlab train` stops there. Now the step is named, no update is made, and the run has no hf/. With no
    checkpoint written, the message said "the newest checkpoint ... is from before it": it says there is none."""
    from mixlab.errors import TrainingError

    data = chat_files[0] if task == "sft" else chat_files[1]
    cfg = _cfg(ckpt, data, tmp_path / "r", task=task, steps=4, ckpt_every=ckpt_every, eval_every=0, lr=1e8, warmup=0,
               clip=0)
    where = r"The newest checkpoint in .* is from before it$" if ckpt_every else \
        r"No checkpoint has been written yet \(none in .*checkpoints\)$"
    with pytest.raises(TrainingError, match=r"^non-finite loss at step 2 \(loss .*, gradient norm .*, lr .*\); "
                                            r"lower the learning rate \(--lr\)\. " + where):
        finetune(cfg)
    assert not (tmp_path / "r" / "hf").exists()
    ckpts = sorted((tmp_path / "r" / "checkpoints").iterdir()) if (tmp_path / "r" / "checkpoints").exists() else []
    assert [p.name for p in ckpts] == (["step_00000001"] if ckpt_every else [])


def test_a_second_run_into_the_same_out_is_refused(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path) -> None:
    from mixlab.errors import OutputError

    with atomic.exclusive(tmp_path / "run", what="run folder"):  # a run in another process holds it
        with pytest.raises(OutputError, match="another process is writing this run folder now"):
            finetune(_cfg(ckpt, chat_files[0], tmp_path / "run", steps=1))
        assert list((tmp_path / "run").iterdir()) == []


def test_a_failed_reference_logps_save_leaves_no_file(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO's reference log-probs are written whole or not at all: a run killed mid-write must not
    leave a file the next run would trust (or refuse)."""
    import mixlab.train.finetune as ft

    real = ft.save_file

    def half(tensors: Any, path: str, **kw: Any) -> None:
        real(tensors, path, **kw)
        with open(path, "r+b") as f:
            f.truncate(16)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(ft, "save_file", half)
    cfg = _cfg(ckpt, chat_files[1], tmp_path / "run", task="dpo", steps=1, eval_every=0, export_hf=False)
    with pytest.raises(OSError, match="simulated"):
        finetune(cfg)
    assert not list(tmp_path.glob("run/*reference*"))  # (the run folder it made, left empty, is gone too)
    monkeypatch.undo()
    finetune(cfg)
    assert (tmp_path / "run" / "reference_logps.safetensors").is_file()


def test_a_fresh_dpo_run_recomputes_a_reference_file_of_other_settings(ckpt: Path, chat_files: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """A DPO run that ended before its first checkpoint leaves its reference log-probs; the same --out run
    again with other settings was refused ('remove it or use another --out') although no checkpoint
    depends on the file: a fresh run now computes its own."""
    from safetensors import safe_open

    def fingerprint() -> str | None:
        with safe_open(str(tmp_path / "run" / "reference_logps.safetensors"), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")

    kw: dict[str, Any] = dict(task="dpo", steps=1, eval_every=0, export_hf=False, ckpt_every=0)
    finetune(_cfg(ckpt, chat_files[1], tmp_path / "run", seq_len=64, **kw), stop_after=0)
    first = fingerprint()
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as a run killed before its first checkpoint leaves it
    assert finetune(_cfg(ckpt, chat_files[1], tmp_path / "run", seq_len=48, **kw)).step == 1
    assert fingerprint() not in (None, first)


def test_an_export_folder_holding_other_files_is_refused_before_training(ckpt: Path, chat_files: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    from mixlab.errors import OutputError

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"adapter: holds files mixlab did not write \(notes.txt\)"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "run", steps=1, lora_rank=2, export_hf=False))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_that_leaves_nothing_to_train_on_is_an_error(ckpt: Path, chat_files: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """A seq_len shorter than every prompt trained on nothing (loss 0.0000) without a word; a file
    whose every line was held out said only 'no training conversations'."""
    with pytest.raises(DataError, match=r"sft.jsonl: no conversation has an assistant token within its first "
                                        r"seq_len \+ 1 = 9 tokens.*--seq-len"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "a", seq_len=8))
    one = tmp_path / "one.jsonl"
    one.write_text(chat_files[0].read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"one.jsonl: all 1 example\(s\) are held out.*--valid-fraction 0"):
        finetune(_cfg(ckpt, one, tmp_path / "b"))
    # Held-out conversations with nothing to evaluate gave 'eval_loss 0.0000' (over 0 tokens).
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 80},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl: no held-out conversation has an assistant token within its "
                                        r"first seq_len \+ 1 = 65 tokens"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "c", valid_data=str(long)))
    # At the model's context (256), raising seq_len was advice the next run refused: the context is said instead
    over = tmp_path / "over.jsonl"
    over.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 300},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=r"over.jsonl: no conversation has an assistant token within its first "
                                        r"seq_len \+ 1 = 257 tokens, so there is nothing to train on; the model's "
                                        r"context is 256 positions, so seq_len \(--seq-len\) cannot be raised: "
                                        r"shorten what comes before the replies$"):
        finetune(_cfg(ckpt, over, tmp_path / "f", seq_len=256, valid_data=str(chat_files[0])))
    with pytest.raises(DataError, match=r"over.jsonl: no held-out conversation has an assistant token within its "
                                        r"first seq_len \+ 1 = 257 tokens, so the evaluation would measure nothing; "
                                        r"the model's context is 256 positions, so seq_len \(--seq-len\) cannot be "
                                        r"raised: hold out other conversations$"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "g", seq_len=256, valid_data=str(over)))
    assert not any((tmp_path / d).exists() for d in "abcfg")
    # Every reply of weight 0 (mistral-finetune's context-only message): nothing to train, not a seq_len problem.
    zero = tmp_path / "zero.jsonl"
    zero.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "content": "y", "weight": 0}]}) + "\n")
    with pytest.raises(DataError, match=r"zero.jsonl: every assistant message of the training conversations has "
                                        r"\"weight\": 0 \(context, not trained\)"):
        finetune(_cfg(ckpt, zero, tmp_path / "d", valid_data=str(chat_files[0])))
    with pytest.raises(DataError, match=r"zero.jsonl: every assistant message of the held-out conversations"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "e", valid_data=str(zero)))


def test_conversations_cut_to_seq_len_are_counted(tmp_path: Path) -> None:
    """Conversations longer than seq_len + 1 were cut without a word, even ones left with nothing to
    train on: a warning says how many, and names the first that trains nothing."""
    from mixlab.train.data import get_tokenizer
    from mixlab.train.finetune import _data

    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long_prompt = {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "y" * 80}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (short, long_reply, long_prompt, short)))
    cfg = load_finetune_config(None, model="m", data=str(data), seq_len=32, valid_fraction=0.0)
    with pytest.warns(UserWarning, match=r"chat.jsonl: 2 of 4 training conversations are longer than seq_len \+ 1 = "
                                         r"33 tokens and are cut to it; 1 of them keep no assistant token and train "
                                         r"nothing \(first: .*chat.jsonl:3\); raise --seq-len"):
        train, _ = _data(cfg, get_tokenizer("bytes"))
    assert len(train) == 4
    # seq_len at the model's context (a row reads seq_len + 1 tokens, feeds seq_len): it cannot be raised
    with pytest.warns(UserWarning, match=r"\(first: .*chat.jsonl:3\); the model's context is 32 positions, so they "
                                         r"cannot be kept whole$"):
        _data(cfg, get_tokenizer("bytes"), context=32)
    with pytest.warns(UserWarning, match=r"; raise --seq-len to keep them whole$"):  # below it: it can
        _data(cfg, get_tokenizer("bytes"), context=33)


def test_a_held_out_file_that_is_the_training_file_is_warned_about(tmp_path: Path) -> None:
    """--valid-data naming the --data file (by another path too) evaluated the training loss as if held
    out, without a word."""
    from mixlab.train.data import get_tokenizer
    from mixlab.train.finetune import _data

    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(short) + "\n")
    (tmp_path / "sub").mkdir()
    cfg = load_finetune_config(None, model="m", data=str(data), valid_data=str(tmp_path / "sub" / ".." / "chat.jsonl"))
    with pytest.warns(UserWarning, match=r"chat.jsonl: the held-out file is the training file"):
        _data(cfg, get_tokenizer("bytes"))
    other = tmp_path / "valid.jsonl"
    other.write_text(json.dumps(short) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, valid = _data(load_finetune_config(None, model="m", data=str(data), valid_data=str(other)),
                             get_tokenizer("bytes"))
    assert len(train) == len(valid) == 1


def test_pairs_cut_to_seq_len_are_counted(tmp_path: Path) -> None:
    """DPO pairs longer than seq_len + 1 were cut without a word (57% of chat/dpo.jsonl at the default
    seq_len 512 with the bytes tokenizer), as SFT's conversations were: a warning says how many, and
    how many replies lose their end."""
    from mixlab.train.data import get_tokenizer
    from mixlab.train.finetune import _data

    short = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    rows = [short, {**short, "prompt": "x" * 40}, {**short, "rejected": "y" * 40}, short]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_finetune_config(None, task="dpo", model="m", data=str(data), seq_len=32, valid_fraction=0.0)
    with pytest.warns(UserWarning, match=r"pairs.jsonl: 2 of 4 training pairs are longer than seq_len \+ 1 = 33 tokens "
                                         r"and are cut to it \(the prompt's start goes first; 1 of their replies lose "
                                         r"their end, </s> included\); raise --seq-len to keep them whole$"):
        train, _ = _data(cfg, get_tokenizer("bytes"))
    assert len(train) == 4
    with pytest.warns(UserWarning, match=r"</s> included\); the model's context is 32 positions, so they cannot be "
                                         r"kept whole$"):
        _data(cfg, get_tokenizer("bytes"), context=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _data(dataclasses.replace(cfg, seq_len=64), get_tokenizer("bytes"))


def test_pairs_whose_replies_are_the_same_are_counted(tmp_path: Path) -> None:
    """A pair whose 'chosen' and 'rejected' are one text (a tie, as some of UltraFeedback's binarised rows)
    has no gradient and trained without a word; a file of nothing else trained nothing. Counted, naming
    the first; refused when every training pair is one."""
    from mixlab.train.data import get_tokenizer
    from mixlab.train.finetune import _data

    pair, tie = {"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hey", "chosen": "c", "rejected": "c"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (pair, tie, pair, tie, tie)))
    cfg = load_finetune_config(None, task="dpo", model="m", data=str(data), seq_len=32, valid_fraction=0.0)
    with pytest.warns(UserWarning, match=r"pairs.jsonl: 3 of 5 training pairs have the same 'chosen' and 'rejected' "
                                         r"reply \(first: .*pairs.jsonl:2\): no preference and no gradient, they only "
                                         r"dilute the batch's mean; drop them$"):
        train, _ = _data(cfg, get_tokenizer("bytes"))
    assert len(train) == 5
    data.write_text(json.dumps(tie) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: every training pair's 'chosen' and 'rejected' are the same "
                                        r"reply, so there is no preference to learn$"):
        _data(cfg, get_tokenizer("bytes"))


def test_a_yaml_config_file_says_which_formats_are_read(tmp_path: Path) -> None:
    """TRL's scripts take `--config sft.yaml`; mixlab read a .yaml file as JSON and said only 'not valid
    JSON (Expecting value: ...)', as if the file were broken."""
    f = tmp_path / "sft.yaml"
    f.write_text("learning_rate: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"sft.yaml: not valid JSON \(.*\); a fine-tuning config file is TOML "
                                          r"\(named .toml\) or JSON, not YAML or another format$"):
        load_finetune_config(f)
    g = tmp_path / "sft.json"  # a .json file's message stays as it was
    g.write_text("{")
    with pytest.raises(ConfigError, match=r"sft.json: not valid JSON \(.*\)$"):
        load_finetune_config(g)


def test_trl_setting_names_are_translated(tmp_path: Path) -> None:
    """A config file in TRL's / PEFT's names was told 'unknown fine-tuning setting(s): learning_rate,
    max_length, per_device_train_batch_size' with no hint (difflib finds nothing close); each now names
    mixlab's setting."""
    from mixlab.config import ConfigError

    f = tmp_path / "trl.toml"
    f.write_text("learning_rate = 2e-5\nmax_length = 1024\nper_device_train_batch_size = 4\nlora_alpha = 8\n")
    with pytest.raises(ConfigError, match=r"trl.toml: unknown fine-tuning setting\(s\): learning_rate \(mixlab's name: "
                                          r"'lr'\), max_length \(mixlab's name: 'seq_len'\), "
                                          r"per_device_train_batch_size \(mixlab's name: 'batch_size'\); known: "):
        load_finetune_config(f, model="m", data="d.jsonl")
    f.write_text("gradient_checkpointing = true\n")  # TRL's default, mixlab's --activation-checkpointing
    with pytest.raises(ConfigError, match=r"gradient_checkpointing \(mixlab's name: 'activation_checkpointing'\)"):
        load_finetune_config(f, model="m", data="d.jsonl")


@pytest.mark.parametrize(("kw", "match"), [
    ({"aux_loss_coef": float("nan")}, "'aux_loss_coef' must be a finite number >= 0"),  # trained to NaN weights
    ({"max_examples": -3}, "'max_examples' must be an integer in"),  # silently dropped the last 3 lines
    ({"lora_rank": 2, "lora_alpha": float("nan")}, "LoRA alpha must be a finite number > 0"),
    ({"lora_rank": 2, "lora_alpha": -1.0}, "LoRA alpha must be a finite number > 0"),
    # named the field alone ('LoRA alpha must be ...'), not the setting (its flag or file: test_cli_run.py)
    ({"lora_rank": 2, "lora_alpha": 0}, r"^fine-tuning setting 'lora_alpha': LoRA alpha must be"),
    ({"lora_rank": 2, "lora_dropout": 1.0}, r"^fine-tuning setting 'lora_dropout': LoRA dropout"),
    # dropout acts on attention adapters only: with experts / router alone it was accepted and did nothing
    ({"lora_rank": 2, "lora_dropout": 0.05, "lora_targets": "experts,router"},
     r"^fine-tuning setting 'lora_dropout': LoRA dropout 0.05 applies to the attention adapters "
     r"only .*, and attention is not one of the targets \(experts, router\); leave out the dropout or add attention"),
    ({"lora_rank": 2, "lora_targets": "mlp"}, r"^fine-tuning setting 'lora_targets': LoRA targets"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "'label_smoothing' applies to the sigmoid loss only"),  # was ignored
    # without lora_rank the run was full fine-tuning, the LoRA settings ignored without a word
    ({"lora_alpha": 32.0}, "^fine-tuning setting 'lora_alpha' applies to LoRA, but lora_rank is 0 \\(full "),
    ({"lora_targets": "attention"}, "^fine-tuning setting 'lora_targets' applies to LoRA, but lora_rank is 0"),
    ({"lora_rank": 2, "lora_targets": "attention,router", "freeze_router": True},  # trained the router's adapter
     "'freeze_router' keeps the router fixed, but 'router' is one of the LoRA targets"),
    ({"beta": float("nan")}, "'beta' must be a finite number > 0, got nan"),  # trained to NaN weights
    ({"beta": float("inf")}, "'beta' must be a finite number > 0, got inf"),
    ({"beta": 0.0}, "'beta' must be a finite number > 0, got 0.0"),
    ({"beta": "0.1"}, "'beta' must be a finite number > 0, got '0.1'"),  # a TOML string: TypeError in '<='
    ({"label_smoothing": "0.1"}, "'label_smoothing' must be a finite number >= 0, got '0.1'"),
    ({"valid_fraction": "0.1"}, "'valid_fraction' must be a finite number >= 0, got '0.1'"),
])
def test_bad_fine_tuning_numbers_are_refused(kw: dict, match: str) -> None:
    from mixlab.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_finetune_config(None, model="m", data="d.jsonl", **kw)


def test_help_says_what_a_batch_holds(capsys: pytest.CaptureFixture[str]) -> None:
    """`sft --help` and `dpo --help` said train's 'rows per micro-batch over all processes; DPO: pairs':
    a TRL user reads sft's rows as conversations. The batch is the global one under torchrun."""
    from mixlab.cli import main

    helps = []
    for task in ("sft", "dpo"):
        with pytest.raises(SystemExit):
            main([task, "--help"])
        helps.append(" ".join(capsys.readouterr().out.split()))
    assert ("packed rows per micro-batch, each holding as many whole conversations as fit (under torchrun: over all "
            "processes) (default 8)") in helps[0]
    assert "preference pairs per micro-batch (under torchrun: over all processes) (default 8)" in helps[1]
    for h in helps:  # --keep 0 kept every checkpoint, where a user saving disk read "keep none"
        assert "newest checkpoints kept; 0: all (default 2)" in h
    for h in helps:  # "the defaults shown": these two were not (a run without --out went to runs/finetune)
        assert "run folder (checkpoints, metrics.jsonl, hf/, adapter/) (default runs/finetune)" in h
        assert "how the frozen base is held (int8, int4: QLoRA-style) (default float32)" in h


@pytest.mark.parametrize(("flags", "match"), [
    (["--lora-rank", "2", "--lora-alpha", "-1"],
     "fine-tuning setting 'lora_alpha' (--lora-alpha): LoRA alpha must be a finite number > 0, got -1.0"),
    (["--beta", "-1"], "fine-tuning setting 'beta' (--beta) must be a finite number > 0, got -1.0"),
])
def test_a_negative_alpha_or_beta_is_refused_as_zero_is(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], flags: list[str],
                                                        match: str) -> None:
    """`--lora-alpha -1` said 'expected a number >= 0' and `--beta -1` 'must be a finite number >= 0'; the 0
    they offered was then refused ('> 0'). Negative values now get the one refusal 0 gets."""
    from mixlab.cli import main

    code = main(["dpo", "--model", str(ckpt), "--data", str(chat_files[1]), "--out", str(tmp_path / "x"),
                 "--seq-len", "64", *flags])
    assert code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_lora_rank_below_1_is_refused_saying_what_is_expected(capsys: pytest.CaptureFixture[str],
                                                                value: str) -> None:
    """--lora-rank 0 ran full fine-tuning instead, then was refused; -2 was refused as "expected an integer
    in [0, ...]", which then refused the 0 it offered. Both: a positive integer, or no flag."""
    from mixlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sft", "--model", "m", "--data", "d.jsonl", "--lora-rank", value])
    assert e.value.code == 2
    assert (f"argument --lora-rank: expected a positive integer (leave out --lora-rank for full fine-tuning), "
            f"got {value}") in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "match"), [
    (["--merge"], "--merge merges LoRA adapters: it needs lora_rank"),  # was ignored
])
def test_lora_flags_that_would_be_ignored_are_errors(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], flags: list[str],
                                                     match: str) -> None:
    from mixlab.cli import main

    assert main(["sft", "--model", str(ckpt), "--data", str(chat_files[0]), "--out", str(tmp_path / "x"),
                 "--steps", "1", "--seq-len", "64", *flags]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_config_files_lora_rank_writes_the_adapter_and_merge_adds_hf(ckpt: Path, chat_files: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """`lora_rank` in the config file, not the flag: --merge was refused ("needs --lora-rank R") and, without it,
    hf/ was written anyway (the flag alone decided); now the file's rank counts as the flag's."""
    from mixlab.cli import main

    conf = tmp_path / "lora.toml"
    conf.write_text("lora_rank = 2\nsteps = 1\nseq_len = 64\nbatch_size = 2\nthreads = 1\n")
    for name, flags in (("plain", []), ("merged", ["--merge"])):
        assert main(["sft", str(conf), "--model", str(ckpt), "--data", str(chat_files[0]), "--out",
                     str(tmp_path / name), "--quiet", *flags]) == 0
        assert (tmp_path / name / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / name / "hf").exists() == bool(flags), name
    conf.write_text("lora_rank = 2\nsteps = 1\nseq_len = 64\nbatch_size = 2\nthreads = 1\nexport_hf = true\n")
    assert main(["sft", str(conf), "--model", str(ckpt), "--data", str(chat_files[0]), "--out",
                 str(tmp_path / "file-merged"), "--quiet"]) == 0
    assert (tmp_path / "file-merged" / "hf" / "config.json").is_file()  # the file's own export_hf is kept


def test_export_hf_defaults_alike_in_python_and_on_the_command_line(ckpt: Path, chat_files: tuple[Path, Path],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """export_hf's default lived in two places: FinetuneConfig's True (a LoRA run in Python wrote a merged
    hf/ the command did not) and `mixlab sft`'s, which read its config file a second time to learn whether
    the file set it. It is one None: hf/ for full fine-tuning, none for a LoRA run unless export_hf is
    true (the merged model, as --merge)."""
    from mixlab.cli import main
    from mixlab.config import ConfigError
    from mixlab.train import settings

    reads: list[object] = []
    read = settings.read_settings
    monkeypatch.setattr(settings, "read_settings", lambda *a, **kw: (reads.append(a[1]), read(*a, **kw))[1])
    for name, lora, export in (("full", 0, None), ("full-not", 0, False), ("lora", 2, None), ("lora-hf", 2, True)):
        want = export if export is not None else not lora
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "api" / name, steps=1, eval_every=0, lora_rank=lora,
                      export_hf=export))
        conf = tmp_path / f"{name}.toml"
        conf.write_text("steps = 1\nseq_len = 64\nbatch_size = 2\nthreads = 1\neval_every = 0\n"
                        + (f"lora_rank = {lora}\n" if lora else "")
                        + (f"export_hf = {str(export).lower()}\n" if export is not None else ""))
        reads.clear()
        assert main(["sft", str(conf), "--model", str(ckpt), "--data", str(chat_files[0]), "--out",
                     str(tmp_path / "cli" / name), "--quiet"]) == 0
        assert reads == [str(conf)], reads  # the file read once
        for run in (tmp_path / "api" / name, tmp_path / "cli" / name):
            assert (run / "hf" / "config.json").is_file() == want, run
            assert (run / "adapter" / "adapter_config.json").is_file() == bool(lora), run
    with pytest.raises(ConfigError, match="fine-tuning setting 'export_hf' must be true or false, got 'yes'"):
        _cfg(ckpt, chat_files[0], tmp_path / "x", export_hf="yes")


def test_starting_from_a_fine_tuning_checkpoint_says_what_to_use(ckpt: Path, chat_files: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """`dpo --model RUN` of a LoRA SFT run without --merge (no hf/) fell through to its checkpoint and
    said only "state.json: no usable model_config ('model_config')"."""
    from mixlab.checkpoint import CheckpointError
    from mixlab.train import checkpoints

    finetune(_cfg(ckpt, chat_files[0], tmp_path / "lora", steps=1, lora_rank=2, export_hf=False, eval_every=0))
    with pytest.raises(CheckpointError, match=r"step_00000001: a fine-tuning checkpoint .* hf/ export .*--merge"):
        finetune(_cfg(tmp_path / "lora", chat_files[1], tmp_path / "dpo", task="dpo", steps=1))
    with pytest.raises(CheckpointError, match="a fine-tuning checkpoint"):
        checkpoints.init_config(tmp_path / "lora" / "checkpoints" / "step_00000001")
    # Its adapter/ folder said only 'not a checkpoint folder (no config.json, ...)', and `generate --model RUN`
    # said to `mixlab convert` it, which fails as above; both now say how to get the merged model, which works:
    from mixlab.config import ConfigError, ModelConfig

    # and `generate --model RUN/adapter` did not say that generate takes it as --adapter over its base
    adapter = tmp_path / "lora" / "adapter"
    use = (rf"generate, chat, serve and eval take {re.escape(str(adapter))} as --adapter over --model "
           rf"{re.escape(str(ckpt))} \(its base model\); ")
    with pytest.raises(ConfigError, match=rf"adapter: .* \(a LoRA adapter in PEFT's format, not a model: {use}a mixlab "
                                          r"run's merged model is its hf/ folder; .* --resume --merge\)"):
        checkpoints.init_config(adapter)
    with pytest.raises(ConfigError, match=rf"lora: .* \(a fine-tuning run folder without an hf/ export; {use}a LoRA "
                                          r"run writes hf/ with --merge; .* --resume --merge\)"):
        ModelConfig.from_dir(tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match=r"take .*adapter as --adapter over --model BASE \(its base model\)"):
        ModelConfig.from_dir(adapter)
    with pytest.raises(ConfigError, match=r"lora: .* \(a fine-tuning run folder without an hf/ export; .* --resume "
                                          r"--merge\)"):
        ModelConfig.from_dir(tmp_path / "lora")
    finetune(_cfg(ckpt, chat_files[0], tmp_path / "lora", steps=1, lora_rank=2, eval_every=0, export_hf=True),
             resume=True)  # --resume --merge
    assert checkpoints.init_config(tmp_path / "lora") == ModelConfig.from_dir(ckpt)


def test_a_pretraining_run_stopped_before_its_export_brings_its_tokenizer(chat_files: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """`sft --model RUN` of a `mixlab train` run stopped before its hf/ export starts from its newest
    checkpoint, whose tokenizer (bytes here) was looked for only in RUN/hf/mixlab_data.json: Mixtral's
    was taken instead ('the tokenizer's vocabulary (32000) is larger than the model's (259)', or the
    wrong tokens for a model of 32,000 or more). The checkpoint's state.json names it."""
    from mixlab.corpus import read_documents
    from mixlab.train.data import prepare
    from mixlab.train.loop import load_train_config, train

    (tmp_path / "src" / "prose").mkdir(parents=True)
    (tmp_path / "src" / "prose" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"The {i}th cat sat on the mat. " * 4}) + "\n" for i in range(20)))
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    train(load_train_config(None, data=str(tmp_path / "ds"), out=str(tmp_path / "pre"), model="tiny-moe",
                            model_overrides={k: getattr(CFG, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                                          "head_dim", "ffn_dim")},
                            seq_len=32, batch_size=2, steps=1, progress=False, export_hf=False, threads=1))
    assert not (tmp_path / "pre" / "hf").exists()
    res = finetune(_cfg(tmp_path / "pre", chat_files[0], tmp_path / "sft", steps=1, eval_every=0))
    assert res.step == 1
    assert json.loads((tmp_path / "sft" / "hf" / "mixlab_data.json").read_text())["tokenizer"]["type"] == "bytes"


def test_a_resume_naming_the_same_files_otherwise_continues(ckpt: Path, chat_files: tuple[Path, Path],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model base` then `--resume` from another directory, or with `./base` or an absolute path, was
    refused: "saved with different fine-tuning settings (model: checkpoint 'base' vs now '/x/base')". The
    checkpoint now keeps where each path pointed; another file is still refused."""
    import shutil

    from mixlab.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt, "base")
    shutil.copy(chat_files[0], "chat.jsonl")
    kw: dict[str, Any] = dict(steps=2, ckpt_every=1, eval_every=0)
    finetune(_cfg(Path("base"), Path("chat.jsonl"), Path("runs/a"), **kw), stop_after=1)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    res = finetune(_cfg(Path("../base"), tmp_path / "chat.jsonl", Path("../runs/a"), **kw), resume=True)
    assert res.step == 2
    finetune(_cfg(Path("../base"), Path("../chat.jsonl"), Path("../runs/b"), **kw), stop_after=1)
    shutil.copytree(tmp_path / "base", tmp_path / "other")  # the same weights in another folder: another setting
    with pytest.raises(CheckpointError, match=r"saved with different fine-tuning settings \(model: checkpoint "
                                              r"'../base' vs now '../other'\)"):
        finetune(_cfg(Path("../other"), Path("../chat.jsonl"), Path("../runs/b"), **kw), resume=True)


def test_resume_with_changed_data_is_refused(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path) -> None:
    """An SFT run resumed after its data file was edited continued silently from a loader position
    into other conversations (pretraining fingerprints its dataset; fine-tuning now does too)."""
    from mixlab.checkpoint import CheckpointError

    data = tmp_path / "sft.jsonl"
    data.write_text(chat_files[0].read_text())
    finetune(_cfg(ckpt, data, tmp_path / "run", eval_every=0), stop_after=2)
    data.write_text(data.read_text().replace("plus 3 is 6", "plus 3 is 7"))
    with pytest.raises(CheckpointError, match=r"step_00000002: saved for different data \(.*sft.jsonl"):
        finetune(_cfg(ckpt, data, tmp_path / "run", eval_every=0), resume=True)
    data.write_text(chat_files[0].read_text())
    assert finetune(_cfg(ckpt, data, tmp_path / "run", eval_every=0), resume=True).step == 4


def test_a_dpo_resume_with_other_settings_or_data_names_them(ckpt: Path, chat_files: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """A DPO resume with another seq_len, or after its data was edited, blamed the reference file ('reference
    log-probs for other data or settings; remove it or use another --out'), and removing it only gave
    'missing': the checkpoint's checks, which name the setting or the data, now come first."""
    from mixlab.checkpoint import CheckpointError

    data = tmp_path / "dpo.jsonl"
    data.write_text(chat_files[1].read_text())
    kw: dict[str, Any] = dict(task="dpo", eval_every=0)
    finetune(_cfg(ckpt, data, tmp_path / "run", **kw), stop_after=1)
    with pytest.raises(CheckpointError, match=r"step_00000001: saved with different fine-tuning settings \(seq_len: "
                                              r"checkpoint 64 vs now 48\)"):
        finetune(_cfg(ckpt, data, tmp_path / "run", seq_len=48, **kw), resume=True)
    data.write_text(data.read_text().replace("Say the number 3.", "Say the number 33."))
    with pytest.raises(CheckpointError, match=r"step_00000001: saved for different data"):
        finetune(_cfg(ckpt, data, tmp_path / "run", **kw), resume=True)
    # Other held-out pairs (--valid-data) pass the checkpoint's checks: the reference file names them
    # (it said 'remove it', and then only 'missing').
    data.write_text(chat_files[1].read_text())
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(data.read_text().splitlines(keepends=True)[:2]))
    finetune(_cfg(ckpt, data, tmp_path / "run2", valid_data=str(valid), **kw), stop_after=1)
    valid.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(CheckpointError, match=r"reference_logps.safetensors: reference log-probs for other held-out "
                                              r"pairs \(.*valid.jsonl changed since the run started\); resume with "
                                              "the original ones"):
        finetune(_cfg(ckpt, data, tmp_path / "run2", valid_data=str(valid), **kw), resume=True)


def test_a_dpo_resume_of_a_run_with_per_token_mean_references_says_so(ckpt: Path, chat_files: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """A --length-normalize run started before its log-probs became sums (a026960) stored per-token
    means; its resume blamed the held-out pairs ('reference log-probs for other held-out pairs (... changed
    since the run started)'), which had not changed. It now says what differs and what to do."""
    from safetensors.torch import load_file, save_file

    from mixlab.checkpoint import CheckpointError

    kw: dict[str, Any] = dict(task="dpo", eval_every=0, length_normalize=True)
    finetune(_cfg(ckpt, chat_files[1], tmp_path / "run", **kw), stop_after=1)
    rf = tmp_path / "run" / "reference_logps.safetensors"
    pairs = dpo.read_pairs(chat_files[1], TOK)
    train, valid = sft.split_holdout(pairs, 0.2, 0)
    old = dpo.reference_fingerprint(train + valid, {"model": str(ckpt.resolve()), "seq_len": 64, "mean": True,
                                                    "dtype": "float32"})
    save_file(load_file(str(rf)), str(rf), metadata={"fingerprint": old})  # as the old code wrote it
    with pytest.raises(CheckpointError, match=r"reference_logps.safetensors: holds per-token means of the reference "
                                              r"log-probs, as --length-normalize stored them before .* finish this "
                                              r"run with the mixlab version that started it, or start it again"):
        finetune(_cfg(ckpt, chat_files[1], tmp_path / "run", **kw), resume=True)


def test_a_damaged_mixlab_data_json_names_the_file(ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path) -> None:
    """A mixlab_data.json without 'tokenizer' ended in a KeyError traceback (bad JSON: a message
    without the file)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    for text in ("{}", "{bad", "[1]"):
        (model / "mixlab_data.json").write_text(text)
        with pytest.raises(DataError, match=r"model/mixlab_data.json: no readable 'tokenizer' entry.*--tokenizer"):
            finetune(_cfg(model, chat_files[0], tmp_path / "run", steps=1))
    assert finetune(_cfg(model, chat_files[0], tmp_path / "run", steps=1, tokenizer="bytes", eval_every=0)).step == 1


def test_a_tokenizer_other_than_the_checkpoint_s_is_refused(ckpt: Path, chat_files: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """`--tokenizer bytes` on a model that names Mixtral's tokenizer (its vocabulary is larger, so the size
    check passed) fine-tuned it on ids that mean other text to it, without a word; the checkpoint's own
    tokenizer, or one of the same vocabulary, is taken as before."""
    import shutil

    from mixlab.config import ConfigError

    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    (model / "mixlab_data.json").write_text(json.dumps({"tokenizer": {"type": "file", "name": "mixtral"}}))
    with pytest.raises(ConfigError, match=rf"^fine-tuning setting 'tokenizer': bytes is not the tokenizer {model} "
                                          r"names \(mixtral\): their vocabularies differ; leave it out to use the "
                                          r"checkpoint's$"):
        finetune(_cfg(model, chat_files[0], tmp_path / "a", steps=1, tokenizer="bytes"))
    assert not (tmp_path / "a").exists()
    assert finetune(_cfg(ckpt, chat_files[0], tmp_path / "b", steps=1, tokenizer="bytes", eval_every=0)).step == 1


def test_eval_line_prints_counts_as_integers() -> None:
    """The progress line read 'eval_loss 3.0280, eval_tokens 21202.0000'."""
    from mixlab.train.finetune import eval_line

    assert eval_line({"step": 3, "eval_loss": 3.02801, "eval_tokens": 21202}) == "eval_loss 3.0280, eval_tokens 21,202"


def test_a_lora_run_without_transformers_says_why_its_adapter_was_not_exported(
        ckpt: Path, chat_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A core install (no transformers): PEFT's layout cannot be known, so the merged weights are
    written; the reason names the package, and a warning says so (the run ended silently with
    'No module named transformers' in adapter_not_exported.txt)."""
    for name in ("transformers", "transformers.models.mixtral"):  # (the second: earlier tests imported it)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.warns(UserWarning, match=r"not exported in PEFT's format \(PEFT's adapter layout follows the installed "
                                         r"transformers' Mixtral, and transformers is not installed \(pip install"):
        finetune(_cfg(ckpt, chat_files[0], tmp_path / "a", steps=1, lora_rank=2, export_hf=False, eval_every=0))
    assert (tmp_path / "a" / "hf" / "config.json").is_file() and not (tmp_path / "a" / "adapter").exists()
    assert "transformers is not installed" in (tmp_path / "a" / "adapter_not_exported.txt").read_text()


def test_tokens_per_s_is_the_interval_since_the_last_logged_record(ckpt: Path, chat_files: tuple[Path, Path],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As train's (test_train.py): a logged record's tokens_per_s was its step's alone. A clock where step k
    takes k seconds, with 100 s of something else (an evaluation) between steps, which does not count."""
    import mixlab.train.finetune as ft

    step_clock(monkeypatch, ft)
    res = finetune(_cfg(ckpt, chat_files[0], tmp_path, task="sft", steps=4, log_every=2, eval_every=0))
    toks = [r["tokens"] for r in res.history]
    assert [r["tokens_per_s"] for r in res.history] == pytest.approx(
        [toks[0] / 1, (toks[0] + toks[1]) / 3, toks[2] / 3, (toks[2] + toks[3]) / 7])
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert [r["tokens_per_s"] for r in logged] == pytest.approx([(toks[0] + toks[1]) / 3, (toks[2] + toks[3]) / 7])


def test_an_adapter_trained_over_an_int4_base_is_served_over_the_same_weights(tmp_path: Path) -> None:
    """LoRA over an int4 base, exported, then served as `mixlab serve --quant int4 --lora-modules` does
    (`prepare_for_inference(quant="int4")` + `Engine(adapters=)`): each request gets the training model
    (its held int4 weights plus the adapter) with what serving alone quantises, the output head,
    dequantised; exact activations (int4_activations="float32")."""
    from mixlab.config import get_preset
    from mixlab.engine import Engine, SamplingParams
    from mixlab.model.inference import prepare_for_inference
    from mixlab.ops.quant import dequantize_int4

    cfg = get_preset("tiny-moe").replace(vocab_size=128, max_seq_len=128)
    base = Transformer(cfg).eval()
    base.init_weights(std=0.5, seed=0)
    trained = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8, base_dtype="int4"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft(trained, tmp_path / "a", expert_layout="fused")
    want = merge(trained)  # float32: the held int4 weights plus the adapter
    served = prepare_for_inference(copy.deepcopy(base), quant="int4", int4_activations="float32")
    with torch.no_grad():
        want.output.weight.copy_(dequantize_int4(served.output.weight, served.output.scale, torch.float32))
    greedy = dict(max_tokens=6, logprobs=0, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 2, 64, 7], [11, 3, 90, 41]]
    engine = Engine(served, max_batch=2, adapters={"a": tmp_path / "a"})
    hs = [engine.submit(p, SamplingParams(**greedy, adapter="a")) for p in prompts]
    engine.run_until_idle()
    for prompt, h in zip(prompts, hs, strict=True):
        alone = Engine(want, max_batch=1)
        r = alone.submit(prompt, SamplingParams(**greedy))
        alone.run_until_idle()
        got, ref = h.result(), r.result()
        assert [o.token_id for o in got] == [o.token_id for o in ref]
        torch.testing.assert_close(torch.tensor([o.logprob for o in got if o.token_id is not None]),
                                   torch.tensor([o.logprob for o in ref if o.token_id is not None]),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task, lora, base", [("sft", 4, "int4"), ("dpo", 0, "float32")])
def test_activation_checkpointing_gives_the_same_run(ckpt: Path, ckpt4: Path, chat_files: tuple[Path, Path],
                                                     tmp_path: Path, task: str, lora: int, base: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--activation-checkpointing (TRL's gradient_checkpointing) recomputes each block in backward: the
    same losses, gradient norms, evaluations and weights, and a resume may switch it on or off."""
    import mixlab.train.loop as loop

    calls: list[int] = []
    real = loop.activation_checkpoint

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(loop, "activation_checkpoint", counted)
    kw: dict[str, Any] = dict(task=task, lora_rank=lora, export_peft=False, export_hf=False,
                              **({"lora_base_dtype": base} if lora else {}))
    model = ckpt4 if base == "int4" else ckpt
    data = chat_files[0] if task == "sft" else chat_files[1]
    plain = finetune(_cfg(model, data, tmp_path / "a", **kw))
    assert not calls
    ac = finetune(_cfg(model, data, tmp_path / "b", activation_checkpointing=True, **kw), stop_after=2)
    assert calls  # the blocks ran through the checkpoint
    ac2 = finetune(_cfg(model, data, tmp_path / "b", **kw), resume=True)  # switched off on resume
    for k in ("loss", "grad_norm"):
        assert [r[k] for r in plain.history] == [r[k] for r in ac.history + ac2.history], k
    assert plain.evals == ac.evals + ac2.evals
    for (n, p), (_, q) in zip(plain.model.named_parameters(), ac2.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("base_dtype, tied", [("int4", False), ("int8", True), ("float32", False)])
def test_a_lora_model_is_loaded_a_block_at_a_time(tmp_path: Path, base_dtype: str, tied: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_with_lora` gives `apply_lora(load_init(...))`'s model (weights, held base, initial factors)
    without loading the whole checkpoint first (`load_init`, the float32 model: 187 GB for Mixtral)."""
    from mixlab.train.finetune import load_with_lora

    cfg = dataclasses.replace(CFG4, tie_embeddings=tied)
    save_model(_model(cfg=cfg), tmp_path / "hf")
    lc = LoraConfig(rank=4, targets=ALL, base_dtype=base_dtype, seed=7)
    want = apply_lora(checkpoints.load_init(tmp_path / "hf", cfg), lc)
    monkeypatch.setattr(checkpoints, "load_init", lambda *a, **k: pytest.fail("the whole model was loaded"))
    got = load_with_lora(tmp_path / "hf", cfg, lc)
    w, g = want.state_dict(), got.state_dict()
    assert w.keys() == g.keys()
    for k in w:
        assert w[k].dtype == g[k].dtype and torch.equal(w[k], g[k]), k
    assert [n for n, p in got.named_parameters() if p.requires_grad] == \
        [n for n, p in want.named_parameters() if p.requires_grad]
    assert (got.output.weight is got.tok_embeddings.weight) == tied
    x = torch.randint(0, 259, (2, 12))
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)


def test_a_lora_model_is_loaded_a_block_at_a_time_from_a_training_run(tmp_path: Path) -> None:
    """`sft --model RUN --lora-rank R` of a `mixlab train` run (its newest checkpoint's safetensors,
    not a transformers folder): `load_with_lora` reads it a block at a time, the same model as
    `apply_lora(load_init(...))`."""
    from mixlab.corpus import read_documents
    from mixlab.train.data import prepare
    from mixlab.train.finetune import load_with_lora
    from mixlab.train.loop import load_train_config, train

    (tmp_path / "src" / "prose").mkdir(parents=True)
    (tmp_path / "src" / "prose" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"The {i}th cat sat on the mat. " * 4}) + "\n" for i in range(20)))
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    train(load_train_config(None, data=str(tmp_path / "ds"), out=str(tmp_path / "pre"), model="tiny-moe",
                            model_overrides={"dim": 64, "ffn_dim": 64}, seq_len=32, batch_size=2, steps=1,
                            progress=False, export_hf=False, threads=1))
    mc = checkpoints.init_config(tmp_path / "pre")
    lc = LoraConfig(rank=4, targets=ALL, base_dtype="int4")
    want = apply_lora(checkpoints.load_init(tmp_path / "pre", mc), lc).state_dict()
    got = load_with_lora(tmp_path / "pre", mc, lc).state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
