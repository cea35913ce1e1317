"""What the bench sends: deterministic prompts, so every target gets the same work.

* Throughput prompts ask for long answers (an essay on a topic) so a 64-token budget
  is used up: the model could stop at its end-of-generation token, and a request that
  stops early would flatter tokens/s. The bench still counts the tokens really
  generated and reports the mean completion length. Each is unique to its round.
* The agent system prompt is ~2,000 tokens of tool descriptions, built from fixed word
  lists (no randomness), with a run nonce at its very START so no server can have it
  cached from an earlier run: a prefix cache matches from the first token on.
* The overflow prompts are distinct and steer greedy decoding to distinct texts, so
  one request's output can be told apart from another's.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, str]

TOPICS = [
    "the history of the printing press", "how volcanoes form", "the life cycle of stars",
    "the invention of the telephone", "why the sea is salty", "how bees make honey",
    "the building of the pyramids", "how vaccines train the immune system",
    "the migration of monarch butterflies", "how a steam engine works",
    "the history of chess", "how rainbows appear", "the discovery of penicillin",
    "how glaciers shape valleys", "the first voyage around the world", "how bridges carry loads",
]

# 12 tools = 2,014 tokens with SmolLM2's tokenizer (~165 per tool); the report
# prints the prompt size each server counted.
AGENT_TOOLS = 12

_VERBS = ["search", "fetch", "create", "update", "delete", "list", "summarize", "translate",
          "schedule", "convert", "validate", "compare", "archive", "restore", "notify"]
_NOUNS = ["document", "calendar_event", "invoice", "customer", "ticket", "file", "email",
          "report", "task", "contact", "order", "note", "image", "dataset", "repository"]
_FIELDS = [("query", "string", "free text to look for"),
           ("limit", "integer", "the largest number of results to return"),
           ("since", "string", "an ISO 8601 date; only items changed after it"),
           ("owner", "string", "the user id that owns the item"),
           ("tags", "array", "labels that every returned item must carry"),
           ("dry_run", "boolean", "report what would change without changing anything"),
           ("format", "string", "one of 'json', 'markdown' or 'plain'"),
           ("priority", "integer", "1 (highest) to 5 (lowest)")]


def _tool(i: int) -> dict[str, Any]:
    verb, noun = _VERBS[i % len(_VERBS)], _NOUNS[(i * 7) % len(_NOUNS)]
    fields = [_FIELDS[(i + k) % len(_FIELDS)] for k in range(3 + i % 3)]
    return {
        "name": f"{verb}_{noun}",
        "description": (f"Use this tool to {verb.replace('_', ' ')} a {noun.replace('_', ' ')} in the "
                        f"workspace. It returns a JSON object with the {noun.replace('_', ' ')} and a "
                        f"status field; call it again with the returned cursor to page through results."),
        "parameters": {"type": "object",
                       "properties": {n: {"type": t, "description": d} for n, t, d in fields},
                       "required": [fields[0][0]]},
    }


def agent_system_prompt(nonce: str, n_tools: int = AGENT_TOOLS) -> str:
    """The shared system prompt of the two-turn agent pattern; ``nonce`` comes first."""
    tools = "\n".join(json.dumps(_tool(i), separators=(", ", ": ")) for i in range(n_tools))
    return (f"Session {nonce}. You are a careful assistant working for a small company. You can "
            f"call the tools below by answering with a JSON object {{\"tool\": NAME, \"arguments\": "
            f"{{...}}}}. Answer in plain prose when no tool is needed.\n\n# Tools\n{tools}\n\n"
            f"Think about which tool fits before you answer. Never invent tool names.")


AGENT_TURN_1 = "Which tools would you use to find last week's unpaid invoices? Explain briefly."
AGENT_TURN_2 = "Now write the call for the first of those tools, with realistic arguments."


def essay_messages(i: int, tag: str) -> list[Message]:
    """A request that invites a long answer; ``i`` picks the topic. ``tag`` (unique per
    round) opens the user message: every request of a run is new to every server, past
    the chat template's shared system prefix. Without it, llama-server's host-RAM prompt
    cache found the same prompts from the earlier rounds and skipped their prefill,
    which measured its cache, not its serving of new requests (the agent pattern
    measures prefix reuse, on purpose)."""
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"[{tag}-{i}] Write a long, detailed essay about {topic}. Use "
                                        f"several paragraphs and do not stop early."}]


def overflow_messages(i: int) -> list[Message]:
    """Distinct prompts for the queue-overflow check (greedy: each has one right answer)."""
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Request number {i}. Tell me about {topic}."}]
