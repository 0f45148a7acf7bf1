"""Composing replies: threading headers and a helper's image as an attachment."""

from __future__ import annotations

import base64

from channels.email.delivery import compose_reply
from kernel.contract import Reply
from kernel.settings import Settings


def reply(**context: str) -> Reply:
    return Reply(job_id="email-1", channel="email", reply_to="ann@example.org", text="Done.",
                 model="image", engine="helper",
                 context={"subject": "Re: Re: Pic", "message_id": "<q@x>", **context})  # fmt: skip


def test_a_helpers_image_is_attached() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(20)
    encoded = base64.b64encode(png).decode()
    settings = Settings(email_from="bot@x.org")
    message = compose_reply(reply(image_base64=encoded, image_type="image/png"), settings)
    attachments = list(message.iter_attachments())
    assert [a.get_content_type() for a in attachments] == ["image/png"]
    assert attachments[0].get_content() == png
    assert message["Subject"] == "Re: Pic"


def test_a_reply_without_image_has_no_attachment() -> None:
    message = compose_reply(reply(), Settings(email_from="bot@x.org"))
    assert list(message.iter_attachments()) == []
    assert message["Message-ID"] == "<gpt4p-email-1@x.org>"


def test_the_models_markdown_is_plain_text_with_a_rendered_html_alternative() -> None:
    answer = "## Sea haiku\n\n**Waves** fold on the sand,\n*salt* wind <script>x</script>"
    quoted = reply(authenticated="true", question="A haiku?", sender_name="Ann")
    message = compose_reply(quoted.model_copy(update={"text": answer}), Settings(email_from="b@x"))
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    # Text that is no formatting tag stays text: inert in a text/plain part.
    assert plain.get_content() == (
        "Sea haiku\nWaves fold on the sand,\nsalt wind <script>x</script>\n\nAnn wrote:\n"
        "> A haiku?\n"
    )
    rendered = html.get_content()
    assert "<h2>Sea haiku</h2>" in rendered and "<strong>Waves</strong>" in rendered
    assert "&lt;script&gt;x&lt;/script&gt;" in rendered and "<script" not in rendered
    assert "<blockquote>Ann wrote:<br>&gt; A haiku?</blockquote>" in rendered
