"""The run's results as ``latest.json`` (everything), ``latest.md`` (the tables) and
``latest.png`` (aggregate tokens/s and TTFT p95 against concurrency).

The goals are ratios against a baseline measured in the same run (llama-server by
default), because on a shared two-core machine absolute numbers move from run to run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# (key, description, how to read the value)
GOALS = {
    "c1_tok_s": "concurrency 1: tokens/s ≥ 0.95 × baseline",
    "c8_tok_s": "concurrency 8: aggregate tokens/s ≥ 0.9 × baseline",
    "c8_ttft_p95": "concurrency 8: TTFT p95 ≤ 1.2 × baseline",
    "agent_ratio": "agent turn 2 TTFT ≤ 0.05 × turn 1 TTFT",
    "busy_c1_tok_s": "one core busy, concurrency 1: tokens/s ≥ 1.5 × baseline",
    "busy_c8_tok_s": "one core busy, concurrency 8: aggregate tokens/s ≥ 1.0 × baseline",
    "no_errors": "every stream completes (no errors, none cut short)",
}


def _round(t: dict[str, Any], c: int, busy: int = 0) -> dict[str, Any] | None:
    """The round at concurrency ``c`` with ``busy`` cores kept busy by a hog (--busy-cpu)."""
    return next((r for r in t["rounds"] if r["concurrency"] == c and r.get("busy_cores", 0) == busy), None)


def _level(r: dict[str, Any]) -> str:
    return f"{r['concurrency']}" + (f", {r['busy_cores']} core busy" if r.get("busy_cores") else "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(results: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    """One row per (target, goal) for every target but the baseline."""
    base = next((t for t in results["targets"] if t["name"] == baseline), None)
    rows: list[dict[str, Any]] = []
    for t in results["targets"]:
        if t["name"] == baseline:
            continue

        def add(goal: str, value: float | None, limit: float, higher_is_better: bool, shown: str,
                name: str = t["name"]) -> None:
            met = None if value is None else (value >= limit if higher_is_better else value <= limit)
            rows.append({"target": name, "goal": goal, "text": GOALS[goal], "value": value,
                         "limit": limit, "shown": shown, "met": met})

        t1, t8 = _round(t, 1), _round(t, 8)
        b1, b8 = (_round(base, 1), _round(base, 8)) if base else (None, None)
        if t1 and b1:
            r = _ratio(t1["agg_tok_s"], b1["agg_tok_s"])
            add("c1_tok_s", r, 0.95, True, f"{t1['agg_tok_s']:.1f} vs {b1['agg_tok_s']:.1f} tok/s")
        if t8 and b8:
            r = _ratio(t8["agg_tok_s"], b8["agg_tok_s"])
            add("c8_tok_s", r, 0.9, True, f"{t8['agg_tok_s']:.1f} vs {b8['agg_tok_s']:.1f} tok/s")
            r = _ratio(t8["ttft_p95_s"], b8["ttft_p95_s"])
            add("c8_ttft_p95", r, 1.2, False, f"{_s(t8['ttft_p95_s'])} vs {_s(b8['ttft_p95_s'])} s")
        for c, goal, limit in ((1, "busy_c1_tok_s", 1.5), (8, "busy_c8_tok_s", 1.0)):
            tb, bb = _round(t, c, 1), _round(base, c, 1) if base else None
            if tb and bb:
                add(goal, _ratio(tb["agg_tok_s"], bb["agg_tok_s"]), limit, True,
                    f"{tb['agg_tok_s']:.1f} vs {bb['agg_tok_s']:.1f} tok/s")
        agent = t.get("agent") or {}
        if agent.get("sessions"):
            add("agent_ratio", agent.get("ratio"), 0.05, False,
                f"{_s(agent.get('ttft_second_s'))} / {_s(agent.get('ttft_first_s'))} s")
        bad = sum(r["errors"] + r["cut_short"] for r in t["rounds"])
        total = sum(r["requests"] for r in t["rounds"])
        add("no_errors", float(bad), 0.0, False, f"{bad} of {total} streams failed or cut short")
    return rows


def _kiln_threads(meta: dict[str, Any]) -> str:
    n = meta.get("kiln_threads")
    busy = meta.get("busy_cpu")
    out = "" if n is None else f" (kiln: {'its default, adaptive' if n == 0 else n})"
    if busy is not None:
        out += f"; every round also measured beside a busy loop pinned to CPU {busy} (`taskset -c {busy}`)"
    return out


def _s(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _met(m: bool | None) -> str:
    return "n/a" if m is None else ("**yes**" if m else "no")


def agent_summary(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the sessions (each has its own nonce, so each first turn is cold)."""
    def med(key: str) -> float | None:
        vals = [s[key] for s in sessions if s.get(key) is not None]
        return statistics.median(vals) if vals else None
    return {"sessions": sessions, "ttft_first_s": med("ttft_first_s"),
            "ttft_second_s": med("ttft_second_s"), "ratio": med("ratio"),
            "prompt_tokens_first": med("prompt_tokens_first"),
            "prompt_tokens_second": med("prompt_tokens_second")}


