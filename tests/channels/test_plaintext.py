"""A model's markdown answer as plain text for a phone, and as safe HTML for a mail."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.plaintext import plain_text, safe_html

RECIPE = """# Pancakes

You need **three** things:

* 2 eggs
* 1 cup of __plain__ _flour_
* 300 ml milk

## Steps

1. Whisk everything.
2. Fry *both* sides:
   - 1 minute each
   - until golden
"""


def test_a_recipe_keeps_its_words_headings_and_lists_without_markup() -> None:
    assert plain_text(RECIPE) == (
        "Pancakes\n"
        "You need three things:\n\n"
        "- 2 eggs\n"
        "- 1 cup of plain flour\n"
        "- 300 ml milk\n\n"
        "Steps\n"
        "1. Whisk everything.\n"
        "2. Fry both sides:\n"
        "   - 1 minute each\n"
        "   - until golden"
    )


def test_a_code_block_keeps_its_lines_and_loses_its_fences_and_backticks() -> None:
    answer = "Install it with `pip`:\n\n```bash\npip install requests\npython -m http.server\n```"
    assert plain_text(answer) == (
        "Install it with pip:\n\npip install requests\npython -m http.server"
    )


@pytest.mark.parametrize(
    ("markdown", "text"),
    [
        ("See [the docs](https://docs.python.org/3/).", "See the docs (https://docs.python.org/3/)."),
        ("Go to [https://x.org](https://x.org) now", "Go to https://x.org now"),
        ("Write to <ann@example.org> or <https://x.org>", "Write to ann@example.org or https://x.org"),
        ("![a map of Paris](https://x.org/paris.png)", "a map of Paris (https://x.org/paris.png)"),
    ],
)  # fmt: skip
def test_links_and_images_show_their_address(markdown: str, text: str) -> None:
    assert plain_text(markdown) == text


def test_every_kind_of_bullet_becomes_a_dash() -> None:
    assert plain_text("+ tea\n+ **coffee**") == "- tea\n- coffee"


def test_a_table_becomes_one_line_per_row() -> None:
    table = "| Planet | Moons |\n|:--|--:|\n| Earth | 1 |\n| **Mars** | 2 |"
    assert plain_text(table) == "Planet | Moons\nEarth | 1\nMars | 2"


def test_quotes_rules_and_html_the_model_emits_become_text() -> None:
    answer = "> Be **kind**.\n> Always.\n\n---\n\nLine one<br>line <b>two</b> &amp; three"
    assert plain_text(answer) == "Be kind.\nAlways.\n\nLine one\nline two & three"


def test_runs_of_blank_lines_become_one() -> None:
    assert plain_text("## Yes\n\n\n\n\nIt is **true**.\n\n\n\nReally.") == (
        "Yes\nIt is true.\n\nReally."
    )


@pytest.mark.parametrize(
    "answer",
    [
        "Paris is the capital of France.",
        "2 * 3 * 4 = 24, and 2*3*4 is the same.\nCall my_snake_case_name() or a*b*c.",
        "Hello!\n\nThe steps:\n1. Boil water.\n2. Add pasta.\n\n- salt\n- oil  \n    indented",
        "Prices went up 5% (from $10 to $10.50) - see section #3 :)",
    ],
)
def test_an_answer_without_markdown_is_unchanged(answer: str) -> None:
    assert plain_text(answer) == answer


# Prose: no line of dashes alone (markdown reads "text\n-" as a heading), nor a list.
PROSE = st.text(alphabet=st.sampled_from("abcXYZ019 ,.?!'\"%$()-\n"), max_size=200).filter(
    lambda text: (
        not any(line.strip(" -") == "" and "-" in line for line in text.split("\n"))
        and not any(
            line.lstrip().startswith("- ") or line.strip() == "-" for line in text.split("\n")
        )
    )
)
MARKDOWNISH = st.lists(
    st.sampled_from([*"ab1 \n*_#`[]()!<>|-+.:~&\\", "https://x.org", "<br>", "<b>", "```"]),
    max_size=60,
).map("".join)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(PROSE)
def test_prose_comes_back_as_it_was_but_for_runs_of_blank_lines(answer: str) -> None:
    expected = re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", answer).strip("\n")
    assert plain_text(answer) == expected


@settings(max_examples=200, deadline=None, derandomize=True)
@given(MARKDOWNISH)
def test_any_text_is_answered_and_no_raw_tag_reaches_the_html(answer: str) -> None:
    plain_text(answer)
    assert "<b>" not in safe_html(answer) and "<br>" not in safe_html(answer)


def test_the_html_alternative_renders_the_markdown() -> None:
    rendered = safe_html("# Pancakes\n\nYou need **eggs**:\n\n- 2 eggs\n- milk\n\nThen\nfry.")
    assert "<h1>Pancakes</h1>" in rendered
    assert "<strong>eggs</strong>" in rendered
    assert "<li>2 eggs</li>" in rendered
    assert "Then<br />" in rendered  # a line break in the answer is one in the mail


def test_the_html_alternative_escapes_the_models_html_and_unsafe_links() -> None:
    rendered = safe_html(
        "<script>alert(1)</script>\n\n<img src=x onerror=alert(1)> [x](javascript:alert(1)) "
        "[y](data:text/html,hi) [ok](https://example.org/a?b=1&c=2) <javascript:alert(2)>"
    )
    assert "<script" not in rendered and "<img" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert re.findall(r'href="([^"]*)"', rendered) == ["https://example.org/a?b=1&amp;c=2"]


def test_the_html_alternative_links_to_images_instead_of_loading_them() -> None:
    rendered = safe_html('![a "cat"](https://tracker.example/pixel.png)')
    assert "<img" not in rendered
    assert '<a href="https://tracker.example/pixel.png">a &quot;cat&quot;</a>' in rendered


@pytest.mark.parametrize(
    "answer",
    [
        "if x<y and y>z then stop",
        "Run tar -xzf <archive> now",
        "Edit __init__.py first",
        "(2+3)*4*(5-1) = 80",
        "https://x.com/*foo*/bar",
        r"Regex: \d+\.\d+",
    ],
)
def test_comparisons_placeholders_names_and_escapes_are_not_markup(answer: str) -> None:
    assert plain_text(answer) == answer
