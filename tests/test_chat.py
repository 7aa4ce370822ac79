"""`refinfer chat` driven through a pseudo-terminal (pexpect), as a person would use it.

The model is tiny and random with SmolLM2's vocabulary and chat template: its replies are
nonsense, but they stream, stop, and reuse the conversation's K/V like any model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pexpect

BLOCK = 16  # the engine's KV block size: the prefix cache reuses whole blocks
SUMMARY = r"\[(\d+) prompt tokens \((\d+) cached\), (\d+) generated in [\d.]+ s: [^\]]*\]"
SYSTEM = "You are a patient assistant. You answer every question about rivers at length."
QUESTION = "Tell me about the rivers of Europe, from west to east."


def spawn(model: Path, *args: str) -> pexpect.spawn:
    """`refinfer chat` on model in a pseudo-terminal, greedy, on one thread."""
    argv = ["-m", "refinfer", "chat", "--model", str(model), "--threads", "1",
            "--temperature", "0", *args]  # fmt: skip
    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=120,
                          dimensions=(24, 500))  # fmt: skip
    child.expect_exact(">>> ")
    return child


def turn(child: pexpect.spawn, line: str) -> tuple[str, tuple[int, int, int]]:
    """Send a line; return the reply's text and its (prompt, cached, generated) counts."""
    child.sendline(line)
    child.expect(SUMMARY)
    reply = child.before.split(line, 1)[1].strip()
    counts = tuple(int(g) for g in child.match.groups())
    child.expect_exact(">>> ")
    return reply, counts


def test_turns_reuse_the_conversation_kv_then_reset_and_exit(tiny_speaking_smollm2: Path):
    child = spawn(tiny_speaking_smollm2, "-n", "8", "--system", SYSTEM)
    first, (prompt1, cached1, n1) = turn(child, QUESTION)
    assert first and n1 == 8 and prompt1 >= 2 * BLOCK and cached1 == 0
    _, (prompt2, cached2, _) = turn(child, "And which one is the longest?")
    assert prompt2 > prompt1 + n1 and cached2 >= prompt1 // BLOCK * BLOCK  # turn 1's blocks
    child.sendline("/reset")
    child.expect_exact("(a new conversation)")
    child.sendline("/what")
    child.expect_exact("(unknown command /what; /reset starts")
    again, (prompt3, cached3, _) = turn(child, QUESTION)
    assert (again, prompt3) == (first, prompt1) and cached3 == (prompt1 - 1) // BLOCK * BLOCK
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tiny_speaking_smollm2: Path):
    child = spawn(tiny_speaking_smollm2)  # replies run to the end of the context (256)
    child.sendline("Write a long story.")
    child.expect_exact("Write a long story.\r\n")
    child.expect(r"\w")  # the reply has begun
    child.sendintr()
    child.expect(SUMMARY)
    assert child.match.group(0).endswith(", stopped]") and int(child.match.group(3)) < 200
    child.expect_exact(">>> ")
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("/exit (or Ctrl-D) leaves")
    _, (_, _, n) = turn(child, "Hi")
    assert n > 0
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
