"""The official ``anthropic`` SDK against a real ``kiln serve`` on the bundled SmolLM2-135M,
driven as Claude Code and other Anthropic-SDK agents drive a server that
``ANTHROPIC_BASE_URL`` points at. Generations are bounded; nothing asserts a timing."""

from __future__ import annotations

import anthropic
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
# The 2.x SDK has no sampling arguments; older SDKs and Claude Code send temperature.
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather of a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", timeout=300, max_retries=0)


def test_messages_create(client):
    msg = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY,
                                 system="You are a helpful assistant.",
                                 messages=[{"role": "user", "content": "Say hello."}])
    assert msg.role == "assistant" and msg.type == "message" and msg.model == MODEL
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 0 < msg.usage.output_tokens <= 16 and msg.usage.input_tokens > 0


def test_messages_stream_matches_create(client):
    kw = dict(model=MODEL, max_tokens=20, extra_body=GREEDY, messages=[{"role": "user", "content": "Count to five."}])
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text  # greedy: the same answer
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens == client.messages.count_tokens(
        model=MODEL, messages=kw["messages"]).input_tokens


def test_stop_sequence(client):
    msg = client.messages.create(model=MODEL, max_tokens=40, extra_body=GREEDY, stop_sequences=["3"],
                                 messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "3", msg
    assert "3" not in msg.content[0].text


def test_tool_round_trip(client):
    """A forced tool_use, its tool_result sent back, and an answer in text."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model=MODEL, max_tokens=64, extra_body=GREEDY, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=ask)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)
    second = client.messages.create(
        model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
        messages=[*ask, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "Sunny, 21 degrees Celsius."}]}])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.content and second.usage.input_tokens > first.usage.input_tokens


def _claude_code_tools() -> list[dict]:
    names = ["Task", "Bash", "Glob", "Grep", "LS", "ExitPlanMode", "Read", "Edit", "MultiEdit", "Write",
             "NotebookRead", "NotebookEdit", "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillBash",
             "SlashCommand", "Skill", "AskUserQuestion"]
    return [{"name": n, "description": f"{n}: a tool of the coding agent. Use it when the task needs {n.lower()}.",
             "input_schema": {"type": "object", "properties": {"arg": {"type": "string", "description": "input"}},
                              "required": ["arg"], "additionalProperties": False,
                              "$schema": "http://json-schema.org/draft-07/schema#"}} for n in names]


def test_claude_code_style_request(client):
    """What Claude Code sends: system text blocks with cache_control, 20 tools, metadata,
    a beta header, streaming (its max_tokens of 32000 is bounded here)."""
    system = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
              {"type": "text", "text": "You are an interactive CLI tool that helps users with software engineering "
                                       "tasks. Be concise.", "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>This is a reminder.</system-reminder>"},
        {"type": "text", "text": "Say hi in one word.", "cache_control": {"type": "ephemeral"}}]}]
    with client.messages.stream(model=MODEL, max_tokens=64, system=system, messages=messages,
                                tools=_claude_code_tools(), extra_body={"temperature": 1},
                                metadata={"user_id": "user_abc_account__session_1"},
                                extra_headers={"anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming-2025-05-14"}
                                ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.content and final.usage.input_tokens > 500  # system prompt and 20 tool definitions
