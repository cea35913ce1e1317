"""Embedding models on OpenVINO GenAI: a ``TextEmbeddingPipeline`` over the IR that
``kiln compile`` exports for the feature-extraction task.

The pooling and normalisation are the model's own (``spec.extra["pooling"]`` and
``["normalize"]``, which ``kiln compile`` reads from the sentence-transformers config,
``modules.json`` and ``1_Pooling/config.json``): the pipeline's own default is CLS
pooling, which for all-MiniLM-L6-v2 (mean pooling) gives other vectors.

A list of texts goes to the pipeline in batches (``embed_documents``), not one inference per
text: sorted by length and BATCH at a time, since the pipeline pads a batch to its longest
text. On all-MiniLM-L6-v2 and 100 sentences of 9-40 tokens (bench.embeddings, in process)
the whole list in one call took 4.5 ms a text, sorted batches of 16-32 3.3-3.4. Nothing is cut: an input
longer than the model's ``max_length`` (sentence-transformers' ``max_seq_length``) is a
400, as on llama.cpp, where the pipeline would truncate it silently.
"""

from __future__ import annotations

import threading
from typing import Any

from backends.base import BackendError, Embeddings, InvalidRequest

BATCH = 32
POOLING = {"mean": "MEAN", "cls": "CLS", "last": "LAST_TOKEN"}
NO_TOKEN_IDS = ("input: token ids cannot be embedded by the openvino backend (OpenVINO GenAI's "
                "TextEmbeddingPipeline takes text only); send the text")


class Embedder:
    """One loaded embedding model. ``embed`` may be called from several threads; the
    pipeline runs one call at a time."""

    def __init__(self, ov_genai: Any, path: str, device: str, extra: dict[str, Any], props: dict[str, Any]) -> None:
        pooling = str(extra.get("pooling") or "")
        if pooling not in POOLING:
            raise BackendError(f"the embedding model's pooling is {pooling!r}; kiln knows "
                               f"{', '.join(POOLING)} (recompile it with kiln compile --task embedding)")
        cfg = ov_genai.TextEmbeddingPipeline.Config()
        cfg.pooling_type = getattr(ov_genai.TextEmbeddingPipeline.PoolingType, POOLING[pooling])
        cfg.normalize = bool(extra.get("normalize", False))
        self.pooling, self.normalize = pooling, cfg.normalize
        self.max_length = int(extra.get("max_length") or 512)
        self.pipe = ov_genai.TextEmbeddingPipeline(path, device, cfg, **props)
        self.tokenizer = ov_genai.Tokenizer(path)
        self._lock = threading.Lock()
        self.dimensions = len(self.pipe.embed_query("kiln"))  # also the load check: it computes

    def count(self, text: str) -> int:
        """The tokens the model sees for ``text``, its [CLS]/[SEP] included."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).input_ids
        return int(ids.get_shape()[-1])

    def embed(self, texts: list[str | list[int]]) -> Embeddings:
        if any(not isinstance(t, str) for t in texts):
            raise InvalidRequest(NO_TOKEN_IDS)
        strs = [t for t in texts if isinstance(t, str)]
        with self._lock:
            counts = [self.count(t) for t in strs]
            for n in counts:
                if n > self.max_length:
                    raise InvalidRequest(f"the input is {n} tokens, more than the {self.max_length} "
                                         f"this embedding model takes")
            order = sorted(range(len(strs)), key=counts.__getitem__)
            vectors: list[list[float]] = [[] for _ in strs]
            for i in range(0, len(order), BATCH):
                part = order[i: i + BATCH]
                for j, v in zip(part, self.pipe.embed_documents([strs[j] for j in part])):
                    vectors[j] = list(map(float, v))
        return Embeddings(vectors, sum(counts))


class HiddenStates:
    """A generation model's embeddings on OpenVINO: its last hidden states (the graph
    ``kiln compile --embeddings`` exports) mean-pooled over the prompt's tokens, the model's
    own tokenizer's ids (BOS as for a prompt), as llama.cpp computes them for a model
    without a pooling type. Not normalised here: the dialects normalise (``/api/embed``,
    ``/v1/embeddings``) or not (``/api/embeddings``) as they do for llama.cpp. Compiled on
    the first call, on the CPU when the model generates on the NPU."""

    def __init__(self, path: str, device: str, props: dict[str, Any]) -> None:
        self.path, self.device, self.props = path, device, props
        self._model: Any = None
        self._lock = threading.Lock()

    def embed(self, toks: list[list[int]], limit: int) -> Embeddings:
        import numpy as np

        for t in toks:
            if not t:
                raise InvalidRequest("cannot embed an empty text (0 tokens)")
            if len(t) > limit:
                raise InvalidRequest(f"the input is {len(t)} tokens, more than the context window of "
                                     f"{limit} tokens (num_ctx)")
        with self._lock:
            if self._model is None:
                import openvino as ov

                self._model = ov.Core().compile_model(f"{self.path}/openvino_model.xml", self.device, self.props)
            names = {i.get_any_name() for i in self._model.inputs}
            vectors: list[list[float]] = [[] for _ in toks]
            order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
            for i in range(0, len(order), BATCH):  # right-padded: a causal model's real tokens never see the pads
                part = order[i: i + BATCH]
                width = max(len(toks[j]) for j in part)
                ids = np.zeros((len(part), width), dtype=np.int64)
                mask = np.zeros((len(part), width), dtype=np.int64)
                for row, j in enumerate(part):
                    ids[row, : len(toks[j])] = toks[j]
                    mask[row, : len(toks[j])] = 1
                inputs = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in names:
                    inputs["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
                hidden = np.asarray(self._model(inputs)[0], dtype=np.float64)
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
                for row, j in enumerate(part):
                    vectors[j] = [float(x) for x in pooled[row]]
        return Embeddings(vectors, sum(len(t) for t in toks))
