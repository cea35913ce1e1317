"""The shape of Open WebUI 0.12's first chat request at default settings, built here.

Open WebUI 0.12.4 with native function calling (its default) sends, with the user's
first message, its 36 built-in tools: ``{"model", "messages": [one user message],
"stream": true, "tools": [36 OpenAI-style function tools]}`` on its Ollama connection
(no ``options``: nothing about the context), the same on its OpenAI connection. The
tools are JSON-schema'd from its Python signatures: ``{"type": "object", "properties":
{...}}`` with ``default`` on optional parameters and ``required`` only when some are.
Captured from a real Open WebUI 0.12.4 (tests/e2e/test_open_webui.py shows the same
names arriving): 24.8 kB of JSON, 7,013 prompt tokens with the bundled model.

The names, parameter names, types, defaults and ``required`` lists below are those of
Open WebUI's tools; the descriptions are kiln's own words of about the same length.
"""

from __future__ import annotations

from typing import Any

# name: (description, {param: spec}) where spec is "type", "type=default" or "type!"
# (required), with an optional " | description".
_S, _I, _B, _A = "string", "integer", "boolean", "array"

TOOLS: dict[str, tuple[str, dict[str, str]]] = {
    "get_current_timestamp": ("Return the present moment as a Unix timestamp in seconds, with the same moment in ISO 8601.", {}),
    "calculate_timestamp": (
        "Return the present Unix timestamp, and the one a given number of days, weeks, months or years "
        "earlier. Handy for date filters in the search tools. For instance: \"a fortnight ago\" is weeks_ago=2, "
        "\"yesterday\" is days_ago=1, \"last year\" is years_ago=1.",
        {"days_ago": "integer=0 | How many days to go back from now (0 unless given)",
         "weeks_ago": "integer=0 | How many weeks to go back from now (0 unless given)",
         "months_ago": "integer=0 | How many months to go back from now (0 unless given)",
         "years_ago": "integer=0 | How many years to go back from now (0 unless given)"}),
    "ask_user": (
        "Put one to three clarifying questions to the user before going on. Use it when the next step "
        "hinges on what the user wants, prefers, or on a trade-off you cannot safely guess.",
        {"questions": "array! | Between one and three question objects, each with an id, a header, the question "
                      "and two or three options, every option with a label and a description. Put the option you "
                      "would pick first: the interface marks the first option as the recommended one.",
         "allow_other": "boolean=true | Whether the user may type an answer of their own instead of an option",
         "timeout_ms": "integer=120000 | How long the browser keeps the question open before giving up"}),
    "list_knowledge_bases": (
        "List the knowledge bases the user can read, with each one's id, name, description and file count. "
        "Start here when the user refers to their documents without naming a file, then search or read the "
        "files of the knowledge base that fits.",
        {"count": "integer=10 | How many knowledge bases to return", "skip": "integer=0 | How many to skip (paging)"}),
    "search_knowledge_bases": (
        "Find knowledge bases whose name or description matches a query; returns ids to use with the file "
        "tools. Prefer it to list_knowledge_bases when the user has many.",
        {"query": "string! | Words to look for in knowledge base names and descriptions",
         "count": "integer=5 | How many matches to return", "skip": "integer=0 | How many to skip (paging)"}),
    "query_knowledge_bases": (
        "Search inside every knowledge base the user can read by meaning, and return the passages closest to "
        "the query together with the file and knowledge base they come from. Quote what you use and name the "
        "file it came from.",
        {"query": "string! | What to look for, in natural language",
         "count": "integer=5 | How many passages to return"}),
    "grep_knowledge_files": (
        "Search the text of knowledge files for a regular expression, the way grep does, and return the "
        "matching lines with their file and line number. Use it for exact names, identifiers, error codes or "
        "phrases, where a search by meaning would blur them. Narrow it to one file with file_id; with count_only "
        "it returns how many lines match in each file instead of the lines themselves.",
        {"pattern": "string! | The regular expression to look for (Python syntax)",
         "file_id": "string | Only search this file; every file the user can read when left out",
         "case_insensitive": "boolean=false | Ignore upper and lower case when matching",
         "count_only": "boolean=false | Return the number of matching lines per file, not the lines"}),
    "search_knowledge_files": (
        "Find files by name across the user's knowledge bases, or in one of them with knowledge_id; returns "
        "each file's id, name, size and the knowledge base holding it.",
        {"query": "string! | Words to look for in file names, or part of a name",
         "knowledge_id": "string | Only look in this knowledge base (an id from list_knowledge_bases)",
         "count": "integer=5 | How many files to return", "skip": "integer=0 | How many to skip (paging)"}),
    "query_knowledge_files": (
        "Search the contents of knowledge files by meaning and return the passages that best answer the "
        "query, each with its source file. Give knowledge_ids to search only some knowledge bases.",
        {"query": "string! | What to look for, in natural language",
         "knowledge_ids": "array | Knowledge base ids to limit the search to; every readable one when left out",
         "count": "integer=5 | How many passages to return"}),
    "view_knowledge_file": (
        "Read a knowledge file's text, whole or a part of it, by characters or by lines.",
        {"file_id": "string! | The id of the file to read, from search_knowledge_files or a search result",
         "offset": "integer=0 | The character to start reading at, to page through a long file",
         "max_chars": "integer=10000 | The most characters to return in one call",
         "line_numbers": "boolean=false | Put each line's number before it, to quote lines precisely",
         "start_line": "integer | The first line to return, counting from 1 (instead of offset)",
         "end_line": "integer | The last line to return, inclusive"}),
    "search_chats": (
        "Search the user's earlier conversations by title and content, when the user refers to something "
        "discussed before, and return the matching chats with "
        "their ids, titles, dates and a snippet of the matching text. Give timestamps (from "
        "calculate_timestamp) to limit the search to a period.",
        {"query": "string! | Words to look for in the chats' titles and messages",
         "count": "integer=5 | How many chats to return, best matches first",
         "start_timestamp": "integer | Only chats updated after this Unix time",
         "end_timestamp": "integer | Only chats updated before this Unix time"}),
    "view_chat": ("Read one of the user's earlier conversations in full, message by message, by its id (from search_chats).",
                  {"chat_id": "string! | The id of the chat to read"}),
    "search_memories": (
        "Find memories kept about the user by their text or path. Look here before answering a question that "
        "may depend on what the user told you in an earlier conversation, and before adding a memory that may "
        "already exist.",
        {"query": "string= | Words to look for (empty lists the most recent)",
         "count": "integer=5 | How many memories to return",
         "type": "string=all | Which kind of memory: user, agent or all",
         "path": "string | Only memories under this path", "memory_id": "string | Only this memory"}),
    "list_memory_paths": (
        "List the paths the user's memories are filed under, with how many each holds, to see how they are "
        "organised before reading or filing one.",
        {"query": "string= | Words the paths must contain", "count": "integer=100 | How many paths to return",
         "type": "string=all | Which kind of memory: user, agent or all"}),
    "read_memory_path": (
        "Read every memory filed under a path, in order, with each one's id, type and date.",
        {"path": "string! | The path to read", "count": "integer=50 | How many memories to return",
         "type": "string=all | Which kind of memory: user, agent or all",
         "include_children": "boolean=true | Also read the paths below this one"}),
    "list_memories": ("List all the memories kept about the user, newest first, with their ids and paths.", {}),
    "update_memory": (
        "Change the user's memories in one go: each operation adds, edits, moves or removes one memory. "
        "Operations are objects such as {\"action\": \"add\", \"content\": \"...\", \"path\": \"...\"}, "
        "{\"action\": \"edit\", \"memory_id\": \"...\", \"content\": \"...\"}, {\"action\": \"move\", "
        "\"memory_id\": \"...\", \"path\": \"...\"} and {\"action\": \"delete\", \"memory_id\": \"...\"}. "
        "Keep memories short and factual; store a preference or fact the user stated, not a guess. Before "
        "adding, search for a memory that already says it and edit that one instead. All operations apply "
        "together or, if one fails, none does.",
        {"operations": "array! | The memory operations to apply, in order, each an object with an action (add, "
                       "edit, move or delete) and the fields that action takes, as described above"}),
    "add_memory": (
        "Keep a new memory about the user: a fact or preference they stated that will help in later "
        "conversations. Keep it to one short sentence. File it under a path such as preferences/food or "
        "work/projects so that related memories stay together and can be read back in one call.",
        {"content": "string! | The memory, one short sentence",
         "type": "string=user | user for facts about the user, agent for the assistant's own notes",
         "path": "string | Where to file the memory, such as preferences/food; the top level when left out"}),
    "replace_memory_content": (
        "Replace the text of one memory, keeping its id, when a fact the user told you has changed.",
        {"memory_id": "string! | The id of the memory to change, from a search or list",
         "content": "string! | The new text of the memory, one short sentence",
         "type": "string | A new kind for the memory: user or agent",
         "path": "string | A new path to file the memory under"}),
    "delete_memory": ("Remove one memory for good. Only do so when the user asks, or when the memory is plainly wrong.", {"memory_id": "string! | The id of the memory to remove"}),
    "search_notes": (
        "Search the user's notes by title and content and return the matching notes with their ids, titles and dates.",
        {"query": "string! | Words to look for in the notes", "count": "integer=5 | How many notes to return",
         "start_timestamp": "integer | Only notes updated after this Unix time",
         "end_timestamp": "integer | Only notes updated before this Unix time"}),
    "view_note": ("Read one of the user's notes by its id, with its title, text and the time it last changed.", {"note_id": "string! | The id of the note to read"}),
    "write_note": ("Create a new note for the user, who can open and edit it in the notes section.",
                   {"title": "string! | The note's title", "content": "string! | The note's text, in Markdown"}),
    "replace_note_content": (
        "Change a note the user can write to: replace all of it, or edit parts of it with operations, and "
        "optionally rename it. Operations are objects such as {\"action\": \"replace\", \"content\": \"...\"}, "
        "{\"action\": \"replace_text\", \"start\": 0, \"end\": 10, \"content\": \"...\", \"expected\": \"...\"}, "
        "{\"action\": \"replace_text\", \"find\": \"old words\", \"content\": \"new words\", \"occurrence\": 1}, "
        "{\"action\": \"insert\", \"position\": 0, \"content\": \"...\"} and {\"action\": \"append\", "
        "\"content\": \"...\"}. Offsets count characters of the current text; expected, when given, must "
        "equal the text being replaced, or the edit is refused so that a stale view never overwrites newer "
        "words. Read the note with view_note first.",
        {"note_id": "string! | The id of the note to change",
         "content": "string | The whole new text of the note, in Markdown; give it instead of operations to replace "
                    "everything at once",
         "operations": "array | The edits to apply, in the order given; each one sees the text as the edits before "
                       "it left it, so later offsets count from the already edited text",
         "title": "string | A new title for the note; leave it out to keep the current one"}),
    "create_skill": (
        "Save reusable instructions as a skill the user can attach to later chats, with optional files. Write "
        "the instructions so that another model could follow them with no other context: what the skill is "
        "for, the steps, and what a good result looks like. Saving again under the same id makes a new "
        "version.",
        {"id": "string! | A short identifier, lower case with dashes", "name": "string! | The skill's name",
         "content": "string! | The instructions, in Markdown",
         "files": "array | Supporting files, each with a path and UTF-8 content",
         "commit_message": "string | What this version changes"}),
    "create_tasks": (
        "Write down the steps of a longer job as a task list the user can follow, and keep it current with "
        "update_task as each step is done. Use it only for work of three or more steps.",
        {"tasks": "array! | The tasks, each with content, a status (pending, in_progress, completed or cancelled; "
                  "pending unless given) and an optional id, made up when missing"}),
    "update_task": ("Mark a task from the task list with a new status as the work goes on; the user sees the list update.",
                    {"id": "string! | The id of the task",
                     "status": "string=completed | The task's new status: pending, in_progress, completed or cancelled"}),
    "create_automation": (
        "Schedule a prompt to run by itself on a recurring schedule, as the user, and post its answer in a new "
        "chat each time: a daily summary, a weekly reminder, a check every morning. The schedule is an "
        "iCalendar RRULE such as FREQ=DAILY;BYHOUR=8;BYMINUTE=0 or FREQ=WEEKLY;BYDAY=MO;BYHOUR=9, read in the "
        "user's time zone; DTSTART may be given to begin later. Write the prompt so that it makes sense with "
        "no conversation before it, since each run starts fresh. Ask the user before scheduling anything "
        "that runs more often than hourly.",
        {"name": "string! | A short name for the automation, shown in the user's list of automations",
         "prompt": "string! | The prompt to run each time, written to stand on its own without this conversation",
         "rrule": "string! | When to run, as an iCalendar RRULE such as FREQ=DAILY;BYHOUR=7;BYMINUTE=30",
         "folder_id": "string | The folder its chats go to; the user's default folder when left out"}),
    "update_automation": (
        "Change an automation's name, prompt, schedule, model or folder; only the fields given change, and the "
        "next run follows the new schedule.",
        {"automation_id": "string! | The id of the automation, from list_automations",
         "name": "string | A new name for the automation", "prompt": "string | A new prompt, standing on its own",
         "rrule": "string | A new schedule, as an iCalendar RRULE such as FREQ=WEEKLY;BYDAY=FR;BYHOUR=17",
         "model_id": "string | The model to run it with; the current one when left out",
         "folder_id": "string= | The folder its chats go to; empty for no folder"}),
    "list_automations": ("List the user's automations with their ids, names, schedules, status and the time of their next run.",
                         {"status": "string | Only automations with this status: active or paused; both when left out",
                          "folder_id": "string | Only the automations whose chats go to this folder",
                          "count": "integer=10 | How many to return"}),
    "toggle_automation": ("Pause an active automation, or resume a paused one; returns its new status.",
                          {"automation_id": "string! | The id of the automation"}),
    "delete_automation": ("Remove an automation and stop its runs; the chats it already made are kept.",
                          {"automation_id": "string! | The id of the automation"}),
    "search_calendar_events": (
        "Find events in the user's calendars by words and by time span; returns each event's id, title, start, "
        "end and calendar.",
        {"query": "string | Words to look for in titles and descriptions",
         "start": "string | The start of the span, as an ISO 8601 date or time; now when left out",
         "end": "string | The end of the span, as an ISO 8601 date or time; a week after the start when left out",
         "count": "integer=10 | How many events to return, earliest first"}),
    "create_calendar_event": (
        "Add an event to one of the user's calendars. Times are ISO 8601 in the user's time zone unless they "
        "carry an offset; an all-day event takes dates only. Without an end, a timed event lasts an hour. "
        "Check the calendar first with search_calendar_events when the user asks for a free slot, and say "
        "which calendar the event went to.",
        {"title": "string! | The event's title", "start": "string! | When it starts, ISO 8601",
         "end": "string | When it ends, ISO 8601; an hour after the start when left out",
         "description": "string | Notes for the event: an agenda, a link to join, what to bring",
         "calendar_id": "string | The calendar to add it to; the user's default calendar when left out",
         "all_day": "boolean=false | Whether the event lasts the whole day (then start and end are dates)",
         "location": "string | Where it takes place: an address, a room or a meeting link",
         "reminder_minutes": "integer | Remind the user this many minutes before it starts; no reminder when "
                             "left out"}),
    "update_calendar_event": (
        "Change an event in the user's calendars; only the fields given change. Find the event's id with "
        "search_calendar_events first, and tell the user what changed.",
        {"event_id": "string! | The id of the event, from search_calendar_events",
         "title": "string | A new title for the event", "description": "string | New notes for the event",
         "start": "string | A new start, ISO 8601 in the user's time zone unless it carries an offset",
         "end": "string | A new end, ISO 8601 in the user's time zone unless it carries an offset",
         "all_day": "boolean | Whether the event lasts the whole day (then start and end are dates)",
         "location": "string | A new place: an address, a room or a meeting link",
         "is_cancelled": "boolean | Mark the event cancelled but keep it in the calendar",
         "reminder_minutes": "integer | Remind the user this many minutes before it starts"}),
    "delete_calendar_event": ("Remove an event from the user's calendar. Ask before removing an event others were invited to.",
                              {"event_id": "string! | The id of the event"}),
}

