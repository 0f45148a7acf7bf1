"""The `scripted` engine: fixed rules instead of a model, to test how the core uses tools.

* a conversation that offers helpers and asks ``use NAME for INPUT`` gets the
  structured call ``{"helper": "NAME", "input": "INPUT"}``;
* a helper's answer (``The NAME helper answered: X``) gets ``The answer is X.``;
* anything else is echoed, like the `echo` engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from answer.engines import Generation, TextSink
from kernel.contract import ChatMessage, GenerationOptions

_USE = re.compile(r"^use ([a-z][a-z0-9_-]*) for (.+)$", re.IGNORECASE | re.DOTALL)
_ANSWERED = re.compile(r"^The ([a-z][a-z0-9_-]*) helper answered: (.*?)\nUse that", re.DOTALL)


class ScriptedEngine:
    """Deterministic stand-in for a model that calls tools well."""

    name = "scripted"
    model_name = "scripted"

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Answer by the rules in the module docstring."""
        last = messages[-1].content.strip()
        offered = any("You can use these helpers" in m.content for m in messages)
        answered = _ANSWERED.match(last)
        use = _USE.match(last)
        if answered:
            text = f"The answer is {answered.group(2).strip()}."
        elif offered and use:
            text = json.dumps({"helper": use.group(1).lower(), "input": use.group(2).strip()})
        else:
            text = last
        if on_text is not None:
            on_text(text)
        return Generation(text, "stop", sum(len(m.content.split()) for m in messages),
                          len(text.split()))  # fmt: skip
