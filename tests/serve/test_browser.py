"""The web page in a real headless Chromium (Debian's, driven by Playwright): a multi-turn chat with images added by
file picker, drop and paste, streamed answers, a stop button that frees the server's row, and answers rendered as
Markdown without ever becoming HTML."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, png_bytes, to_data_url, wait_idle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian chromium is not installed (.ci/run installs it with apt)")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# Records every text the newest answer goes through, so the test can tell streaming from one final paint.
WATCH_ANSWERS = """() => {
  window.answerTexts = [];
  const log = document.getElementById("log");
  new MutationObserver(() => {
    const answers = log.querySelectorAll(".msg.assistant");
    if (answers.length) window.answerTexts.push(answers[answers.length - 1].textContent);
  }).observe(log, {childList: true, characterData: true, subtree: true});
}"""

# Hands the page image files the way a drop or a paste does (Chromium builds both events with a DataTransfer).
GIVE_FILES = """([event, name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type: "image/png"}));
  const init = {bubbles: true, cancelable: true};
  const target = document.getElementById(event === "drop" ? "composer" : "question");
  target.dispatchEvent(event === "drop" ? new DragEvent("drop", {...init, dataTransfer: data})
                                        : new ClipboardEvent("paste", {...init, clipboardData: data}));
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(live_server.url + "/")
    page.click("summary")  # the settings
    page.fill("#api-key", API_KEY)
    yield page
    page.close()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": to_data_url(data)}}


def reference_answer(server, messages: list[dict], max_tokens: int) -> str:
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return reply.json()["choices"][0]["message"]["content"]


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)


def test_two_turns_about_an_image_with_a_second_image_on_the_second_turn(page, live_server, tmp_path):
    first, second = png_bytes(64, 64, 11), png_bytes(32, 64, 12)
    (tmp_path / "first.png").write_bytes(first)
    q1, q2, max_tokens = "What is in this picture?", "And how does this one differ?", 40
    user1 = {"role": "user", "content": [image_part(first), {"type": "text", "text": q1}]}
    user2 = {"role": "user", "content": [image_part(second), {"type": "text", "text": q2}]}
    a1 = reference_answer(live_server, [user1], max_tokens)
    a2 = reference_answer(live_server, [user1, {"role": "assistant", "content": a1}, user2], max_tokens)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#max-tokens", str(max_tokens))
    page.evaluate(WATCH_ANSWERS)

    page.set_input_files("#image-input", str(tmp_path / "first.png"))  # turn 1: the file picker
    page.wait_for_selector("#attachments img")
    ask(page, q1)
    page.evaluate(GIVE_FILES, ["drop", "second.png", base64.b64encode(second).decode()])  # turn 2: a drop
    page.wait_for_selector("#attachments img")
    ask(page, q2)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    assert not page.errors
    assert [body["messages"] for body in sent] == [[user1], [user1, {"role": "assistant", "content": a1}, user2]]
    assert all(body["stream"] and body["max_tokens"] == max_tokens for body in sent)
    assert page.evaluate("conversation")[-1] == {"role": "assistant", "content": a2} and a1 and a2
    bubbles = page.eval_on_selector_all("#log .msg", "ms => ms.map(m => [m.className, m.querySelectorAll('img').length])")
    assert bubbles == [["msg user", 1], ["msg assistant", 0], ["msg user", 1], ["msg assistant", 0]]
    assert page.inner_text("#log .msg.user >> nth=1") == q2
    texts = page.evaluate("window.answerTexts")
    assert len(set(texts)) > 4  # both answers grew piece by piece, each ending on its final text
    assert page.text_content("#attachments") == "" and page.input_value("#question") == ""
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_stop_cancels_the_generation_on_the_server(page, live_server):
    before = wait_idle(live_server)
    page.fill("#max-tokens", "1500")
    page.fill("#question", "Talk for a long time.")
    page.click("#send")
    page.wait_for_function("(document.querySelector('.msg.assistant') || {}).textContent?.length > 5",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    after = wait_idle(live_server)
    assert after["cancelled_rows"] == before["cancelled_rows"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 1500  # it stopped early
    partial = page.evaluate("conversation")[-1]
    assert partial["role"] == "assistant" and partial["content"]  # the partial answer stays in the conversation
    assert "stopped" in page.get_attribute(".msg.assistant", "class")
    assert page.is_enabled("#send") and not page.is_enabled("#stop") and not page.errors


# A model answer that tries every way into the page, plus the Markdown the page renders. In network-sized pieces.
HOSTILE = ("**Bold** and *soft* with `<img src=x onerror=\"window.pwned=1\">` code.\n"
           "<script>window.pwned = 2</script> <b>raw</b> <img src=x onerror=\"window.pwned=3\">\n"
           "[click](javascript:window.pwned=4) [docs](https://example.com/a?b=<c>)\n\n"
           "- first <i>item</i>\n- second\n\n```\n<iframe src=\"javascript:window.pwned=5\"></iframe>\n```")


def fake_stream(route) -> None:
    pieces = [HOSTILE[i:i + 7] for i in range(0, len(HOSTILE), 7)]
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def test_answers_render_markdown_and_never_html(page, tmp_path):
    page.route("**/v1/chat/completions", fake_stream)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.evaluate(GIVE_FILES, ["paste", "pasted.png", base64.b64encode(png_bytes(32, 32, 1)).decode()])
    page.wait_for_selector("#attachments img")  # a pasted image is attached too
    ask(page, "Say something nasty.")
    answer = page.locator(".msg.assistant")
    tags = answer.evaluate("a => [...a.querySelectorAll('*')].map(e => e.tagName.toLowerCase())")
    assert set(tags) == {"p", "strong", "em", "code", "a", "ul", "li", "pre"}
    assert answer.evaluate("a => [...a.querySelectorAll('a')].map(e => [e.textContent, e.href, e.rel])") == [
        ["docs", "https://example.com/a?b=%3Cc%3E", "noopener noreferrer"]]
    text = answer.text_content()
    for literal in ("<script>window.pwned = 2</script>", "<b>raw</b>", '<img src=x onerror="window.pwned=3">',
                    "[click](javascript:window.pwned=4)", "<i>item</i>", "<iframe src="):
        assert literal in text
    assert answer.locator("code").first.text_content() == '<img src=x onerror="window.pwned=1">'
    page.wait_for_timeout(200)  # an injected onerror would have fired by now
    assert page.evaluate("window.pwned") is None and not dialogs and not page.errors
    assert page.evaluate("conversation")[-1] == {"role": "assistant", "content": HOSTILE}
