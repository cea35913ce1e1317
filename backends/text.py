"""Text helpers every engine needs: stop strings over a stream, and UTF-8 that
arrives a byte piece at a time."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Cuts a text stream before the first stop string.

    Text that could be the start of a stop string is held back until it is known
    not to be one, so the client never sees a partial stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit now; sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda h: h[0])
            self.stopped = True
            self.held = ""
            return buf[:cut]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of a generation that did not stop: the held-back text."""
        out, self.held = self.held, ""
        return out


class Utf8Stream:
    """Turns token byte pieces into text, holding incomplete UTF-8 sequences back."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self.decoder.decode(piece)

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
