"""OpenVINO GenAI engine: continuous batching on CPU/GPU, the static pipeline on the NPU.

One engine per loaded model, inside its worker process (``backends.worker``):
``engine.py`` (device choice and fallback, loading, the ``Engine`` protocol),
``runners.py`` (the pipeline-driving threads), ``request.py`` (one request's state).

* CPU and GPU run a ``ContinuousBatchingPipeline`` driven by one stepping thread:
  ``add_request`` per request, ``step()`` while there is work, each handle read only
  when ``can_read()`` (``read()`` blocks, and ``step()`` holds the GIL for a whole step).
  Token ids are decoded here, incrementally, so that stop strings, counts and UTF-8
  boundaries are handled the same way on every device.
* The NPU runs the stateful ``LLMPipeline(path, "NPU")``: static shapes, batch 1, so
  requests queue FIFO in one thread and stream through a ``StreamerBase``.

Devices are tried in order (``spec.devices``, default NPU, GPU, CPU). A device that
cannot take the model, or fails to compile or load it, is recorded in
``info()["fallbacks"]`` with its reason and the next one is tried.

``spec.path`` is an OpenVINO IR directory (``openvino_model.xml`` plus
``openvino_tokenizer.xml``/``openvino_detokenizer.xml``, as ``kiln compile`` writes
it) or a ``.gguf`` file (llama, qwen2 or qwen3 with a BPE tokenizer; not on the NPU).
``spec.num_parallel`` is the batch's ``max_num_seqs``; ``spec.num_ctx`` is the
context of each sequence, and the KV cache is sized to hold ``num_parallel`` full
contexts and allocated at load by a warm-up step (so a device without the memory fails
at load and falls through, rather than at the tenth request). ``spec.cache_dir`` is
OpenVINO's ``CACHE_DIR``.

Sampling: temperature (greedy at 0), top_p, top_k, min_p, the repetition, presence and
frequency penalties and the seed map to a ``GenerationConfig`` per request;
``typical_p`` and ``repeat_last_n`` have no OpenVINO counterpart and are ignored.
Stop strings are matched here, on the decoded text, so none is ever returned.

``spec.extra`` keys (all optional):

``max_prompt_len`` (int, 1024), ``min_response_len`` (int, 128)
    The NPU's static shapes (``MAX_PROMPT_LEN``/``MIN_RESPONSE_LEN``). The NPU's KV
    cache holds their sum; a longer prompt is refused (``check_prompt``).
``prefill_chunk_size`` (int)
    The NPU's chunked prefill (``PREFILL_HINT=DYNAMIC``, ``NPUW_LLM_PREFILL_CHUNK_SIZE``):
    a long prompt goes through the static prefill model this many tokens at a time; 0
    is one static prefill of ``MAX_PROMPT_LEN`` (``STATIC``); unset, OpenVINO's default.
``npuw_devices`` (str)
    ``NPUW_DEVICES``: where OpenVINO's NPU wrapper runs its partitions. ``"CPU"``
    runs the whole NPU pipeline on the CPU (tests, machines without an NPU).
``npuw_online_pipeline`` (str)
    ``NPUW_ONLINE_PIPELINE`` (OpenVINO's default, ``REG``, when unset).
``task`` (str), ``pooling`` (str), ``normalize`` (bool), ``max_length`` (int)
    ``task: "embedding"``: an embedding model (``kiln compile --task embedding``), run by
    ``TextEmbeddingPipeline`` with the model's own pooling and normalisation, inputs up to
    ``max_length`` tokens (``embedding.py``); no generation pipeline is loaded.
``npu_blob`` (str), ``npu_blob_config`` (dict)
    The NPU model compiled ahead of time by ``kiln compile --profile npu`` (a path
    relative to the IR directory, imported with ``WEIGHTS_PATH``), and the settings it
    was compiled with (``max_prompt_len``, ``min_response_len``, ``prefill_chunk_size``, ``npuw_devices``). A
    blob whose settings differ from the ones in force, or that fails to import (say,
    after an OpenVINO upgrade), is skipped and the model is compiled afresh.
``source`` (str)
    Where the model came from; named in the recompile hint of an over-long prompt.
``ov_properties`` (dict), ``device_properties`` (dict of device -> dict)
    Extra OpenVINO properties for every device, or for one.
``max_num_batched_tokens`` (int, ``max(spec.num_batch, 256)``), ``enable_prefix_caching``
    (bool, true): the batch's ``SchedulerConfig``.
``kv_block_size`` (int; 32 on CPU, 16 elsewhere): tokens per KV block, for sizing.
``kv_cache_type`` (``f16``, ``q8_0``, ``q4_0``): the CPU's ``KV_CACHE_PRECISION`` (f16, u8, u4);
    unset, the CPU plugin's default (u8).
"""

from backends.openvino.engine import OpenVINOEngine
from backends.openvino.request import DEFAULT_DEVICES, DEFAULT_MAX_PROMPT_LEN, DEFAULT_MIN_RESPONSE_LEN

__all__ = ["DEFAULT_DEVICES", "DEFAULT_MAX_PROMPT_LEN", "DEFAULT_MIN_RESPONSE_LEN", "OpenVINOEngine"]
