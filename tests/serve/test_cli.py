"""`evev2 serve` wiring: flags reach the app, 127.0.0.1 is the default bind, the key may come from the environment.

`uvicorn.run` is replaced by a recorder (it would block); the recorded app is then exercised for real.
"""

from __future__ import annotations

import pytest
import uvicorn
from fastapi.testclient import TestClient

from evev2.cli import main
from tests.serve.conftest import chat_body, png_bytes, to_data_url


@pytest.fixture
def captured_run(monkeypatch) -> dict:
    calls: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: calls.update(app=app, host=host, port=port))
    return calls


def test_serve_flags_reach_the_app(tiny_eve_chat_dir, captured_run):
    main(["serve", "--model", str(tiny_eve_chat_dir), "--api-key", "cli-key", "--max-images", "1",
          "--default-max-tokens", "3", "--model-name", "demo"])
    assert (captured_run["host"], captured_run["port"]) == ("127.0.0.1", 8000)
    image = to_data_url(png_bytes(32, 32, 0))
    with TestClient(captured_run["app"]) as client:
        auth = {"Authorization": "Bearer cli-key"}
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=auth).json()["data"][0]["id"] == "demo"
        two = client.post("/v1/chat/completions", headers=auth, json=chat_body("two?", [image, image]))
        assert two.status_code == 400 and "limit is 1" in two.json()["error"]["message"]
        one = client.post("/v1/chat/completions", headers=auth, json=chat_body("one?", [image]))
        assert one.status_code == 200 and one.json()["usage"]["completion_tokens"] == 3


def test_api_key_from_the_environment(tiny_eve_chat_dir, captured_run, monkeypatch):
    monkeypatch.setenv("EVEV2_API_KEY", "env-key")
    main(["serve", "--model", str(tiny_eve_chat_dir), "--host", "0.0.0.0", "--port", "9123"])
    assert (captured_run["host"], captured_run["port"]) == ("0.0.0.0", 9123)
    with TestClient(captured_run["app"]) as client:
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"Authorization": "Bearer env-key"}).json()
        assert models["data"][0]["id"] == tiny_eve_chat_dir.name


def test_quantize_flag_loads_int8_weights(tiny_eve_chat_dir, captured_run):
    pytest.importorskip("torchao")
    main(["serve", "--model", str(tiny_eve_chat_dir), "--quantize", "int8", "--max-batch-size", "4"])
    engine = captured_run["app"].state.engine
    assert type(engine.model.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert engine.batcher.max_batch_size == 4
    with TestClient(captured_run["app"]) as client:
        one = client.post("/v1/chat/completions", json=chat_body("one?", max_tokens=2))
        assert one.status_code == 200 and one.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("flag, compiled", [([], False), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flag_chooses_the_decode_path(tiny_eve_chat_dir, captured_run, flag, compiled):
    main(["serve", "--model", str(tiny_eve_chat_dir), *flag])  # the default on CPU: eager
    assert captured_run["app"].state.engine.batcher.compiled is compiled
