"""The web page in a real headless Chromium (Debian's, driven by Playwright): upload, ask, watch tokens stream in."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, chat_body, png_bytes, to_data_url

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian chromium is not installed (.ci/run installs it with apt)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Records every length the answer box goes through, so the test can tell streaming from one final paint.
WATCH_ANSWER = """() => {
  window.answerLengths = [];
  const box = document.getElementById("answer");
  new MutationObserver(() => window.answerLengths.push(box.textContent.length))
    .observe(box, {childList: true, characterData: true, subtree: true});
}"""


def test_upload_ask_and_watch_the_answer_stream(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "noise.png"
    image.write_bytes(png_bytes(64, 64, 11))
    question, max_tokens = "What is in this picture?", 60
    reference = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json=chat_body(question, [to_data_url(image.read_bytes())], max_tokens=max_tokens))
    expected = reference.json()["choices"][0]["message"]["content"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(live_server.url + "/")
            page.set_input_files("#image-input", str(image))
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
            page.fill("#question", question)
            page.fill("#max-tokens", str(max_tokens))
            page.fill("#temperature", "0")
            page.fill("#api-key", API_KEY)
            page.evaluate(WATCH_ANSWER)
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            page.screenshot(path=str(tmp_path / "answer.png"), full_page=True)
            answer = page.text_content("#answer")
            lengths = page.evaluate("window.answerLengths")
        finally:
            browser.close()
    assert not errors
    assert answer == expected and answer
    assert len(set(lengths)) > 2 and lengths == sorted(lengths)  # the text grew piece by piece
    assert (tmp_path / "answer.png").stat().st_size > 1000
