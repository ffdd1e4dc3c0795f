"""Incremental detokenization (vLLM's prefix / read offsets): each new token's text is the difference between
decoding a short window with and without it, emitted only once it no longer ends in an incomplete UTF-8 sequence,
so a multi-byte character split over tokens is never cut, and a word-initial space is kept."""
from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept as context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list, stop: list = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = list(stop)
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple:
        """Feed one token; returns (new text, stopped: a stop string appeared; the text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return "", False
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = len(self.text)
        self.text += delta
        if self.stop:
            window = max(0, start - self._max_stop + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                return self.text[start:] if cut > start else "", True
        return delta, False
