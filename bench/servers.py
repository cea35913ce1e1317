"""Benchmark targets: a server the bench starts (or finds running), its base URL, the
model name to ask for and the API flavour to speak.

A ``Target`` is data, so a new one (another engine, kiln on another backend) is a
few lines here and nothing anywhere else. Every server runs on a free
loopback port in its own process group, and ``running()`` kills it on the way out,
exception and Ctrl-C included; a module-level ``atexit`` hook is the last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only: the bench never listens on another interface


@dataclass
class Target:
    """One thing to measure. ``argv`` and ``env`` values may contain ``{port}``."""

    name: str  # row label in the report
    model: str  # the "model" field of every request
    api: str = "openai"  # "openai": SSE on /v1/chat/completions; "ollama": NDJSON on /api/chat
    argv: list[str] | None = None  # None: an external server, already running at base_url
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/"  # answers 200 once the server accepts requests
    base_url: str = ""  # for external targets
    settings: str = ""  # how it was configured, printed in the report
    kind: str = ""  # "kiln", "llama-server", "llama-cpp-python", "external": what checks apply


@dataclass(frozen=True)
class Config:
    """What every started server shares, so the comparison is like for like."""

    gguf: Path
    threads: int = 2
    kiln_threads: int | None = None  # KILN_THREADS; None = ``threads``, 0 = kiln's default (adaptive)
    parallel: int = 8  # slots (sequences batched together)
    ctx_per_seq: int = 4096  # the agent pattern needs ~2,200 tokens per sequence
    work_dir: Path = Path.home() / ".cache" / "kiln-bench" / "run"


# -- target factories -----------------------------------------------------------------

def llama_server(cfg: Config, binary: Path) -> Target:
    # An explicit -np without -kvu splits -c evenly: ctx_per_seq cells per slot, the
    # layout kiln uses (kv_unified=False, n_ctx = num_ctx * num_parallel). Prompt
    # caching, continuous batching and the ubatch of 512 are llama-server's defaults.
    argv = [str(binary), "-m", str(cfg.gguf), "--host", HOST, "--port", "{port}",
            "-t", str(cfg.threads), "-tb", str(cfg.threads), "-np", str(cfg.parallel),
            "-c", str(cfg.parallel * cfg.ctx_per_seq), "--no-kv-unified",
            "--alias", "smollm2-135m", "--no-webui"]
    return Target("llama-server", "smollm2-135m", argv=argv, ready_path="/health", kind="llama-server",
                  settings=f"-t {cfg.threads} -np {cfg.parallel} -c {cfg.parallel * cfg.ctx_per_seq} "
                           f"--no-kv-unified (defaults otherwise: cont. batching, cache_prompt)")


def kiln(cfg: Config, *, name: str = "kiln", model: str = "smollm2:135m", parallel: int | None = None,
         max_queue: int | None = None, extra_env: dict[str, str] | None = None) -> Target:
    # A store of its own under the work dir: kiln registers the bundled model there on
    # start, and the user's store and config file are left alone.
    parallel = parallel or cfg.parallel
    threads = cfg.threads if cfg.kiln_threads is None else cfg.kiln_threads
    env = {"KILN_HOST": f"{HOST}:{{port}}", "KILN_MODELS": str(cfg.work_dir / "kiln-models"),
           "KILN_CONFIG": str(cfg.work_dir / "no-config.toml"), "KILN_THREADS": str(threads),
           "KILN_NUM_PARALLEL": str(parallel), "KILN_CONTEXT_LENGTH": str(cfg.ctx_per_seq),
           "KILN_KEEP_ALIVE": "-1", "KILN_LOG_LEVEL": "warning"}
    if max_queue is not None:
        env["KILN_MAX_QUEUE"] = str(max_queue)
    env.update(extra_env or {})
    kiln_bin = Path(sys.executable).parent / "kiln"
    settings = f"KILN_THREADS={threads} KILN_NUM_PARALLEL={parallel} KILN_CONTEXT_LENGTH={cfg.ctx_per_seq}"
    if max_queue is not None:
        settings += f" KILN_MAX_QUEUE={max_queue}"
    return Target(name, model, argv=[str(kiln_bin), "serve"], env=env, ready_path="/", kind="kiln",
                  settings=settings)


OPENVINO_MODEL = "smollm2-ov:135m"


def kiln_openvino(cfg: Config, log_dir: Path) -> Target:
    """kiln serving the same GGUF through OpenVINO GenAI on the CPU: the int4 IR that
    ``kiln compile --profile cpu`` makes of it (its defaults: int4 asymmetric, group
    128), compiled into the bench's store once and reused while the GGUF is the same."""
    store = cfg.work_dir / "kiln-models"
    compile_openvino(cfg.gguf, OPENVINO_MODEL, store, log_dir)
    t = kiln(cfg, name="kiln-openvino", model=OPENVINO_MODEL)
    t.settings += (" (the same variables; OpenVINO GenAI's ContinuousBatchingPipeline on the CPU, "
                   "max_num_seqs = KILN_NUM_PARALLEL) serving `kiln compile --profile cpu` of the "
                   "GGUF: int4 asymmetric, group size 128 (64 where 128 does not divide a layer), "
                   "the embedding int8")
    return t


