"""`evev2 chat`: stream answers from a model folder, one-shot (`--prompt`) or as an interactive multi-turn session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TextIO

from evev2.infer.engine import GenerationRequest, InferenceEngine
from evev2.infer.errors import InvalidRequestError
from evev2.infer.images import load_image

HELP = "commands: /image PATH (attach an image to your next message), /reset (forget history and images), /quit"


class ChatSession:
    """A conversation that keeps its history and every image; new images join the next user message."""

    def __init__(self, engine: InferenceEngine, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        self.engine = engine
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.images: list = []
        self.pending_images = 0

    def add_image(self, source: str | Path) -> None:
        """Load now (a bad path fails here, not mid-conversation); raises `ImageInputError`."""
        self.images.append(load_image(source, self.engine.image_limits))
        self.pending_images += 1

    def ask(self, text: str, out: TextIO) -> str:
        """Stream the answer to `out` and keep the turn in the history; a refused request leaves the history as is."""
        content = [{"type": "image"}] * self.pending_images + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        request = GenerationRequest(messages=[*self.messages, user], images=list(self.images), **self.sampling)
        pieces = []
        for delta in self.engine.stream(request):
            pieces.append(delta)
            out.write(delta)
            out.flush()
        out.write("\n")
        answer = "".join(pieces)
        self.messages += [user, {"role": "assistant", "content": answer}]
        self.pending_images = 0
        return answer


def chat_cli(
    *,
    model: Path,
    image: list[str] | None = None,
    prompt: str | None = None,
    template: Literal["eve", "chatml", "plain"] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None,
    quantize: Literal["int8"] | None = None,
) -> None:
    """Chat with a model folder: answers stream as they are generated.

    Args:
        model: model folder (weights + processor files).
        image: image files for the first message.
        prompt: ask this once and exit; without it the chat is interactive (/image PATH, /reset, /quit).
        template: chat template override (eve, chatml, plain); default the folder's.
        max_new_tokens: answer length cap.
        temperature: 0 is greedy.
        top_p: nucleus sampling mass (with temperature > 0).
        device: e.g. cpu, cuda, cuda:1; default cuda when available.
        dtype: float32, bfloat16, float16 or float64; default bfloat16 on GPU, float32 on CPU.
        quantize: int8 stores the decoder's linear weights as int8 (torchao, the `quantize` extra).
    """
    engine = InferenceEngine.from_pretrained(model, device=device, dtype=dtype, template=template, quantize=quantize)
    session = ChatSession(engine, max_new_tokens, temperature, top_p)
    for path in image or []:
        session.add_image(path)
    if prompt is not None:
        session.ask(prompt, sys.stdout)
        return
    _interactive(session, sys.stdin, sys.stdout)


def _interactive(session: ChatSession, stdin: TextIO, out: TextIO) -> None:
    out.write(HELP + "\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        try:
            if command == "/quit":
                return
            if command == "/reset":
                session.reset()
                out.write("(history and images cleared)\n")
            elif command == "/image":
                session.add_image(argument.strip())
                out.write(f"(image {len(session.images)} attached to your next message)\n")
            elif command.startswith("/") and command != "/":
                out.write(f"unknown command {command}; {HELP}\n")
            else:
                out.write("eve> ")
                session.ask(text, out)
        except InvalidRequestError as err:  # a bad image or an over-long conversation: say so and go on
            out.write(f"error: {err}\n")
