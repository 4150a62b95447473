"""`mixlab serve --lora-modules NAME=DIR ...` (vLLM's): each adapter is a model of the API, listed by
/v1/models with its folder and parent, and a request naming it gets what the model with that adapter
merged gives (the `openai` client against `mixlab.generate` on the merged model)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from mixlab import generate  # noqa: E402
from mixlab.checkpoint import merge_adapter  # noqa: E402
from mixlab.engine import Engine  # noqa: E402
from mixlab.serve import ServerThread, create_app  # noqa: E402
from mixlab.train.lora import LoraConfig, apply_lora, save_peft  # noqa: E402
from test_serve import NAME, _browser, _config, _continuation, _page, _serve_cli  # noqa: E402

ckpt, model_tok = test_serve.ckpt, test_serve.model_tok  # test_serve's tiny Mixtral and its tokenizer

ADAPTERS = ("ad1", "ad2")


@pytest.fixture(scope="module")
def adapters(model_tok: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters of mixlab's own LoRA over the served model, random non-zero B."""
    model, _ = model_tok
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        m = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, alpha=8, targets=("attention", "experts", "router")))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_peft(m, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def merged(model_tok: tuple[Any, Any], adapters: dict[str, Path]) -> dict[str, Any]:
    model, _ = model_tok
    return {NAME: model, **{n: merge_adapter(copy.deepcopy(model), p) for n, p in adapters.items()}}


@pytest.fixture(scope="module")
def url(model_tok: tuple[Any, Any], adapters: dict[str, Path]) -> Iterator[str]:
    model, tok = model_tok
    cfg = _config(model, adapters={n: str(p) for n, p in adapters.items()}, model_root="/models/tiny")
    with Engine(model, tok, max_batch=8, adapters=adapters) as engine, ServerThread(create_app(engine, tok, cfg)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_each_adapter_with_its_folder_and_parent(url: str, adapters: dict[str, Path]) -> None:
    data = httpx.get(url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [NAME, *ADAPTERS]
    assert data[0]["root"] == "/models/tiny" and data[0]["parent"] is None
    for m in data[1:]:
        assert m["root"] == str(adapters[m["id"]]) and m["parent"] == NAME and m["object"] == "model"
        assert m["owned_by"] == "mixlab" and m["created"] == data[0]["created"]
    assert httpx.get(url + "/v1/models/ad2").json() == data[2]
    r = httpx.get(url + "/v1/models/ad3")
    assert r.status_code == 404 and "'tiny', 'ad1', 'ad2'" in r.json()["error"]["message"]


def test_chat_and_completions_under_each_adapter_equal_its_merged_model(client: Any, model_tok: tuple[Any, Any],
                                                                       merged: dict[str, Any]) -> None:
    _, tok = model_tok
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = tok.encode_chat(messages)
    prompt = "The quick brown fox"
    pids = tok.encode(prompt)
    texts = {}
    for name in (NAME, *ADAPTERS):
        want = generate(merged[name], [ids], max_new_tokens=12, temperature=0.0)[0]
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        assert chat.model == name and chat.choices[0].message.content == tok.decode(want)
        want = generate(merged[name], [pids], max_new_tokens=12, temperature=0.0)[0]
        kw = dict(model=name, prompt=prompt, max_tokens=12, temperature=0)
        done = client.completions.create(**kw)
        streamed = list(client.completions.create(**kw, stream=True))
        assert done.model == name and all(c.model == name for c in streamed)
        assert done.choices[0].text == "".join(c.choices[0].text for c in streamed) == _continuation(tok, pids, want)
        texts[name] = done.choices[0].text
    assert len(set(texts.values())) == 3  # each adapter changed the output


def test_responses_and_tokenize_take_an_adapters_name(url: str, client: Any, model_tok: tuple[Any, Any],
                                                      merged: dict[str, Any]) -> None:
    _, tok = model_tok
    r = client.responses.create(model="ad1", input="Hi", max_output_tokens=8, temperature=0)
    want = generate(merged["ad1"], [tok.encode_chat([{"role": "user", "content": "Hi"}])], max_new_tokens=8,
                    temperature=0.0)[0]
    assert r.model == "ad1" and r.output_text == tok.decode(want)
    t = httpx.post(url + "/tokenize", json={"model": "ad2", "prompt": "Hello"}).json()
    assert t["tokens"] == tok.encode("Hello")


def test_an_unknown_model_is_the_404_naming_what_is_served(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="the model 'ad3' does not exist; this server serves 'tiny', "
                                                   "'ad1', 'ad2'"):
        client.chat.completions.create(model="ad3", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_serve_lora_modules_flag(ckpt: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a1, a2 = (str(adapters[n]) for n in ADAPTERS)
    spec = json.dumps({"name": "j", "path": a2})
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--lora-modules", f"x={a1}", spec)
    assert code == 0 and srv.cfg.adapters == {"x": a1, "j": a2} and set(srv.engine.runner.adapters) == {"x", "j"}
    # the startup line says where the adapters' updates run: inside the native step wherever it runs
    # (it said "PyTorch's kernels" after the native step had taken them), else the PyTorch pass
    from mixlab.model.native import NativeDecoder
    from mixlab.ops import native

    fast = native.load() is not None and native.fast(torch.float32)
    assert "LoRA adapters x, j (the API's model names): " in err
    assert ("their updates run inside the native step" in err) == fast and ("PyTorch" in err) == (not fast), err
    srv.engine.shutdown()
    with monkeypatch.context() as m:  # a table the native step cannot hold: the PyTorch pass, said so
        m.setattr(NativeDecoder, "lora_table", lambda self, factors: None)
        code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--lora-modules", f"x={a1}")
        assert code == 0 and "LoRA adapters x (the API's model names): their requests' steps run PyTorch" in err
        srv.engine.shutdown()
    bad = tmp_path / "bad"  # an adapter folder whose config is not JSON: a bad file (exit 1, as --adapter's)
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{nope")
    for items, message, want in [
        (["nothing"], "argument --lora-modules: 'nothing': expected NAME=DIR", 2),
        (["=" + a1], "expected NAME=DIR", 2),
        (['{"name": "j"}'], "expected a JSON object with a non-empty \"name\" and \"path\"", 2),
        ([f"m={tmp_path / 'missing'}"], f"--lora-modules m={tmp_path / 'missing'}: {tmp_path / 'missing'}: no such "
                                        "adapter folder", 1),
        ([f"b={bad}"], f"--lora-modules b={bad}: {bad / 'adapter_config.json'}", 1),
        ([f"{ckpt.name}={a1}"], f"'{ckpt.name}' is the served model's name", 2),
        ([f"x={a1}", f"x={a2}"], "the name 'x' is given twice", 2),
    ]:
        try:
            code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--lora-modules", *items)
        except SystemExit as e:  # argparse's own errors
            code, srv, err = e.code, None, capsys.readouterr().err
        assert code == want and srv is None and message in err, err
        assert "Traceback" not in err
    code, srv, err = _serve_cli(monkeypatch, capsys, "--model", str(ckpt), "--served-model-name", "x",
                                "--lora-modules", f"x={a1}")
    assert code == 2 and "'x' is the served model's name" in err


def test_metrics_count_each_adapters_requests(url: str, client: Any) -> None:
    from conftest import metric

    before = {n: metric(url, f'mixlab_adapter_requests_total{{adapter="{n}"}}') for n in ADAPTERS}
    client.completions.create(model="ad2", prompt="Hi", max_tokens=2, n=2)
    client.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    after = {n: metric(url, f'mixlab_adapter_requests_total{{adapter="{n}"}}') for n in ADAPTERS}
    assert after == {"ad1": before["ad1"], "ad2": before["ad2"] + 2}  # one engine request per choice
    assert metric(url, 'mixlab_adapter_running_requests{adapter="ad1"}') == 0


@pytest.mark.slow
def test_chat_page_picks_a_served_adapter(url: str, client: Any) -> None:
    """The chat page's Model setting (shown where adapters are served: the page talked to the base alone):
    a reply streamed under the adapter chosen is the API's under that adapter, greedy, not the base's; each
    reply is named by its model; the choice is kept across a reload, and one no longer served falls back to
    the base with a note."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def api(model: str, *turns: str) -> str:  # the reply to these turns (user, assistant, ..., user)
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        return client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                              temperature=0).choices[0].message.content

    state = ("return [messages.map(m => [m.content, m.model]), document.getElementById('served').value,"
             "[...document.querySelectorAll('.msg .by')].map(b => b.textContent),"
             "document.getElementById('served_note').textContent]")
    with _browser() as driver:
        _page(driver, url + "/")
        wait = WebDriverWait(driver, 60)
        served = Select(driver.find_element(By.ID, "served"))
        assert driver.find_element(By.ID, "choose_model").is_displayed()
        assert [(o.get_attribute("value"), o.text) for o in served.options] == [
            (NAME, NAME), *((n, f"{n} (LoRA adapter on {NAME})") for n in ADAPTERS)]
        assert served.first_selected_option.get_attribute("value") == NAME  # the base, until another is chosen
        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "served").send_keys("ad1")  # as a keyboard does it (Select's click: no input event)

        def ask(question: str, replies: int) -> None:
            driver.find_element(By.ID, "input").send_keys(question + "\n")
            wait.until(lambda d: d.execute_script("return !controller && messages.length === arguments[0]",
                                                  2 * replies))

        ask("Name three colours.", 1)
        first = api("ad1", "Name three colours.")
        assert first != api(NAME, "Name three colours.")
        assert driver.execute_script(state) == [[["Name three colours.", None], [first, "ad1"]], "ad1", ["ad1"], ""]
        _page(driver, url + "/")  # the choice is a setting, the model a reply's: both kept
        assert driver.execute_script(state) == [[["Name three colours.", None], [first, "ad1"]], "ad1", ["ad1"], ""]
        # the conversation switches models between turns: the next reply is the base's, to all of it
        driver.find_element(By.ID, "served").send_keys(NAME)
        ask("And two more?", 2)
        second = api(NAME, "Name three colours.", first, "And two more?")
        assert driver.execute_script(state)[0][2:] == [["And two more?", None], [second, NAME]]
        assert driver.execute_script(state)[2] == ["ad1", NAME]
        # a stored choice the server no longer serves (restarted without it): the base, and a note
        driver.execute_script("const s = JSON.parse(localStorage.getItem('mixlab.settings')); s.served = 'ad9';"
                              "localStorage.setItem('mixlab.settings', JSON.stringify(s))")
        _page(driver, url + "/")
        assert driver.execute_script(state)[1:] == [NAME, ["ad1", NAME], "(ad9 is no longer served: tiny answers)"]
        assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0"  # the other settings kept
        # ... or gone between the page's load and a send (the server's 404): the base answers, and says so
        driver.execute_script("const s = document.getElementById('served'); s.add(new Option('ad9', 'ad9'));"
                              "s.value = 'ad9'; s.dispatchEvent(new Event('change'))")
        assert driver.execute_script(state)[3] == ""
        ask("Three?", 3)
        shown = driver.execute_script(state)
        assert shown[0][5] == [api(NAME, "Name three colours.", first, "And two more?", second, "Three?"), NAME]
        assert shown[1:] == [NAME, ["ad1", NAME, NAME], "(ad9 is no longer served: tiny answers)"]
        # settings stored by the page before it had a Model setting are read, the base chosen
        driver.execute_script("const s = JSON.parse(localStorage.getItem('mixlab.settings')); delete s.served;"
                              "s.max_tokens = '7'; localStorage.setItem('mixlab.settings', JSON.stringify(s))")
        _page(driver, url + "/")
        assert driver.find_element(By.ID, "max_tokens").get_attribute("value") == "7"
        assert driver.execute_script(state)[1:] == [NAME, ["ad1", NAME, NAME], ""]