def merge(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's repeats as one. Per concurrency, the BEST of the repeats: the
    highest tokens/s and the lowest TTFT percentiles. Load from other work on a shared
    machine only ever slows a server down, by up to 30x here, so the least disturbed
    repeat is the closest to what the server can do (a median of two noisy repeats
    was not). Counts are summed; every repeat's values stay in ``each``; the agent
    sessions of every repeat are pooled (their ratio compares a server with itself)."""
    if len(reps) == 1:
        return reps[0]
    out = {k: v for k, v in reps[0].items() if k not in ("rounds", "agent")}
    out["rounds"] = []
    for i, first in enumerate(reps[0]["rounds"]):
        rs = [r["rounds"][i] for r in reps]

        def best(key: str, pick: Any, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r[key] for r in rs if r[key] is not None]
            return pick(vals) if vals else None
        merged = {**first, "repeats": len(rs), "agg_tok_s": best("agg_tok_s", max),
                  "ttft_p50_s": best("ttft_p50_s", min), "ttft_p95_s": best("ttft_p95_s", min),
                  "mean_completion_tokens": best("mean_completion_tokens", statistics.mean),
                  "each": [{k: r.get(k) for k in ("agg_tok_s", "ttft_p50_s", "ttft_p95_s", "loadavg_before",
                                                  "completed", "cut_short", "errors")} for r in rs]}
        for key in ("requests", "tokens", "completed", "cut_short", "rejected", "errors", "stopped_early",
                    "ttft_n"):
            merged[key] = sum(r.get(key, 0) for r in rs)
        merged["wall_s"] = sum(r["wall_s"] for r in rs)
        merged["cpu_s"] = {}
        for r in rs:
            for role, sec in (r.get("cpu_s") or {}).items():
                merged["cpu_s"][role] = round(merged["cpu_s"].get(role, 0.0) + sec, 2)
        out["rounds"].append(merged)
    out["agent"] = agent_summary([s for r in reps for s in (r.get("agent") or {}).get("sessions", [])])
    out["loadavg_after"] = reps[-1]["loadavg_after"]
    out["warmup_errors"] = [e for r in reps for e in r.get("warmup_errors", [])]
    return out


def markdown(results: dict[str, Any], full: bool = True) -> str:
    """The report; ``full=False`` (the README's copy) leaves out the settings, the CPU
    table and the notes, which latest.md keeps."""
    meta = results["meta"]
    out = ["# kiln bench: latest run\n",
           f"* date: {meta['date']}",
           f"* command: `{meta['command']}`",
           f"* machine: {meta['machine']}",
           f"* load average (1 min) before the run: {meta['loadavg_start']}",
           f"* model: {meta['model']}",
           f"* threads: {meta['threads']}{_kiln_threads(meta)}; {meta['max_tokens']}-token completions, streaming "
           f"(`stream: true`), sampling {meta['sampling']}",
           f"* llama.cpp: {meta['llama_cpp']}",
           f"* repeats: {meta.get('repeats', 1)} (the rounds of the targets interleaved; the tables "
           f"show the best repeat of each number, the JSON every repeat)", ""]
    if full:
        out += ["Settings per target:", ""]
        for t in results["targets"]:
            out.append(f"* **{t['name']}** ({t['api']} API, model `{t['model']}`): {t['settings']}")
        out.append("")
    out += ["## Throughput and latency", "",
            "Aggregate tok/s = completion tokens of every stream / wall time of the round; "
            "each of *c* clients sends requests back to back. TTFT = time to the first non-empty "
            "content delta, over the streams that delivered one (\"(of n)\" when some did not). "
            "*tokens/req* = mean completion tokens of completed streams "
            "(below the budget when the model ended at its end-of-generation token).", "",
            "| target | concurrency | requests | agg tok/s | (each repeat) | TTFT p50 (s) | TTFT p95 (s) "
            "| tokens/req | completed | cut short | errors |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for t in results["targets"]:
        for r in t["rounds"]:
            mean = r["mean_completion_tokens"]
            n = r.get("ttft_n")  # percentiles of fewer streams than were sent: say so
            few = f" (of {n})" if n is not None and n < r["requests"] else ""
            each = " / ".join(f"{e['agg_tok_s']:.0f}" for e in r.get("each", []))
            out.append(f"| {t['name']} | {_level(r)} | {r['requests']} | {r['agg_tok_s']:.1f} | {each} "
                       f"| {_s(r['ttft_p50_s'])}{few} | {_s(r['ttft_p95_s'])}{few} | "
                       f"{'–' if mean is None else f'{mean:.1f}'} | {r['completed']} | {r['cut_short']} "
                       f"| {r['errors'] + r['rejected']} |")
    out += [] if not full else ["", "CPU time of each server's processes during the rounds, per 1,000 generated tokens "
            "(the machine has " + str(meta.get("cores", "?")) + " cores; the rest of the wall time "
            "went to other work on the machine or to waiting):", "",
            "| target | concurrency | CPU s / 1k tokens, by process | wall s / 1k tokens |", "|---|--:|---|--:|"]
    for t in results["targets"] if full else []:
        for r in t["rounds"]:
            if not r.get("cpu_s") or not r["tokens"]:
                continue
            per_k = ", ".join(f"{role} {sec * 1000 / r['tokens']:.2f}" for role, sec in sorted(r["cpu_s"].items()))
            out.append(f"| {t['name']} | {_level(r)} | {per_k} | {r['wall_s'] * 1000 / r['tokens']:.2f} |")
    out += ["", "## Two-turn agent pattern", "",
            f"A ~2,000-token system prompt (tool descriptions, a fresh nonce at its start so turn 1 "
            f"is cold), then turn 2 = the same prompt + the first exchange + a new question. "
            f"Median of {meta['agent_sessions'] * meta.get('repeats', 1)} sessions.", "",
            "| target | prompt tokens (turn 1 / 2) | TTFT turn 1 (s) | TTFT turn 2 (s) | turn 2 / turn 1 |",
            "|---|--:|--:|--:|--:|"]
    for t in results["targets"]:
        a = t.get("agent") or {}
        if not a.get("sessions"):
            continue
        p1, p2 = a.get("prompt_tokens_first"), a.get("prompt_tokens_second")
        toks = "–" if p1 is None else f"{p1:.0f} / {p2:.0f}" if p2 is not None else f"{p1:.0f} / –"
        out.append(f"| {t['name']} | {toks} | {_s(a.get('ttft_first_s'))} | {_s(a.get('ttft_second_s'))} "
                   f"| {_s(a.get('ratio'))} |")
    out += ["", f"## Goals (ratios against {meta['baseline']}, same run)", "",
            "| target | goal | measured | ratio / value | met |", "|---|---|---|--:|---|"]
    for g in results["goals"]:
        value = f"{g['value']:.0f}" if g["goal"] == "no_errors" else _s(g["value"])
        out.append(f"| {g['target']} | {g['text']} | {g['shown']} | {value} | {_met(g['met'])} |")
    ov = results.get("overflow")
    if ov:
        out += ["", "## Queue overflow (kiln)", "",
                f"kiln restarted with {ov['settings']}; {ov['bursts'][0]['clients']} simultaneous "
                "greedy requests with distinct prompts, per dialect. Admitted outputs are compared "
                "with the same prompt run alone first: *identical* counts exact matches (batched "
                "logits may drift), *crossed* would be an output closer to another request's.", "",
                "| dialect | expected 503 | got 503 | with Retry-After | error shape ok | admitted | "
                "finished ok, own text | identical to solo | other errors | met |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for b in ov["bursts"]:
            out.append(f"| {b['api']} | {b['expected_503']} | {b['got_503']} | {b['503_retry_after']} | "
                       f"{b['503_shape_ok']} | {b['admitted']} | {b['admitted_ok']} | "
                       f"{b['identical_to_reference']} | {b['other_errors']} | {_met(b['met'])} |")
        sample = next((b["503_body_sample"] for b in ov["bursts"] if b["503_body_sample"]), None)
        if sample:
            out += ["", f"503 body ({ov['bursts'][0]['api']}): `{json.dumps(sample)}`"]
    notes = results.get("notes") or []
    if notes and full:
        out += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for t in results["targets"]:
        for busy in sorted({r.get("busy_cores", 0) for r in t["rounds"]}):
            rounds = [r for r in t["rounds"] if r.get("busy_cores", 0) == busy]
            label = t["name"] + (f" ({busy} core busy)" if busy else "")
            style = "--" if busy else "-"
            ax1.plot([r["concurrency"] for r in rounds], [r["agg_tok_s"] for r in rounds], style, marker="o",
                     label=label)
            timed = [r for r in rounds if r["ttft_p95_s"] is not None]
            if timed:
                ax2.plot([r["concurrency"] for r in timed], [r["ttft_p95_s"] for r in timed], style, marker="o",
                         label=label)
    meta = results["meta"]
    ax1.set(title="aggregate tokens/s", xlabel="concurrent streams", ylabel="tokens/s")
    ax2.set(title="TTFT p95", xlabel="concurrent streams", ylabel="seconds", yscale="log")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["concurrency"] for t in results["targets"] for r in t["rounds"]}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['model_name']}, {meta['threads']} threads, {meta['max_tokens']}-token "
                 f"completions ({meta['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "latest.json", "md": out_dir / "latest.md", "png": out_dir / "latest.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(results))
    try:
        plot(results, paths["png"])
    except ModuleNotFoundError as e:  # matplotlib is not among kiln's own dependencies
        print(f"no plot ({e}): pip install matplotlib for {paths['png'].name}")
        del paths["png"]
    return paths


def notes(results: dict[str, Any]) -> list[str]:
    """Facts a reader needs to read the tables right, derived from this run."""
    notes = []
    for t in results["targets"]:
        sources = sorted({s for r in t["rounds"] for s in r["token_source"]})
        if sources == ["chunks"]:
            notes.append(f"{t['name']} reports no usage when streaming: its tokens are counted as "
                         f"content deltas.")
        early = sum(r["stopped_early"] for r in t["rounds"])
        if early:
            notes.append(f"{t['name']}: {early} stream(s) ended at the end-of-generation token "
                         f"before the token budget (counted with the tokens they generated).")
        if t.get("warmup_errors"):
            notes.append(f"{t['name']}: warm-up errors: {t['warmup_errors'][:3]}")
        cut = sum(r["cut_short"] for r in t["rounds"])
        if cut:
            total = sum(r["requests"] for r in t["rounds"])
            notes.append(f"{t['name']}: {cut} of {total} streams were cut short (ended with [DONE] "
                         f"and no finish_reason); its TTFT percentiles cover only the streams that "
                         f"delivered a token, and its tokens/s counts the few tokens cut-short "
                         f"streams got: neither compares with the other targets.")
        notes.append(f"{t['name']}: load average {t['loadavg_before']} before, {t['loadavg_after']} after.")
    return notes


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(readme: Path, results: dict[str, Any]) -> bool:
    """Replaces the text between the bench markers of the README with the latest tables
    (headings demoted one level); a README without the markers is left alone."""
    try:
        text = readme.read_text()
    except OSError:
        return False
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    body = markdown(results, full=False).split("\n", 2)[2]  # without the title line
    body = body.replace("\n## ", "\n#### ")
    new = text[: start + len(README_START)] + "\n" + body.strip() + "\n" + text[end:]
    readme.write_text(new)
    return True


if __name__ == "__main__":
    # Re-renders latest.md, latest.png and the README table from a results JSON
    # (after a change to this module), without measuring again:
    #   python -m bench.report [bench/results/latest.json]
    import sys

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results") / "latest.json"
    res = json.loads(src.read_text())
    res["goals"] = evaluate(res, res["meta"]["baseline"])
    res["notes"] = notes(res)
    write(res, src.parent)
    update_readme(Path(__file__).resolve().parent.parent / "README.md", res)
    print(f"re-rendered {src.parent}/latest.{{md,json,png}} and the README table")