# Array items: free-form objects unless given here.
ITEMS: dict[str, dict[str, Any]] = {
    "query_knowledge_files.knowledge_ids": {"type": "string"},
    "create_skill.files": {
        "additionalProperties": False, "type": "object", "required": ["path", "content"],
        "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                       "encoding": {"const": "base64", "type": "string"}}},
    "create_tasks.tasks": {
        "type": "object", "required": ["content"],
        "properties": {"id": {"description": "The task's identifier; one is made up when it is missing.",
                              "type": "string"},
                       "content": {"description": "What the task is.", "type": "string"},
                       "status": {"default": "pending", "description": "Where the task stands.", "type": "string",
                                  "enum": ["pending", "in_progress", "completed", "cancelled"]}}},
}

_DEFAULTS = {"integer": int, "boolean": lambda v: v == "true", "string": str}


def _param(spec: str) -> tuple[dict[str, Any], bool]:
    head, _, description = (part.strip() for part in spec.partition("|"))
    required = head.endswith("!")
    kind, has_default, default = head.rstrip("!").partition("=")
    out: dict[str, Any] = {"type": kind}
    if has_default:
        out["default"] = _DEFAULTS[kind](default)
    if description:
        out["description"] = description
    return out, required


def tools() -> list[dict[str, Any]]:
    """Open WebUI's 36 built-in tools, in the order it sends them."""
    out = []
    for name, (description, params) in TOOLS.items():
        parsed = {p: _param(spec) for p, spec in params.items()}
        for p, (schema, _) in parsed.items():
            if schema["type"] == "array":
                schema["items"] = ITEMS.get(f"{name}.{p}", {"additionalProperties": True, "type": "object"})
        schema: dict[str, Any] = {"properties": {p: s for p, (s, _) in parsed.items()}, "type": "object"}
        required = [p for p, (_, req) in parsed.items() if req]
        if required:
            schema["required"] = required
        out.append({"type": "function", "function": {"name": name, "description": description, "parameters": schema}})
    return out


def first_chat(model: str, question: str = "Why is the sky blue?") -> dict[str, Any]:
    """The body Open WebUI posts for a new chat's first message (both connections)."""
    return {"model": model, "messages": [{"role": "user", "content": question}], "stream": True, "tools": tools()}
