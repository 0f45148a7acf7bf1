"""A model's markdown answer as a person's phone or mail reader shows it.

Models answer in markdown. The HTTP API passes it on as written (its clients
render it), but an SMS shows every ``**``, ``#`` and ``|`` as typed: SMS
replies and an email's text/plain part are made plain text here
(`plain_text`), and an email's text/html alternative is rendered from the
same markdown (`safe_html`) with the model's own HTML escaped, links only to
http, https and mailto, and images shown as links, never loaded from a remote
host. WhatsApp shows its own marks (``*bold*``, ``_italic_``, ``~strike~``,
monospace in backticks): `whatsapp_text` writes the same text with those. All
parse with markdown-it (CommonMark, plus tables and strikethrough).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode
from markdown_it.utils import OptionsDict

BULLET = "- "  # GSM-7: a "•" would make the whole SMS UCS-2, 70 characters a segment
CELL_SEPARATOR = " | "
SAFE_LINK = re.compile(r"(?i)(https?|mailto):")
_BREAK_TAG = re.compile(r"(?i)<br\s*/?>|</?p\b[^>]*>|</(?:div|li|tr|h[1-6])\s*>")
# The HTML a model writes for formatting; any other <word> is text ("tar -xzf <archive>").
_HTML_TAG = re.compile(
    r"(?i)</?(?:a|abbr|b|big|blockquote|br|center|code|del|div|em|font|h[1-6]|hr|i|img|ins|"
    r"kbd|li|mark|ol|p|pre|s|small|span|strike|strong|sub|sup|table|tbody|td|tfoot|th|thead|"
    r"tr|tt|u|ul)\b[^<>]*>"
)
# Around emphasis markers, these make them arithmetic or a path, not emphasis: 2*3*4,
# (2+3)*4*(5-1), https://x.com/*foo*/bar.
_GLUE_BEFORE = ")]}/."
_GLUE_AFTER = "([{/."
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


@dataclass(frozen=True)
class _Marks:
    """How a text format writes emphasis, code, headings and quotes ("": not at all)."""

    strong: str = ""
    em: str = ""
    strike: str = ""
    code: str = ""  # around inline code
    fence: str = ""  # on the lines above and below a code block
    heading: str = ""  # around a heading's text
    quote: str = ""  # before each line of a quote


_NO_MARKS = _Marks()
# WhatsApp's own formatting: *bold*, _italic_, ~strike~, `code`, ```block```, > quote.
_WHATSAPP_MARKS = _Marks(strong="*", em="_", strike="~", code="`", fence="```", heading="*",
                         quote="> ")  # fmt: skip


class _SafeLinks(MarkdownIt):
    """A parser that makes links only of http, https and mailto URLs."""

    def validateLink(self, url: str) -> bool:
        """True for the schemes a mail may link to; anything else stays literal text."""
        return SAFE_LINK.match(url.strip()) is not None


# Raw HTML is parsed (so that a model's <br> or <b> can be turned into text) but
# never rendered: plain text drops tags, the HTML parser escapes them.
_PLAIN = (
    MarkdownIt("commonmark", {"html": True})
    .enable(["table", "strikethrough"])
    .disable("text_join")  # keeps a backslash escape apart, to be written as the model did
)
# A line break in the answer is one in the mail too, as in the text/plain part.
_HTML = _SafeLinks("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])


def _image_as_link(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: Any
) -> str:
    """An image as a link to it: a mail that loads remote images tells its sender it was read."""
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    alt = renderer.renderInlineAsText(token.children or [], options, env) or src
    return f'<a href="{html.escape(src)}">{html.escape(alt)}</a>'


_HTML.add_render_rule("image", _image_as_link)


def plain_text(markdown: str) -> str:
    """`markdown` as plain text: the words and links kept, the markup gone.

    An answer that has no markdown comes back as it was (runs of blank lines
    made one), whitespace included.
    """
    return _written(markdown, _NO_MARKS)


def whatsapp_text(markdown: str) -> str:
    """`markdown` in WhatsApp's formatting: **bold** as *bold*, *italic* as _italic_,
    ~~struck~~ as ~struck~, headings in bold, code in backticks, links as "text (url)"."""
    return _written(markdown, _WHATSAPP_MARKS)


def _written(markdown: str, marks: _Marks) -> str:
    """`markdown` as text with `marks`; unchanged when only whitespace would change."""
    text = _join_blocks(SyntaxTreeNode(_PLAIN.parse(markdown)).children, marks=marks)
    if text.split() == markdown.split():
        text = markdown  # nothing but whitespace would change: keep the model's own layout
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def safe_html(markdown: str) -> str:
    """`markdown` rendered as an HTML fragment that is safe to put in a mail."""
    return _HTML.render(markdown)


def _join_blocks(
    nodes: Sequence[SyntaxTreeNode], separator: str = "\n\n", marks: _Marks = _NO_MARKS
) -> str:
    """Blocks one after another; a heading's text is on its own line, above what follows."""
    out = ""
    after_heading = False
    for node in nodes:
        block = _block(node, marks)
        if not block:
            continue
        if out:
            out += "\n" if after_heading else separator
        out += block
        after_heading = node.type == "heading"
    return out