def compile_openvino(gguf: Path, name: str, store: Path, log_dir: Path) -> None:
    """Runs ``python -m compile`` unless the store already has ``name`` made from this
    very GGUF with the cpu profile's defaults. Needs kiln's compile extra."""
    from backends.store import ModelStore, sha256_file

    st = ModelStore(store)
    if st.exists(name):
        extra = st.get(name).extra
        if (extra.get("source_sha256") == sha256_file(gguf) and extra.get("profile") == "cpu"
                and extra.get("weight_format") == "int4"):
            return
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "compile-openvino.log"
    print(f"compiling {gguf.name} for OpenVINO (a few minutes, once; log {log_path})", flush=True)
    with open(log_path, "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "compile", str(gguf), "--name", name,
                             "--profile", "cpu", "--store", str(store)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f"kiln compile failed ({rc}); is the compile extra installed? "
                           f"log {log_path}:\n{_tail(log_path)}")


def llama_cpp_python(cfg: Config) -> Target:
    # Its default settings on purpose (interrupt_requests=True among them): the point is
    # how the packaged server behaves. Only the thread count (its default is half the
    # cores) and the context are set to match the others.
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(cfg.gguf), "--host", HOST,
            "--port", "{port}", "--n_threads", str(cfg.threads), "--n_threads_batch", str(cfg.threads),
            "--n_ctx", str(cfg.ctx_per_seq), "--model_alias", "smollm2-135m"]
    return Target("llama-cpp-python", "smollm2-135m", argv=argv, ready_path="/v1/models",
                  kind="llama-cpp-python",
                  settings=f"--n_threads {cfg.threads} --n_ctx {cfg.ctx_per_seq} (one sequence; "
                           f"defaults otherwise, interrupt_requests=True)")


def external(spec: str) -> Target:
    """``NAME=URL,MODEL[,API]``: a server someone else started (e.g. kiln on an NPU box)."""
    name, _, rest = spec.partition("=")
    parts = rest.split(",")
    if not name or len(parts) < 2:
        raise ValueError(f"--external wants NAME=URL,MODEL[,API], got {spec!r}")
    api = parts[2] if len(parts) > 2 else "openai"
    return Target(name, parts[1], api=api, base_url=parts[0].rstrip("/"), kind="external",
                  settings=f"external server at {parts[0]}")


# -- processes ----------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    """A free loopback port: the kernel's choice, or the first free one from
    ``KILN_BENCH_PORT`` on (for a machine whose users share out port ranges)."""
    first = int(os.environ.get("KILN_BENCH_PORT") or 0)
    for port in range(first, first + 100) if first else [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port in {first}-{first + 99}")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc): kiln starts its model worker in a
    session of its own, so killing kiln's process group would leave the worker."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM (kiln unloads its workers on it), then SIGKILL whatever is left."""
    if proc.poll() is None:
        descendants = _children(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in descendants:  # by id, only the ones this server started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    _LIVE.discard(proc)


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc, grace=5.0)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class Running:
    url: str
    pid: int | None  # None for an external server

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the server and its children, by role:
        where the work goes (kiln: the gateway and the model worker)."""
        if self.pid is None:
            return {}
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for pid in [self.pid, *_children(self.pid)]:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            role = ("worker" if "backends.worker" in cmd else "gateway" if " serve" in cmd
                    else "llama_cpp.server" if "llama_cpp.server" in cmd
                    else Path(cmd.split(" ", 1)[0]).name or "?")
            # fields[11], [12] = utime, stime (stat fields 14 and 15)
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out


@contextlib.contextmanager
def running(target: Target, log_dir: Path, timeout: float = 300.0) -> Iterator[Running]:
    """Starts the target's server and yields where it listens; the server is gone after."""
    if target.argv is None:
        yield Running(target.base_url, None)
        return
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in target.argv]
    env = {**os.environ, **{k: v.replace("{port}", str(port)) for k, v in target.env.items()}}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{target.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _LIVE.add(proc)
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(proc, url + target.ready_path, timeout, log_path)
        yield Running(url, proc.pid)
    finally:
        stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}; "
                                   f"log {log_path}:\n{_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}")


def build_llama_server(cache: Path) -> Path:
    """Runs bench/build_llama_server.sh (a no-op once built) and returns the binary."""
    script = Path(__file__).with_name("build_llama_server.sh")
    env = {**os.environ, "KILN_BENCH_CACHE": str(cache), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script)], env=env, check=True, stdout=subprocess.PIPE,
                         text=True, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])
