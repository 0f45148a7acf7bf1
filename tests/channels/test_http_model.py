"""The HTTP channel answered by the real bundled model."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(model_web: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{model_web}/v1", api_key="unused", timeout=120, max_retries=0)


def test_the_openai_client_gets_a_real_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gemma",
        messages=QUESTION,
        max_tokens=32,
        seed=5,  # type: ignore[arg-type]
    )
    assert completion.model == "smollm2-135m-instruct"
    content = completion.choices[0].message.content
    assert content and content.strip() == content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 32


def test_a_streamed_answer_arrives_in_pieces_that_make_the_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gemma",
        messages=QUESTION,
        max_tokens=32,
        seed=5,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2  # streamed as generated, not sent whole at the end
    assert "".join(pieces).strip()
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    # The same seed and prompt give the same answer streamed or not.
    whole = client.chat.completions.create(
        model="gemma",
        messages=QUESTION,
        max_tokens=32,
        seed=5,  # type: ignore[arg-type]
    )
    assert "".join(pieces).strip() == whole.choices[0].message.content
