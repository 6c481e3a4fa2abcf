"""The tool-aware ChatML template every local model is trained and evaluated with, and the parser that
turns generated text back into an OpenAI assistant message. SmolLM2's own template drops `tools` and
`tool_calls` and fails on `content: null`, so training data with tool calls would silently lose them."""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# ChatML with three additions: the offered tools as JSON lines opening the system turn, assistant tool calls
# as <tool_call>{"name", "arguments"}</tool_call> blocks, and `tool` turns tagged with their call id.
# Arguments arrive either as objects (trl formats) or as JSON text (openai format): objects are dumped,
# text is written as it is, so a malformed call stays malformed and the schema check can see it.
# The tools come before the system prompt: they are identical across an agent's calls while the prompt
# varies (site, date), so the longest shared token prefix of a batch covers them and the prefix-tree
# engine (and a serving engine's prefix cache) computes them once.
TOOL_CHAT_TEMPLATE = r"""
{%- macro render_call(tc) -%}
{%- set fn = tc.function if tc.function is defined else tc -%}
{%- set args = fn.arguments if fn.arguments is defined else {} -%}
{{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
{%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
{{- '}</tool_call>' -}}
{%- endmacro -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if has_system or tools -%}
{{- '<|im_start|>system\n' -}}
{%- if tools -%}
{{- '# Tools\n\nYou can call these tools (JSON, one per line):\n<tools>\n' -}}
{%- for tool in tools -%}{{- (tool.function if tool.function is defined else tool) | tojson -}}{{- '\n' -}}{%- endfor -%}
{{- '</tools>\n\nTo call a tool, answer with one block per call:\n<tool_call>{"name": <tool name>, "arguments": <arguments as a JSON object>}</tool_call>' -}}
{%- if has_system and messages[0].content -%}{{- '\n\n' -}}{%- endif -%}
{%- endif -%}
{%- if has_system and messages[0].content is not none -%}{{- messages[0].content -}}{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- if message.content is defined and message.content is not none -%}{{- message.content -}}{%- endif -%}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- for tc in message.tool_calls -%}
{%- if not loop.first or (message.content is defined and message.content) -%}{{- '\n' -}}{%- endif -%}
{{- render_call(tc) -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{{- '<|im_start|>tool\n<tool_response id=' + ((message.tool_call_id if message.tool_call_id is defined else '') | tojson) + '>\n' -}}
{%- if message.content is string -%}{{- message.content -}}{%- elif message.content is not none -%}{{- message.content | tojson -}}{%- endif -%}
{{- '\n</tool_response><|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' -}}
{%- if message.content is defined and message.content is not none -%}{{- message.content -}}{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def install_tool_template(tokenizer: Any) -> Any:
    """Put the tool-aware template on a tokenizer (in place; returned for chaining)."""
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The conversation as the model sees it, as text."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def parse_assistant_output(text: str) -> dict:
    """Generated text -> `{"role": "assistant", "content": str | None, "tool_calls": [...]}`.

    Each <tool_call> block becomes an OpenAI tool call with `arguments` as JSON text. A block whose
    JSON does not parse is still a tool call (name recovered when visible, arguments = the raw block
    text), so the schema check marks it invalid instead of the call silently disappearing. A block cut
    off by the length limit counts as a block too.
    """
    for end in _END_TOKENS:
        cut = text.find(end)
        if cut >= 0:
            text = text[:cut]
    tool_calls = []
    for index, match in enumerate(_BLOCK.finditer(text)):
        tool_calls.append(_parse_block(match.group(1).strip(), index))
    content = _BLOCK.sub("", text).strip()
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}


def cut_off_in_a_call(text: str) -> bool:
    """True when generation stopped (no end token) inside a <tool_call> block: the last parsed call is then
    unfinished because of the token limit, which says nothing about whether the model calls tools well."""
    if any(end in text for end in _END_TOKENS):
        return False
    return text.rfind(TOOL_CALL_OPEN) > text.rfind(TOOL_CALL_CLOSE)


def _parse_block(raw: str, index: int) -> dict:
    name, arguments = "", raw
    try:
        obj = json.loads(raw)
    except ValueError:
        found = _NAME.search(raw)
        name = found.group(1) if found else ""
    else:
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": arguments}}


def arguments_as_text(arguments: Any) -> str:
    """Tool-call arguments as JSON text, whichever form they came in (object in trl rows, text in openai)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def arguments_as_object(arguments: Any) -> Any:
    """Tool-call arguments as a JSON value when they parse; the raw text when they do not."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
