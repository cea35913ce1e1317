"""The two ways a pipeline is driven: continuous batching (CPU, GPU) and the NPU's
static pipeline, each by one thread of its own."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from backends.base import BackendError, FinishReason, InvalidRequest
from backends.openvino.request import Needs, _Request, short_error

log = logging.getLogger("kiln.openvino")


class _Runner:
    """A pipeline and the one thread that drives it."""

    tokenizer: Any
    base_config: Any
    grammar_error: str | None = None  # why this pipeline cannot do structured output
    grammar_init_seconds: float | None = None  # the load-time grammar warm-up (continuous batching)

    def __init__(self) -> None:
        self.engine: Needs | None = None
        self.thread: threading.Thread | None = None
        self.active: dict[str, _Request] = {}

    def start(self, engine: Needs) -> None:
        self.engine = engine
        self.thread = threading.Thread(target=self.loop, name=f"ov-{engine.name}", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        raise NotImplementedError

    def submit(self, st: _Request) -> None:
        raise NotImplementedError

    def cancel(self, req_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        raise NotImplementedError

    def prepare(self, st: _Request, room: int, what: str, ids: list[int] | None = None) -> Any:
        """Tokenizes, caps max_new_tokens to what is left of ``room`` and builds the
        config; None if the request was finished here instead."""
        assert self.engine is not None
        ids = self.engine.prompt_ids(st.req) if ids is None else ids
        st.prompt_tokens = len(ids)
        left = room - len(ids)
        if left <= 0:
            st.fail(f"the prompt is {len(ids)} tokens; {what} holds {room}")
            return None
        asked = st.req.sampling.max_tokens
        if asked is not None and asked <= 0:
            st.finish(FinishReason.LENGTH)
            return None
        st.max_new = left if asked is None else min(asked, left)
        if asked is None or asked > left:
            st.capped_by = f"{what} is full ({room} tokens)"
        try:
            cfg = self.engine.config(st.req, st.max_new)
        except InvalidRequest as e:
            st.fail(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - a bad option fails this request only
            st.fail(f"invalid generation options: {short_error(e)}")
            return None
        return ids, cfg

    def length_detail(self, st: _Request) -> str | None:
        return st.capped_by if st.capped_by and st.generated >= st.max_new else None


class _ContinuousBatching(_Runner):
    def __init__(self, factory: Any, num_ctx: int, seqs: int) -> None:
        super().__init__()
        self.factory = factory  # builds the pipeline again after a failed step
        self.num_ctx, self.seqs, self.next_id = num_ctx, seqs, 0
        self.pipe = self.build()
        self.tokenizer = self.pipe.get_tokenizer()
        self.base_config = self.pipe.get_config()
        self.cv = threading.Condition()
        self.incoming: list[_Request] = []
        self.cancels: set[str] = set()
        self.closed = False
        self.handles: dict[str, Any] = {}
        self.snapshot: dict[str, Any] = {}
        self.broken: str | None = None

    def build(self) -> Any:
        """The pipeline, after one warm-up step: OpenVINO allocates the KV cache at the
        first step, and a device without the memory must fail here, at load, where the
        engine can fall back to the next device."""
        import openvino_genai as g

        pipe = self.factory()
        self.warm_up(pipe, g, None)
        self.kv_cache_bytes = pipe.get_metrics().cache_size_in_bytes
        if self.grammar_error is None:
            # A one-token grammar at load shows that this build compiles grammars at all
            # (else structured output is off, and /api/show says why), and pays xgrammar's
            # first-grammar set-up, its view of the vocabulary, outside the batch: for the
            # bundled model's 49,152 tokens a first grammar's step took 0.10-0.12 s, a
            # second new one 0.04-0.06 s (probed here); the warm-up costs 0.06-0.09 s of load.
            t0 = time.monotonic()
            try:
                self.warm_up(pipe, g, g.StructuredOutputConfig(grammar='root ::= "a"'))
                self.grammar_init_seconds = round(time.monotonic() - t0, 3)
            except Exception as e:  # noqa: BLE001 - the pipeline is poisoned: start afresh
                self.grammar_error = f"a one-rule grammar failed in OpenVINO GenAI ({short_error(e, 200)})"
                log.warning("structured output is off: %s", self.grammar_error)
                del pipe
                pipe = self.factory()
                self.warm_up(pipe, g, None)
        return pipe

    def warm_up(self, pipe: Any, g: Any, structured: Any) -> None:
        cfg = g.GenerationConfig()
        cfg.max_new_tokens, cfg.apply_chat_template = 1, False
        if structured is not None:
            cfg.structured_output_config = structured
        handle = pipe.add_request(self.next_id, "Hello", cfg)  # a dropped handle drops the request
        self.next_id += 1
        while pipe.has_non_finished_requests():
            pipe.step()
        del handle

    def submit(self, st: _Request) -> None:
        with self.cv:
            if self.closed:
                raise BackendError("the model is unloading")
            self.incoming.append(st)
            self.cv.notify()

    def cancel(self, req_id: str) -> None:
        with self.cv:
            self.cancels.add(req_id)
            self.cv.notify()

    def loop(self) -> None:
        import numpy as np
        import openvino as ov

        assert self.engine is not None
        g = self.engine.ov_genai
        while True:
            busy = bool(self.active) or (self.pipe is not None and self.pipe.has_non_finished_requests())
            if not busy:  # what the last step reported is over: nothing is left in the pipeline
                self.snapshot.update(requests=0, scheduled_requests=0)
            with self.cv:
                while not (self.closed or self.incoming or self.cancels or busy):
                    self.cv.wait()
                if self.closed:
                    break
                incoming, self.incoming = self.incoming, []
                cancels, self.cancels = self.cancels, set()
            for st in incoming:
                if self.broken:
                    st.fail(self.broken)
                    continue
                if st.req.id in cancels:
                    st.cancelled = True
                    st.finish(FinishReason.CANCELLED)
                    continue
                prepared = self.prepare(st, self.num_ctx, "the context window (num_ctx)")
                if prepared is None:
                    continue
                ids, cfg = prepared
                try:
                    tensor = ov.Tensor(np.array([ids], dtype=np.int64))
                    self.handles[st.req.id] = self.pipe.add_request(self.next_id, tensor, cfg)
                    self.next_id += 1
                    self.active[st.req.id] = st
                except Exception as e:  # noqa: BLE001
                    st.fail(f"could not start the request: {short_error(e)}")
            for rid in cancels:
                running = self.active.pop(rid, None)
                if running is not None:
                    self.handles.pop(rid).cancel()
                    running.cancelled = True
                    running.finish(FinishReason.CANCELLED)
            if self.pipe is None or (not self.active and not self.pipe.has_non_finished_requests()):
                continue
            try:
                self.pipe.step()
            except Exception as e:  # noqa: BLE001 - the batch failed: tell each request
                log.exception("step() failed")
                for rid, st in list(self.active.items()):
                    self.handles.pop(rid).cancel()
                    st.fail(f"OpenVINO failed: {short_error(e)}")
                self.active.clear()
                self.rebuild()
                continue
            for rid, st in list(self.active.items()):
                self.drain(rid, st, g)
            m = self.pipe.get_metrics()
            self.snapshot = {"requests": m.requests, "scheduled_requests": m.scheduled_requests,
                             "kv_cache_usage": m.cache_usage, "kv_cache_bytes": m.cache_size_in_bytes}
        for rid, st in list(self.active.items()):
            self.handles.pop(rid).cancel()
            st.fail("the model was unloaded")
        self.active.clear()

    def rebuild(self) -> None:
        """A request that fails inside step() stays in the pipeline and fails every
        later step, cancelled or not (an xgrammar error does: backends.grammar.check keeps
        such grammars out), so a failed step costs a fresh pipeline."""
        self.pipe = None  # free the old one first: two may not fit
        try:
            self.pipe = self.build()
            log.warning("rebuilt the pipeline after a failed step")
        except Exception as e:  # noqa: BLE001
            log.exception("could not rebuild the pipeline")
            self.broken = f"the pipeline could not be rebuilt after a failure: {short_error(e)}"

    def drain(self, rid: str, st: _Request, g: Any) -> None:
        h = self.handles[rid]
        finish = None
        while h.can_read():
            for out in h.read().values():
                lps = list(out.generated_log_probs) if st.logprobs is not None else None
                if st.feed(list(out.generated_ids), lps):
                    h.stop()
                    self.end(rid)
                    st.finish(FinishReason.STOP)
                    return
                if out.finish_reason != g.GenerationFinishReason.NONE:
                    finish = out.finish_reason
        status = h.get_status()
        if finish is None and status == g.GenerationStatus.RUNNING:
            return
        self.end(rid)
        if finish == g.GenerationFinishReason.STOP:
            st.finish(FinishReason.STOP)
        elif finish == g.GenerationFinishReason.LENGTH:
            st.finish(FinishReason.LENGTH, self.length_detail(st))
        elif status == g.GenerationStatus.IGNORED:
            # The scheduler dropped it for want of KV blocks: say so, never cut silently.
            st.finish(FinishReason.LENGTH, "the KV cache is full (raise num_ctx or lower num_parallel)")
        elif status in (g.GenerationStatus.CANCEL, g.GenerationStatus.STOP):
            st.finish(FinishReason.CANCELLED)
        else:
            st.finish(FinishReason.LENGTH if st.generated >= st.max_new else FinishReason.STOP,
                      self.length_detail(st))

    def end(self, rid: str) -> None:
        self.active.pop(rid, None)
        self.handles.pop(rid, None)

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.active), "queued": len(self.incoming), **self.snapshot}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)


class _NpuStatic(_Runner):
    def __init__(self, pipe: Any, max_prompt_len: int, min_response_len: int) -> None:
        super().__init__()
        self.pipe = pipe
        self.max_prompt_len, self.min_response_len = max_prompt_len, min_response_len
        self.tokenizer = pipe.get_tokenizer()
        self.base_config = pipe.get_generation_config()
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.waiting: dict[str, _Request] = {}
        self.lock = threading.Lock()

    def submit(self, st: _Request) -> None:
        with self.lock:
            self.waiting[st.req.id] = st
        self.queue.put(st)

    def cancel(self, req_id: str) -> None:
        with self.lock:
            st = self.active.get(req_id) or self.waiting.get(req_id)
            if st is not None:
                st.cancelled = True  # the streamer returns CANCEL at its next token

    def loop(self) -> None:
        while (st := self.queue.get()) is not None:
            with self.lock:
                self.waiting.pop(st.req.id, None)
                if st.cancelled:
                    st.finish(FinishReason.CANCELLED)
                    continue
                self.active[st.req.id] = st
            try:
                self.run(st)
            except Exception as e:  # noqa: BLE001
                log.exception("NPU generate failed")
                st.fail(f"OpenVINO failed: {short_error(e)}")
            finally:
                with self.lock:
                    self.active.pop(st.req.id, None)

    def run(self, st: _Request) -> None:
        import numpy as np
        import openvino as ov

        engine = self.engine
        assert engine is not None
        g = engine.ov_genai
        ids = engine.prompt_ids(st.req)
        if len(ids) > self.max_prompt_len:  # the backstop for a gateway that did not check first
            st.prompt_tokens = len(ids)
            st.fail(engine.too_long(len(ids)))
            return
        capacity = self.max_prompt_len + self.min_response_len
        prepared = self.prepare(st, capacity, "the NPU's KV cache (MAX_PROMPT_LEN + MIN_RESPONSE_LEN)", ids)
        if prepared is None:
            return
        ids, cfg = prepared
        state = {"stop": False}

        class Streamer(g.StreamerBase):  # type: ignore[name-defined]  # g is the module, imported at load
            def write(self, token: Any) -> Any:
                tokens = token if isinstance(token, list) else [token]
                if st.feed([int(t) for t in tokens]):
                    state["stop"] = True
                    return g.StreamingStatus.STOP
                if st.cancelled:
                    return g.StreamingStatus.CANCEL
                return g.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        res = self.pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), cfg, Streamer())
        reasons = list(getattr(res, "finish_reasons", []) or [])
        reason = reasons[0] if reasons else g.GenerationFinishReason.NONE
        if state["stop"]:
            st.finish(FinishReason.STOP)
        elif st.cancelled:
            st.finish(FinishReason.CANCELLED)
        elif reason == g.GenerationFinishReason.STOP:
            st.finish(FinishReason.STOP)
        elif reason == g.GenerationFinishReason.LENGTH or st.generated >= st.max_new:
            st.finish(FinishReason.LENGTH, self.length_detail(st))
        else:
            # NONE without a cancel: the static KV cache ran out (the pipeline says no more).
            st.finish(FinishReason.LENGTH, f"the NPU's KV cache is full ({capacity} tokens)")

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.active), "queued": len(self.waiting)}

    def close(self) -> None:
        with self.lock:
            for st in self.active.values():
                st.cancelled = True
        while True:  # requests still waiting get an answer, not silence
            try:
                waiting = self.queue.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.fail("the model was unloaded")
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(timeout=60)
