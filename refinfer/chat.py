"""`refinfer chat`: a multi-turn conversation in the terminal, streamed as it is generated.

Where it sits: a loop for people over the batching Engine (decoding/batching.py), one
request at a time. Each turn renders the whole conversation with the model's chat template
and runs it as a new request; the engine's prefix cache still holds the K/V of every full
block of the earlier turns (prompts and replies), so a turn computes little more than the
new message. The summary line after each reply says how many prompt tokens were cached.

    >>> text --messages + chat template--> ids --Engine (prefix cache)--> reply, streamed
    /reset: a new conversation    /exit or Ctrl-D: leave    Ctrl-C: stop the reply, stay
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from refinfer.decoding.batching import Completion, Engine, Request
from refinfer.errors import RefinferError
from refinfer.kv_pool import BLOCK_SIZE, blocks_for
from refinfer.model import Model
from refinfer.sampling import SamplingParams

PROMPT = ">>> "
HELP = "/reset starts a new conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"


class Chat:
    """A conversation with a model: its messages, and an engine that keeps their K/V."""

    def __init__(self, model: Model, system: str | None = None,
                 params: SamplingParams | None = None, max_tokens: int | None = None,
                 out: TextIO = sys.stdout) -> None:  # fmt: skip
        """max_tokens: the longest reply (None: up to the end of the context); replies
        stream to out."""
        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise RefinferError(f"{model.path.name} has no chat template; use generate")
        self.model = model
        self.system = system
        self.params = params or SamplingParams()
        self.max_tokens = max_tokens
        self.out = out
        context = model.config.context_length
        self.engine = Engine(model, max_seqs=1, kv_blocks=blocks_for(context, BLOCK_SIZE))
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (its blocks stay cached until evicted)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str) -> Completion:
        """Add the user's text, stream the reply to out and return it; Ctrl-C stops it early
        (reason 'cancelled', the text so far kept). RefinferError if it cannot run."""
        tok = self.model.tokenizer
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = tok.encode(tok.apply_chat_template(messages), parse_special=True)
        room = self.model.config.context_length - len(prompt)
        if room < 1:
            raise RefinferError(f"the conversation fills the context ({len(prompt)} tokens); "
                                "/reset to start a new one")  # fmt: skip
        max_tokens = min(self.max_tokens or room, room)
        rid = self.engine.add_request(Request(prompt, self.params, max_tokens=max_tokens,
                                              on_text=self._show))  # fmt: skip
        stop = threading.Event()
        with _ctrl_c(stop.set):
            while not (done := self.engine.step()):
                if stop.is_set():
                    self.engine.cancel(rid)  # the next step returns it
        (reply,) = done
        if reply.finish_reason == "error":
            raise RefinferError(reply.error)
        self.messages = messages + [{"role": "assistant", "content": reply.text}]
        return reply

    def _show(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()


@contextmanager
def _ctrl_c(handler: Callable[[], None]) -> Iterator[None]:
    """Call handler on Ctrl-C (SIGINT) instead of raising KeyboardInterrupt, for a while."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def summary(c: Completion) -> str:
    """One line on a reply: prompt tokens (cached), tokens, speed, time to first token."""
    n = len(c.ids)
    decode = c.total_seconds - (c.time_to_first_token or 0)
    speed = f"{(n - 1) / decode:.1f} tok/s" if n > 1 and decode > 0 else "-"
    end = {"length": ", stopped at the length limit", "cancelled": ", stopped"}
    return (f"[{len(c.prompt_ids)} prompt tokens ({c.cached_tokens} cached), {n} generated "
            f"in {c.total_seconds:.2f} s: {speed}, first token after "
            f"{c.time_to_first_token or 0:.2f} s{end.get(c.finish_reason, '')}]")  # fmt: skip


def run(chat: Chat, read: Callable[[str], str] = input, err: TextIO = sys.stderr) -> None:
    """The terminal loop: read a line, answer it, until /exit or end of input."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    print(f"refinfer chat with {chat.model.path.name}; {HELP}", file=err)
    while True:
        try:
            line = read(PROMPT).strip()
        except EOFError:
            print(file=err)
            return
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=err)
            continue
        if line == "/exit":
            return
        if line == "/reset":
            chat.reset()
            print("(a new conversation)", file=err)
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {HELP})", file=err)
        elif line:
            _answer(chat, line, err)


def _answer(chat: Chat, line: str, err: TextIO) -> None:
    """Stream one reply, then its summary; a reply that cannot run is one line on err."""
    try:
        reply = chat.say(line)
    except RefinferError as e:
        print(f"refinfer: {e}", file=err)
        return
    chat.out.write("\n")
    print(summary(reply), file=err)
