"""The core: turn a `Job` into a `Reply` with an engine, never answering with nothing."""

from __future__ import annotations

import logging
import time

from answer.engines import (
    Engine,
    Generation,
    GenerationTimeLimitError,
    PromptTooLongError,
    TextSink,
)
from answer.routing import (
    AfterHelper,
    HelperCall,
    HelperGateway,
    HelperOutcome,
    parse_explicit,
    parse_tool_call,
)
from kernel.channels import channel_facts
from kernel.contract import (
    ChatMessage,
    FinishReason,
    GenerationOptions,
    Job,
    Reply,
)
from kernel.helper_registry import HelperInfo

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


def answer(
    job: Job,
    engine: Engine,
    worker: str = "",
    on_text: TextSink | None = None,
    helpers: HelperGateway | None = None,
    offer_tools: bool = False,
) -> Reply | HelperCall:
    """Answer `job`: through a helper when one is named or fits its media, else the model.

    A helper that must run is not waited for: its `HelperCall` is returned, for the
    caller to hand the job over (`workers.handover`) and `answer_after_helper` later.
    """
    if helpers is not None:
        routed = _route(job, engine, helpers, offer_tools, on_text)
        if isinstance(routed, HelperCall):
            return routed
        if routed is not None:
            return routed.model_copy(update={"worker": worker})
    return generate_reply(job, engine, worker, on_text)


def answer_after_helper(
    then: AfterHelper, outcome: HelperOutcome, engine: Engine, on_text: TextSink | None = None
) -> Reply:
    """The reply once a job's helper is done: its outcome, or, when the model asked for the
    helper, the model's answer with the outcome."""
    if then.tool_call is None:
        return _helper_reply(then.job, outcome)
    follow_up = [
        ChatMessage(role="assistant", content=then.tool_call),
        ChatMessage(role="user", content=f"The {then.helper} helper answered: {outcome.text}\n"
                    "Use that to answer my question."),
    ]  # fmt: skip
    with_result = then.job.model_copy(update={"messages": [*then.job.messages, *follow_up]})
    return generate_reply(with_result, engine, "", on_text)


def _helper_reply(job: Job, outcome: HelperOutcome) -> Reply:
    context = dict(job.context)
    if outcome.image_base64 and outcome.image_type and channel_facts(job.channel).carries_images:
        context.update(image_base64=outcome.image_base64, image_type=outcome.image_type)
    return job.reply(outcome.text, outcome.name, "helper", context=context,
                     finish_reason="stop" if outcome.ok else "fallback")  # fmt: skip


def _tool_instruction(helpers: list[HelperInfo]) -> str:
    listed = "\n".join(f"- {h.name}: {h.description}" for h in helpers)
    return (
        "\n\nYou can use these helpers:\n" + listed + "\nTo use one, reply with only a JSON "
        'object such as {"helper": "NAME", "input": "TEXT"} and nothing else.'
    )


def _planned(job: Job, planned: HelperCall | HelperOutcome) -> Reply | HelperCall:
    return planned if isinstance(planned, HelperCall) else _helper_reply(job, planned)


def _route(
    job: Job, engine: Engine, helpers: HelperGateway, offer_tools: bool, on_text: TextSink | None
) -> Reply | HelperCall | None:
    explicit = parse_explicit(job.prompt)
    if explicit is not None:
        name, text = explicit
        return _planned(job, helpers.plan(name, text, job))
    if job.media:
        fitting = helpers.for_media(job.media)
        if fitting is not None:
            return _planned(job, helpers.plan(fitting.name, job.prompt, job))
        if not job.prompt.strip():
            text = "I can't look at pictures right now. Please ask your question in words."
            return _helper_reply(job, HelperOutcome("none", text, ok=False))
    live = helpers.live() if offer_tools else []
    if not live:
        return None
    return _answer_with_tools(job, engine, helpers, live, on_text)


def _answer_with_tools(
    job: Job, engine: Engine, helpers: HelperGateway, live: list[HelperInfo],
    on_text: TextSink | None,
) -> Reply | HelperCall | None:  # fmt: skip
    """Offer the live helpers; if the model asks for one, plan its call (the model answers
    with its outcome in `answer_after_helper`)."""
    messages = list(job.messages)
    instruction = _tool_instruction(live)
    if messages[0].role == "system":
        messages[0] = ChatMessage(role="system", content=messages[0].content + instruction)
    else:
        messages.insert(0, ChatMessage(role="system", content=instruction.strip()))
    first = engine.generate(messages, job.options)
    call = parse_tool_call(first.text, {h.name for h in live})
    if call is None:
        return None if not first.text.strip() else _model_reply(job, engine, first, on_text)
    offered = job.model_copy(update={"messages": messages})
    planned = helpers.plan(call[0], call[1], offered, tool_call=first.text.strip())
    if isinstance(planned, HelperCall):
        return planned
    then = AfterHelper(helper=call[0], job=offered, tool_call=first.text.strip())
    return answer_after_helper(then, planned, engine, on_text)


def _model_reply(
    job: Job, engine: Engine, generation: Generation, on_text: TextSink | None
) -> Reply:
    text = generation.text.strip()
    if on_text is not None:
        on_text(text)
    return job.reply(text, engine.model_name, engine.name,
                 finish_reason=generation.finish_reason,
                 prompt_tokens=generation.prompt_tokens,
                 completion_tokens=generation.completion_tokens)  # fmt: skip


def generate_reply(
    job: Job, engine: Engine, worker: str = "", on_text: TextSink | None = None
) -> Reply:
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
    except GenerationTimeLimitError:
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
    return job.reply(
        text,
        engine.model_name,
        engine.name,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        worker=worker,
        duration_ms=(time.monotonic() - started) * 1000,
    )
