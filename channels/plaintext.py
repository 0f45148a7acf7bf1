"""A model's markdown answer as a person's phone or mail reader shows it.

Models answer in markdown. The HTTP API passes it on as written (its clients
render it), but an SMS shows every ``**``, ``#`` and ``|`` as typed: SMS
replies and an email's text/plain part are made plain text here
(`plain_text`), and an email's text/html alternative is rendered from the
same markdown (`safe_html`) with the model's own HTML escaped, links only to
http, https and mailto, and images shown as links, never loaded from a remote
host. Both parse with markdown-it (CommonMark, plus tables and strikethrough).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
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
    text = _join_blocks(SyntaxTreeNode(_PLAIN.parse(markdown)).children)
    if text.split() == markdown.split():
        text = markdown  # nothing but whitespace would change: keep the model's own layout
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def safe_html(markdown: str) -> str:
    """`markdown` rendered as an HTML fragment that is safe to put in a mail."""
    return _HTML.render(markdown)


def _join_blocks(nodes: Sequence[SyntaxTreeNode], separator: str = "\n\n") -> str:
    """Blocks one after another; a heading's text is on its own line, above what follows."""
    out = ""
    after_heading = False
    for node in nodes:
        block = _block(node)
        if not block:
            continue
        if out:
            out += "\n" if after_heading else separator
        out += block
        after_heading = node.type == "heading"
    return out


def _block(node: SyntaxTreeNode) -> str:
    """One block (paragraph, heading, list, code, quote, table...) as plain text."""
    kind = node.type
    if kind in ("paragraph", "heading"):
        return "".join(_inline(child) for child in node.children)
    if kind == "inline":
        return _inline(node)
    if kind in ("fence", "code_block"):
        return node.content.rstrip("\n")
    if kind == "blockquote":
        return _join_blocks(node.children)
    if kind in ("bullet_list", "ordered_list"):
        return "\n".join(_list_item(item) for item in node.children)
    if kind == "table":
        rows = [row for part in node.children for row in part.children]
        return "\n".join(
            CELL_SEPARATOR.join(_block(cell).strip() for cell in row.children) for row in rows
        )
    if kind in ("th", "td"):
        return "".join(_inline(child) for child in node.children)
    if kind == "html_block":
        return _html_as_text(node.content).strip("\n")
    if kind == "hr":
        return ""
    return _join_blocks(node.children) if node.children else node.content


def _list_item(item: SyntaxTreeNode) -> str:
    """``- item`` or ``3. item``; what follows its first line is indented under it."""
    marker = f"{item.info}{item.markup} " if item.info else BULLET
    lines = _join_blocks(item.children, separator="\n").split("\n")
    indent = " " * len(marker)
    return marker + "\n".join([lines[0], *(indent + line if line else line for line in lines[1:])])


def _inline(node: SyntaxTreeNode) -> str:
    """Inline markdown (emphasis, code, links, images, breaks) as plain text."""
    kind = node.type
    if kind == "text_special" and node.info == "escape":
        return node.markup  # a backslash the model wrote (a regex, a path) stays
    if kind in ("text", "code_inline", "text_special"):
        return node.content
    if kind in ("softbreak", "hardbreak"):
        return "\n"
    if kind == "html_inline":
        return _html_as_text(node.content)
    if kind == "image":
        alt, src = node.content, str(node.attrs.get("src", ""))
        return f"{alt} ({src})" if alt and alt != src else src
    inner = "".join(_inline(child) for child in node.children)
    if kind == "link":
        href = str(node.attrs.get("href", ""))
        if node.markup == "autolink" or not inner or href in (inner, f"mailto:{inner}"):
            return inner or href
        return f"{inner} ({href})"
    if kind in ("em", "strong") and _is_inside_a_word(node):
        return node.markup + inner + node.markup
    return inner  # em, strong, s, inline: the markers go, the words stay


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
