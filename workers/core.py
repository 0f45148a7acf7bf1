"""The core: turn a `Job` into a `Reply` with an engine, never answering with nothing."""

from __future__ import annotations

import logging
import time

from celery.exceptions import SoftTimeLimitExceeded

from workers.contract import FinishReason, GenerationOptions, Job, Reply
from workers.engines import Engine, Generation, PromptTooLongError, TextSink

log = logging.getLogger(__name__)

BLANK_FALLBACK = (
    "Sorry, I could not come up with an answer to that. Could you rephrase the question?"
)
TOO_LONG_REPLY = "Sorry, your message is too long for me to read ({reason}). Please shorten it."
TIMED_OUT_REPLY = "Sorry, that took me too long to answer. Please try a shorter question."
# A blank answer is retried once, a little hotter and with another seed, before the fallback.
RETRY_TEMPERATURE = 0.9


def _retry_options(options: GenerationOptions) -> GenerationOptions:
    seed = (options.seed + 1) if options.seed is not None else None
    return options.model_copy(update={"temperature": RETRY_TEMPERATURE, "seed": seed})


def answer(job: Job, engine: Engine, worker: str = "", on_text: TextSink | None = None) -> Reply:
    """Generate the answer to `job`; blank generations are retried, then replaced politely."""
    started = time.monotonic()
    finish_reason: FinishReason
    produced: list[str] = []

    def collect(text: str) -> None:
        produced.append(text)
        if on_text is not None:
            on_text(text)

    try:
        generation: Generation = engine.generate(job.messages, job.options, collect)
        if not generation.text.strip():
            log.warning("blank generation for job %s; retrying once", job.id)
            produced.clear()
            generation = engine.generate(job.messages, _retry_options(job.options), collect)
        text = generation.text.strip()
        finish_reason = generation.finish_reason
        prompt_tokens, completion_tokens = generation.prompt_tokens, generation.completion_tokens
    except PromptTooLongError as error:
        log.info("job %s refused: %s", job.id, error)
        text, finish_reason, prompt_tokens, completion_tokens = "", "fallback", 0, 0
        text = TOO_LONG_REPLY.format(reason=error)
    except SoftTimeLimitExceeded:
        # Out of time: what was generated so far beats nothing; an apology beats a traceback.
        partial = "".join(produced).strip()
        log.warning("job %s hit its time limit after %d characters", job.id, len(partial))
        text = f"{partial} …" if partial else TIMED_OUT_REPLY
        finish_reason, prompt_tokens, completion_tokens = "length", 0, 0
    if not text:
        log.warning("blank generation twice for job %s; sending the fallback", job.id)
        text, finish_reason = BLANK_FALLBACK, "fallback"
        if on_text is not None:
            on_text(text)
    return Reply(
        job_id=job.id,
        channel=job.channel,
        reply_to=job.reply_to,
        reply_from=job.reply_from,
        context=job.context,
        text=text,
        model=engine.model_name,
        engine=engine.name,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        worker=worker,
        duration_ms=(time.monotonic() - started) * 1000,
    )
