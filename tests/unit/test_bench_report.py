"""bench/report.py: how repeats are merged and goals judged (pure data, no servers)."""

from __future__ import annotations

from bench.report import agent_summary, evaluate, merge


def _round(c: int, tok_s: float, p95: float, errors: int = 0, cut: int = 0) -> dict:
    return {"concurrency": c, "requests": 8, "tokens": 512, "completed": 8 - errors - cut,
            "cut_short": cut, "rejected": 0, "errors": errors, "stopped_early": 0, "ttft_n": 8,
            "agg_tok_s": tok_s, "ttft_p50_s": p95 / 2, "ttft_p95_s": p95,
            "mean_completion_tokens": 64.0, "wall_s": 512 / tok_s, "cpu_s": {"worker": 4.0}}


def _rep(name: str, rounds: list[dict], first: float = 7.0, second: float = 0.2) -> dict:
    session = {"ttft_first_s": first, "ttft_second_s": second, "ratio": second / first,
               "prompt_tokens_first": 2048, "prompt_tokens_second": 2138}
    return {"name": name, "rounds": rounds, "agent": agent_summary([session]), "loadavg_after": 1.0}


def test_merge_keeps_the_best_repeat_and_every_value():
    quiet = _rep("kiln", [_round(1, 110.0, 0.10), _round(8, 150.0, 0.9)])
    noisy = _rep("kiln", [_round(1, 46.0, 0.30), _round(8, 180.0, 0.7)])
    m = merge([quiet, noisy])
    r1, r8 = m["rounds"]
    assert (r1["agg_tok_s"], r1["ttft_p95_s"]) == (110.0, 0.10)  # each number's best repeat
    assert (r8["agg_tok_s"], r8["ttft_p95_s"]) == (180.0, 0.7)
    assert [e["agg_tok_s"] for e in r1["each"]] == [110.0, 46.0]
    assert r1["requests"] == 16 and r1["cpu_s"] == {"worker": 8.0}  # counts add up
    assert len(m["agent"]["sessions"]) == 2  # sessions pooled


def test_goals_are_ratios_against_the_baseline():
    base = _rep("llama-server", [_round(1, 120.0, 0.1), _round(8, 160.0, 0.84)])
    kiln = _rep("kiln", [_round(1, 112.0, 0.1), _round(8, 185.0, 0.75, cut=1)], first=7.2, second=0.23)
    rows = {r["goal"]: r for r in evaluate({"targets": [base, kiln]}, "llama-server")}
    assert {r["target"] for r in rows.values()} == {"kiln"}
    assert rows["c1_tok_s"]["met"] is False and round(rows["c1_tok_s"]["value"], 3) == 0.933
    assert rows["c8_tok_s"]["met"] is True
    assert rows["c8_ttft_p95"]["met"] is True and round(rows["c8_ttft_p95"]["value"], 3) == 0.893
    assert rows["agent_ratio"]["met"] is True
    assert rows["no_errors"]["met"] is False and rows["no_errors"]["value"] == 1.0