def _block(node: SyntaxTreeNode, marks: _Marks = _NO_MARKS) -> str:
    """One block (paragraph, heading, list, code, quote, table...) as text with `marks`."""
    kind = node.type
    if kind == "heading":
        text = "".join(_inline(child, marks) for child in node.children)
        return f"{marks.heading}{text}{marks.heading}" if text.strip() else text
    if kind == "paragraph":
        return "".join(_inline(child, marks) for child in node.children)
    if kind == "inline":
        return _inline(node, marks)
    if kind in ("fence", "code_block"):
        code = node.content.rstrip("\n")
        return f"{marks.fence}\n{code}\n{marks.fence}" if marks.fence else code
    if kind == "blockquote":
        quoted = _join_blocks(node.children, marks=marks)
        return "\n".join(marks.quote + line if line else line for line in quoted.split("\n"))
    if kind in ("bullet_list", "ordered_list"):
        return "\n".join(_list_item(item, marks) for item in node.children)
    if kind == "table":
        rows = [row for part in node.children for row in part.children]
        return "\n".join(
            CELL_SEPARATOR.join(_block(cell, marks).strip() for cell in row.children)
            for row in rows
        )
    if kind in ("th", "td"):
        return "".join(_inline(child, marks) for child in node.children)
    if kind == "html_block":
        return _html_as_text(node.content).strip("\n")
    if kind == "hr":
        return ""
    return _join_blocks(node.children, marks=marks) if node.children else node.content


def _list_item(item: SyntaxTreeNode, marks: _Marks = _NO_MARKS) -> str:
    """``- item`` or ``3. item``; what follows its first line is indented under it."""
    marker = f"{item.info}{item.markup} " if item.info else BULLET
    lines = _join_blocks(item.children, separator="\n", marks=marks).split("\n")
    indent = " " * len(marker)
    return marker + "\n".join([lines[0], *(indent + line if line else line for line in lines[1:])])


def _inline(node: SyntaxTreeNode, marks: _Marks = _NO_MARKS) -> str:
    """Inline markdown (emphasis, code, links, images, breaks) as text with `marks`."""
    kind = node.type
    if kind == "text_special" and node.info == "escape":
        return node.markup  # a backslash the model wrote (a regex, a path) stays
    if kind == "code_inline":
        return f"{marks.code}{node.content}{marks.code}"
    if kind in ("text", "text_special"):
        return node.content
    if kind in ("softbreak", "hardbreak"):
        return "\n"
    if kind == "html_inline":
        return _html_as_text(node.content)
    if kind == "image":
        alt, src = node.content, str(node.attrs.get("src", ""))
        return f"{alt} ({src})" if alt and alt != src else src
    inner = "".join(_inline(child, marks) for child in node.children)
    if kind == "link":
        href = str(node.attrs.get("href", ""))
        if node.markup == "autolink" or not inner or href in (inner, f"mailto:{inner}"):
            return inner or href
        return f"{inner} ({href})"
    if kind in ("em", "strong") and _is_inside_a_word(node):
        return node.markup + inner + node.markup
    mark = {"strong": marks.strong, "em": marks.em, "s": marks.strike}.get(kind, "")
    if mark and inner.strip():
        return f"{mark}{inner}{mark}"
    return inner  # em, strong, s, inline: the markers go (or become `marks`), the words stay


def _is_inside_a_word(node: SyntaxTreeNode) -> bool:
    """Markers glued to what is around them, as in ``2*3*4`` or ``(a*b)*(c*d)`` or
    ``__init__.py``: arithmetic, a path or a name, not emphasis."""
    before, after = node.previous_sibling, node.next_sibling
    left = before.content[-1:] if before is not None and before.type == "text" else ""
    right = after.content[:1] if after is not None and after.type == "text" else ""
    if node.markup.startswith("_"):
        return bool(right) and (right.isalnum() or right in _GLUE_AFTER)
    glued_left = bool(left) and (left.isalnum() or left in _GLUE_BEFORE)
    glued_right = bool(right) and (right.isalnum() or right in _GLUE_AFTER)
    return glued_left and glued_right


def _html_as_text(markup: str) -> str:
    """A model's raw HTML as its text: line breaks kept, tags dropped, entities decoded."""
    return html.unescape(_HTML_TAG.sub("", _BREAK_TAG.sub("\n", markup)))
