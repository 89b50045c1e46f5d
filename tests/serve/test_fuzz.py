"""Fuzzing the HTTP API: whatever a client sends, the answer is a 2xx or a 4xx with a JSON reason.

Hypothesis POSTs generated bodies to the real app in-process (TestClient runs the lifespan; the engine's real
continuous batcher generates with the tiny random model): arbitrary JSON, chat requests that are valid except for one
part (image URLs, data URIs of forged or corrupt images, sampling fields, stop shapes, streaming), raw bytes under any
content type, and other paths. Properties: never a 5xx, a 4xx always carries `{"error": {"message", "type"}}`, a 2xx is a
well-formed completion (or SSE stream without an in-band error), and afterwards the server still answers normally.
Valid requests ask for at most 3 new tokens (default 2) so that generation stays cheap.
"""

from __future__ import annotations

import base64
import io
import json
import socketserver
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from evev2.infer import InferenceEngine
from evev2.infer.images import ImageLimits
from evev2.serve import ServeSettings, create_app

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-eve"
MAX_IMAGE_BYTES = 40_000
MAX_PIXELS = 5_000  # about 70 x 70
MAX_BODY = 300_000
MAX_NEW = 3  # the most new tokens a generated valid request asks for


def fuzz(examples: int) -> settings:
    """`examples` under the project's "ci" profile (derandomized, 100 per test), proportionally more under others
    (`pytest --hypothesis-profile=explore` searches 20x as many, at random). No per-example deadline: a shared CPU can
    stall any one request, and a hang is caught by the timeout below."""
    return settings(max_examples=max(1, examples * settings.default.max_examples // 100), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# A hang (a dead batching thread, a future never completed) fails the test instead of blocking the run.
# Pillow warns about the broken EXIF blocks of corrupted samples; refusing or decoding them is what is tested.
pytestmark = [pytest.mark.timeout(300 * max(1, settings.default.max_examples // 100)),
              pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")]


@pytest.fixture(scope="module")
def client(tiny_chat_engine):
    """Small limits (2 images of <= 5000 pixels and 40 kB, 300 kB bodies), 2 new tokens by default, no batch wait."""
    engine = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor,
                             ImageLimits(max_pixels=MAX_PIXELS, max_bytes=MAX_IMAGE_BYTES), max_images=2)
    settings_ = ServeSettings(model_name=MODEL, api_key=KEY, default_max_tokens=2, max_body_bytes=MAX_BODY)
    with TestClient(create_app(engine, settings_), raise_server_exceptions=False) as test_client:
        yield test_client


# ----- checking one answer -----
def check(response, stream: bool | None = None) -> None:
    """2xx or 4xx, never 5xx; a 4xx is an OpenAI error body with a reason; a 2xx is a well-formed completion."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:1000]}"
    assert 200 <= status < 300 or 400 <= status < 500, status
    assert "Traceback" not in response.text
    if status >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.headers
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"].strip(), error
        assert isinstance(error["type"], str) and error["type"], error
        _count(f"HTTP {status} {error.get('code')}")
        return
    _count(f"HTTP {status}")
    if response.headers["content-type"].startswith("text/event-stream"):
        assert stream is not False
        blocks = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b.strip()]
        assert blocks[-1] == "[DONE]", blocks[-3:]
        events = [json.loads(b) for b in blocks[:-1]]
        assert all("error" not in e for e in events), events
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes in (["stop"], ["length"]), finishes
        return
    assert stream is not True
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["model"] == MODEL
    choice = reply["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    assert 1 <= reply["usage"]["completion_tokens"] <= MAX_NEW


def _count(label: str) -> None:
    """How the examples split, shown by `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(label)


def post_json(client, value, ascii_only: bool = True):
    """`value` as JSON: NaN/Infinity as Python writes them, lone surrogates as \\udXXX escapes (or raw CESU bytes)."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    raw = text.encode("utf-8", "surrogatepass")
    return client.post("/v1/chat/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})


def still_serves(client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(SAMPLES["png_rgb"])}},
        {"type": "text", "text": "still there?"}]}], "temperature": 0, "max_tokens": 3}
    ok = post_json(client, body)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert client.app.state.requests.engine.stats.running == 0  # no row was left behind in the batch


# ----- image payloads: valid in many formats and modes, forged headers, truncated, corrupted -----
def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _forged_png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares any size (valid CRCs), with whatever pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(idat))
            + _png_chunk(b"IEND", b""))


def _forged_gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"," + struct.pack(
        "<HHHH", 0, 0, width, height) + b"\x00\x02\x02\x44\x01\x00;"


def _forged_bmp(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + 12, 0, 0, 14 + len(header)) + header + b"\x00" * 12


def _forged_jpeg(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    palette_transparent = Image.new("P", (16, 16), 1)
    return {
        "png_rgb": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png_la": _encode(rgb.convert("LA"), "PNG"),
        "png_1bit": _encode(rgb.convert("1"), "PNG"),
        "png_p_transparent": _encode(palette_transparent, "PNG", transparency=1),
        "png_16bit": _encode(Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)), "PNG"),
        "jpeg": _encode(rgb, "JPEG"),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_rotated": _encode(rgb, "JPEG", exif=exif),
        "gif_animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encode(rgb, "BMP"),
        "tiff_float": _encode(Image.fromarray(rng.random((12, 12), dtype=np.float32)), "TIFF"),
        "tiff_int32": _encode(Image.fromarray(rng.integers(-5, 5, (12, 12), dtype=np.int32)), "TIFF"),
        "tiff_lab": _encode(rgb.convert("LAB"), "TIFF"),
        "webp": _encode(rgb, "WEBP"),
        "ico": _encode(rgb, "ICO"),
        "tga": _encode(rgb, "TGA"),
        "ppm": _encode(rgb, "PPM"),
        "pcx": _encode(rgb, "PCX"),
        "jpeg2000": _encode(rgb, "JPEG2000"),
        # forged headers: huge, zero and negative sizes, pixel data missing
        "png_huge": _forged_png(2**31 - 1, 2**31 - 1),
        "png_wide": _forged_png(100_000, 1),
        "png_zero": _forged_png(0, 0),
        "png_no_pixels": _forged_png(8, 8, b""),
        "png_short_pixels": _forged_png(8, 8, b"\x00" * 10),
        "gif_huge": _forged_gif(65535, 65535),
        "gif_zero": _forged_gif(0, 0),
        "bmp_negative": _forged_bmp(-5, -2**31),
        "bmp_huge": _forged_bmp(2**31 - 1, 1),
        "jpeg_huge": _forged_jpeg(65500, 65500),
        "jpeg_zero": _forged_jpeg(0, 0),
        "big_but_flat": _encode(Image.new("RGB", (200, 200), 3), "PNG"),  # over the pixel cap, few bytes
        "png_1x1": _encode(Image.new("RGB", (1, 1), 3), "PNG"),
        "png_thin": _encode(Image.new("L", (MAX_PIXELS, 1), 3), "PNG"),  # at the pixel cap, one row
        "png_tall": _encode(Image.new("L", (1, MAX_PIXELS), 3), "PNG"),
    }


def _tiff_with_rational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag (0x0111) has type RATIONAL: Pillow's load() seeks to an IFDRational (TypeError)."""
    data = _encode(Image.new("L", (8, 8), 3), "TIFF")
    assert data.count(b"\x11\x01\x04\x00") == 1
    return data.replace(b"\x11\x01\x04\x00", b"\x11\x01\x05\x00")


SAMPLES = _samples()
VALID_SAMPLES = ["png_rgb", "png_rgba", "png_la", "png_1bit", "png_p_transparent", "png_16bit", "png_1x1", "png_thin",
                 "png_tall", "jpeg", "jpeg_cmyk", "jpeg_rotated", "gif_animated", "bmp", "tiff_float", "tiff_int32",
                 "tiff_lab", "webp", "ico", "tga", "ppm", "pcx", "jpeg2000"]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


sample_bytes = st.sampled_from(sorted(SAMPLES)).map(SAMPLES.__getitem__)
truncated = st.builds(lambda data, frac: data[:int(len(data) * frac)], sample_bytes, st.floats(0, 1))
corrupted = st.builds(lambda data, at, value: data[:at % len(data)] + bytes([value]) + data[at % len(data) + 1:],
                      sample_bytes, st.integers(0, 2**16), st.integers(0, 255))
image_bytes = st.one_of(sample_bytes, truncated, corrupted, st.binary(max_size=64))

# ----- JSON of every kind -----
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))  # lone surrogates included
texts = st.one_of(
    st.text(any_char, max_size=20),
    st.sampled_from(["", " ", "<image>", "<image><image>", "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>",
                     "\x00", "\ud800", "a\udfffb", "\u202e", "\ufeff", "\U0010ffff", "🙂" * 3, "null", "NaN"]),
    st.sampled_from([2_000, 20_000, 100_000]).flatmap(lambda n: st.sampled_from(["x" * n, "🙂" * (n // 4),
                                                                                 "<image>" * (n // 7)])),
)
huge_ints = st.sampled_from([31, 63, 64, 65, 333, 13_300]).map(lambda bits: 2**bits)  # 13300 bits: over 4300 digits
numbers = st.one_of(st.integers(), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=8)
unknown_fields = st.dictionaries(st.text(any_char, max_size=8).filter(lambda k: k not in KNOWN_FIELDS), json_values,
                                 max_size=2)
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
                "stream_options", "n", "role", "content", "type", "text", "image_url", "url", "detail",
                "include_usage"}


def with_extra(strategy):
    """An object strategy with unknown fields mixed in (stock OpenAI clients send fields we do not serve)."""
    return st.builds(lambda obj, extra: {**extra, **obj}, strategy, unknown_fields)


# ----- image URLs a client may send -----
b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n%"
image_urls = st.one_of(
    st.builds(data_url, image_bytes, st.sampled_from(["image/png", "image/jpeg", "image/x-anything", "IMAGE/PNG", ""])),
    st.builds(lambda h, p: f"data:{h},{p}", st.sampled_from(
        ["image/png;base64", "image/png", "text/plain;base64", "image/png;charset=utf-8", ";base64", "",
         "image/svg+xml;base64", "image/png;base64;base64", " image/png ; BASE64 "]),
        st.text(b64_alphabet, max_size=40)),
    st.builds(lambda data, cut: data_url(data)[:cut], sample_bytes, st.integers(0, 60)),  # cut inside the header
    st.sampled_from(["data:", "data:,", "data:image/png;base64,", "data:image/png;base64,====", "data:;base64,AAAA",
                     "data:image/png;base64,\x00", "DATA:image/png;base64,AAAA", " data:image/png;base64,AAAA"]),
    st.sampled_from(["/etc/passwd", "file:///etc/passwd", "../../../../etc/passwd", "tests/serve/conftest.py",
                     "/dev/zero", "/dev/urandom", "/proc/self/environ", "C:\\Windows\\win.ini",
                     "\\\\host\\share\\a.png", "~/.ssh/id_rsa", "", " ", "image.png", "\x00", "http:",
                     "//evil.example/x.png"]),
    st.sampled_from(["http://127.0.0.1:1/a.png", "https://example.com/cat.png", "HTTP://169.254.169.254/latest",
                     "http://[::1", "http://localhost:99999/", "https://\ud800/", "ftp://example.com/a.png",
                     "gopher://127.0.0.1:70/", "jar:http://x!/"]),
    texts,
)



# ----- chat requests: a valid request in which each part is sometimes wrong -----
def mostly(valid, wrong, one_in: int = 8):
    """`valid`, but one time in `one_in` something from `wrong` (so most requests have zero to two faults)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: wrong if i == 0 else valid)


good_image_urls = st.sampled_from(VALID_SAMPLES).map(lambda name: data_url(SAMPLES[name]))
plain_texts = st.text(max_size=30)
details = st.sampled_from(["auto", "low", "high"])
image_url_objects = with_extra(st.fixed_dictionaries(
    {"url": st.one_of(good_image_urls, image_urls)}, optional={"detail": mostly(details, json_values)}))
image_part = with_extra(st.fixed_dictionaries({"type": st.just("image_url"),
                                               "image_url": mostly(image_url_objects, json_values)}))
text_part = with_extra(st.fixed_dictionaries({"type": st.just("text"), "text": mostly(plain_texts, texts)}))
unknown_part = with_extra(st.fixed_dictionaries({"type": st.one_of(st.sampled_from(
    ["image", "input_audio", "audio", "file", "refusal", "input_text", "TEXT", "Image_url", ""]), texts)}))
part = mostly(st.one_of(text_part, image_part), st.one_of(unknown_part, json_values))
content = mostly(st.one_of(plain_texts, st.lists(part, min_size=1, max_size=3)),
                 st.one_of(texts, st.lists(part, max_size=0), json_values))
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "function", "USER", ""])


def message(role: str):
    return with_extra(st.fixed_dictionaries({"role": mostly(st.just(role), st.one_of(roles, json_values)),
                                             "content": content}, optional={"name": plain_texts}))


conversations = st.one_of(st.tuples(message("user")), st.tuples(message("system"), message("user")),
                          st.tuples(message("user"), message("assistant"), message("user"))).map(list)
messages = mostly(conversations, st.one_of(st.lists(message("user"), max_size=0), st.lists(message("assistant"),
                                                                                             min_size=1, max_size=2),
                                           json_values))

too_many_tokens = st.one_of(st.integers(2049, 2**70), huge_ints)  # over the 2048-token context: refused, never run
token_counts = mostly(st.integers(1, MAX_NEW), st.one_of(too_many_tokens, st.integers(-(2**70), 0), json_values))
temperatures = mostly(st.floats(0, 2), st.one_of(st.sampled_from([1e-300, 5e-324, 2.0000001, -1e-300, -1]),
                                                 json_values))
top_ps = mostly(st.floats(0, 1, exclude_min=True), st.one_of(
    st.sampled_from([5e-324, 1e-300, 0, -0.0, 1.0000001, -0.5]), json_values))
stops = mostly(st.one_of(st.none(), plain_texts.filter(bool), st.lists(plain_texts.filter(bool), max_size=8)),
               st.one_of(texts, st.lists(texts, max_size=12), st.lists(json_values, max_size=3), json_values))
OPTIONAL = {
    "model": mostly(st.just(MODEL), st.one_of(texts, json_values)),
    "max_tokens": token_counts,
    "max_completion_tokens": token_counts,
    "temperature": temperatures,
    "top_p": top_ps,
    "stop": stops,
    "stream": mostly(st.booleans(), json_values),
    "stream_options": mostly(st.one_of(st.none(), with_extra(st.fixed_dictionaries(
        {"include_usage": mostly(st.booleans(), json_values)}))), json_values),
    "n": mostly(st.just(1), st.one_of(st.integers(-5, 5), huge_ints, json_values)),
}
chat_requests = with_extra(st.fixed_dictionaries({"messages": messages}, optional=OPTIONAL))


def capped(body):
    """Valid requests must stay cheap: a count of new tokens in [4, 2048] (runs up to the context) becomes 3."""
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if type(value) is int and MAX_NEW < value <= 2048:
                body[name] = MAX_NEW
    return body


# ----- the properties -----
@fuzz(60)
@given(body=json_values, ascii_only=st.booleans())
@example(body={"messages": [{"role": "user", "content": [{"type": "\ud800"}]}]}, ascii_only=True)
def test_arbitrary_json_is_never_a_server_error(client, body, ascii_only):
    check(post_json(client, capped(body), ascii_only))


@fuzz(200)
@given(body=chat_requests, ascii_only=st.booleans())
# found: logits / 2e-60 overflow float32 -> NaN probabilities -> torch.multinomial raised, failing the whole batch
@example(body={"messages": [{"role": "user", "content": ""}], "temperature": 2e-60}, ascii_only=True)
@example(body={"messages": [{"role": "user", "content": "hi"}], "temperature": 5e-324, "stream": True},
         ascii_only=True)
def test_chat_requests_with_bad_parts_are_never_a_server_error(client, body, ascii_only):
    stream = body.get("stream") if isinstance(body.get("stream"), bool) else None
    check(post_json(client, capped(body), ascii_only), stream)


@fuzz(100)
@given(data=image_bytes, media_type=st.sampled_from(["image/png", "image/jpeg", ""]), stream=st.booleans())
def test_any_image_payload_is_never_a_server_error(client, data, media_type, stream):
    """A valid request but for its image: valid in many formats and modes, forged sizes, truncated, corrupted."""
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        data, media_type)}}, {"type": "text", "text": "What is it?"}]}], "max_tokens": 2, "stream": stream}
    check(post_json(client, body), stream)


GOOD_REQUEST = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": MAX_NEW}


@fuzz(25)
@given(bodies=st.lists(chat_requests, min_size=1, max_size=3))
@example(bodies=[{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300, "stream": True}] * 3)
def test_concurrent_requests_never_fail_each_other(client, bodies):
    """Requests sent together share batches: whatever the others are, a good request still gets its answer."""
    bodies = [capped(b) for b in bodies] + [GOOD_REQUEST]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post_json(client, b), bodies))
    for body, response in zip(bodies, responses, strict=True):
        check(response, body.get("stream") if isinstance(body.get("stream"), bool) else None)
    assert responses[-1].status_code == 200 and responses[-1].json()["usage"]["completion_tokens"] == MAX_NEW


# Payloads found by fuzzing the decoder (each was a 500); kept as plain regression cases.
FOUND_IMAGES = {
    "tiff_rational_strip_offsets": _tiff_with_rational_strip_offsets(),  # TypeError from Pillow's TiffImagePlugin
}


@pytest.mark.parametrize("name", sorted(FOUND_IMAGES))
def test_images_found_by_fuzzing_are_4xx(client, name):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        FOUND_IMAGES[name])}}, {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}
    response = post_json(client, body)
    check(response, stream=False)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text


# ----- remote images (when a server enables them): malformed URLs, and a loopback server that breaks HTTP -----
def _http(status: str, body: bytes = b"", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


REMOTE_RESPONSES = {
    "png": _http("200 OK", SAMPLES["png_rgb"], "Content-Type: image/png\r\n"),
    "html": _http("200 OK", b"<html>not an image</html>"),
    "too_big": _http("200 OK", SAMPLES["png_rgb"] + b"\0" * MAX_IMAGE_BYTES),
    "not_found": _http("404 Not Found"),
    "redirect_loop": _http("302 Found", headers="Location: /redirect_loop\r\n"),
    "redirect_file": _http("302 Found", headers="Location: file:///etc/passwd\r\n"),
    "redirect_ftp": _http("302 Found", headers="Location: ftp://127.0.0.1:1/a.png\r\n"),
    "closed": b"",
    "garbage": b"garbage\r\n\r\n",
    "http09": SAMPLES["png_rgb"],
    "short_body": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + SAMPLES["png_rgb"][:10],
    "bad_length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabc",
    "bad_chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
    "long_header": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    "many_headers": b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 150 + b"\r\n",
}


class _CannedHandler(socketserver.BaseRequestHandler):
    """Answers `GET /<name>` with `REMOTE_RESPONSES[name]` byte for byte (404 for other names), then closes."""

    def handle(self) -> None:
        self.request.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65_536:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        target = head.split(b" ")[1].decode("latin-1") if head.count(b" ") >= 2 else ""
        self.request.sendall(REMOTE_RESPONSES.get(target.lstrip("/"), REMOTE_RESPONSES["not_found"]))


@pytest.fixture(scope="module")
def remote(tiny_chat_engine):
    """A client of a server that fetches http(s) images, and the base URL of a misbehaving loopback image host."""
    engine = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor,
                             ImageLimits(max_pixels=MAX_PIXELS, max_bytes=MAX_IMAGE_BYTES, allow_remote=True))
    settings_ = ServeSettings(model_name=MODEL, default_max_tokens=2)
    with pytest.MonkeyPatch.context() as env, socketserver.ThreadingTCPServer(("127.0.0.1", 0),
                                                                               _CannedHandler) as host:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.delenv(name, raising=False)  # urllib would send loopback requests to a proxy
        host.daemon_threads = True
        threading.Thread(target=host.serve_forever, daemon=True).start()
        with TestClient(create_app(engine, settings_), raise_server_exceptions=False) as test_client:
            yield SimpleNamespace(client=test_client, base=f"http://127.0.0.1:{host.server_address[1]}")
        host.shutdown()


LOOPBACK_URLS = ["http://127.0.0.1:1/a.png", "https://127.0.0.1:1/a.png", "http://[::1]:1/", "http://127.0.0.1:0/",
                 "http://127.0.0.1:-1/", "http://127.0.0.1:65536/", "http://127.0.0.1:99999999999999999999/",
                 "http://127.0.0.1:abc/", "http://127.0.0.1:1/\x00", "http://127.0.0.1:1/a b", "http://\x00/",
                 "http://127.0.0.1:1/\r\nX-Injected: 1", "http://127.0.0.1:1/\ud800", "https://\ud800/", "http://",
                 "http:///a.png", "http://[::1", "http://.:1/", "HTTP://127.0.0.1:1/"]


@fuzz(60)
@given(kind=st.sampled_from(["canned", "canned", "path", "url"]), name=st.sampled_from(sorted(REMOTE_RESPONSES)),
       text=st.text(any_char, max_size=12), url=st.sampled_from(LOOPBACK_URLS))
@example(kind="url", name="png", text="", url="http://127.0.0.1:abc/")  # found: http.client.InvalidURL, a 500
@example(kind="url", name="png", text="", url="http://127.0.0.1:99999999999999999999/")  # found: OverflowError
@example(kind="url", name="png", text="", url="https://\ud800/")  # found: the URL echoed raw, response unencodable
@example(kind="canned", name="garbage", text="", url="")  # found: http.client.BadStatusLine
def test_remote_images_are_never_a_server_error(remote, kind, name, text, url):
    image_url = {"canned": f"{remote.base}/{name}", "path": f"{remote.base}/{text}", "url": url}[kind]
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}
    response = post_json(remote.client, body)
    check(response, stream=False)
    assert (response.status_code == 200) == (image_url == f"{remote.base}/png"), response.text


CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
                 "application/vnd.api+json", "application/x-www-form-urlencoded", "multipart/form-data",
                 "multipart/form-data; boundary=xyz", "text/plain", "application/octet-stream", "image/png", "",
                 "garbage", "application/", ";;;", "application/json; charset=no-such-codec"]
PATHS = ["/v1/chat/completions", "/v1/chat/completions/", "/v1/completions", "/v1/models", "/health", "/",
         "/v1/embeddings", "/v1/chat/completions?stream=true", "/nowhere"]


@fuzz(60)
@given(raw=st.one_of(st.binary(max_size=200), st.builds(lambda d: json.dumps(d).encode(), chat_requests),
                     st.sampled_from([b"", b"{", b"[" * 5000, b"[" * 100_000, b'{"messages": ' * 3000,
                                      b"\xff\xfe{\x00}\x00", b"\xef\xbb\xbf{}", b"\x00" * 100,
                                      b"1" * 5000, b'"' + b"\\ud800" * 100 + b'"'])),
       content_type=st.sampled_from(CONTENT_TYPES), path=st.sampled_from(PATHS))
@example(raw=b"[" * 100_000, content_type="application/json", path=PATHS[0])
def test_raw_bytes_any_content_type_any_path(client, raw, content_type, path):
    headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
    check(client.post(path, content=capped_raw(raw), headers=headers))


def capped_raw(raw: bytes) -> bytes:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    return json.dumps(capped(value)).encode() if isinstance(value, dict) else raw


def test_the_server_still_answers_after_the_fuzzing(client):
    """Runs after the properties above (file order): the batcher still answers normal requests."""
    still_serves(client)
    assert client.get("/health").json()["status"] == "ok"
    streamed = post_json(client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
                                  "stream_options": {"include_usage": True}})
    check(streamed, stream=True)
