"""Thinking: splits ``<think>...</think>`` out of a streamed answer, for Ollama's
``thinking`` and OpenAI's ``reasoning_content``.

A template may open the block itself at the end of the prompt (DeepSeek-R1, Qwen3
with ``enable_thinking``); the output then starts inside it."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkStream:
    def __init__(self, prompt: str) -> None:
        self.inside = prompt.rstrip().endswith(OPEN)
        self.opened_by_prompt = self.inside  # a model may still write the tag again: drop it
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (thinking, content) safe to send now."""
        buf, self.held = self.held + text, ""
        if self.opened_by_prompt:
            head = buf.lstrip()
            if OPEN.startswith(head) and len(head) < len(OPEN):
                self.held = buf  # could still become "<think>"
                return "", ""
            self.opened_by_prompt = False
            if head.startswith(OPEN):
                buf = head[len(OPEN):]
        thinking: list[str] = []
        content: list[str] = []
        while buf:
            tag = CLOSE if self.inside else OPEN
            i = buf.find(tag)
            if i >= 0:
                (thinking if self.inside else content).append(buf[:i])
                buf = buf[i + len(tag):]
                self.inside = not self.inside
                continue
            keep = next((n for n in range(min(len(tag) - 1, len(buf)), 0, -1) if buf.endswith(tag[:n])), 0)
            (thinking if self.inside else content).append(buf[: len(buf) - keep])
            self.held = buf[len(buf) - keep:]
            break
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.inside else ("", held)
