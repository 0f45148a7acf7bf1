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
from answer.engines.grammar import grammar_for, offered_tools
from answer.routing import (
    AfterHelper,
    HelperCall,
    HelperGateway,
    HelperOutcome,
    parse_explicit,
)
from answer.tools import (
    HELPERS_HEADING,
    TOOLS_HEADING,
    StreamGate,
    as_text,
    calls_text,
    helper_input,
    helper_tools,
    instruction,
    may_be_call,
    parse_calls,
    with_instruction,
)
from kernel.channels import channel_facts
from kernel.contract import (
    ChatMessage,
    FinishReason,
    GenerationOptions,
    Job,
    Reply,
    TokenLogprob,
    ToolCall,
)
from kernel.helper_registry import HelperInfo
from kernel.settings import get_settings

log = logging.getLogger(__name__)

BLANK_FALLBACK = (
    "Sorry, I could not come up with an answer to that. Could you rephrase the question?"
)
TOO_LONG_REPLY = "Sorry, your message is too long for me to read ({reason}). Please shorten it."
TIMED_OUT_REPLY = "Sorry, that took me too long to answer. Please try a shorter question."
# A request the answer path cannot serve (a schema it cannot enforce, an unknown tool named):
# the HTTP API refuses those with a 400 before queueing; any other channel gets this.
REFUSED_REPLY = "Sorry, I cannot answer that request: {reason}."
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
    """Answer `job`: through a helper when one is named or fits its media, else the model
    (offered the live helpers as tools when `offer_tools`, unless the caller offers its own).

    A helper that must run is not waited for: its `HelperCall` is returned, for the
    caller to hand the job over (`workers.handover`) and `answer_after_helper` later.
    """
    if helpers is not None:
        routed = _route(job, engine, helpers, offer_tools and not job.options.tools, on_text)
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
    if (outcome.image_base64 and outcome.image_type
            and channel_facts(job.channel).sends_pictures(get_settings())):  # fmt: skip
        context.update(image_base64=outcome.image_base64, image_type=outcome.image_type)
    return job.reply(outcome.text, outcome.name, "helper", context=context,
                     finish_reason="stop" if outcome.ok else "fallback")  # fmt: skip


def _planned(job: Job, planned: HelperCall | HelperOutcome) -> Reply | HelperCall:
    return planned if isinstance(planned, HelperCall) else _helper_reply(job, planned)


def _route(
    job: Job, engine: Engine, helpers: HelperGateway, offer_tools: bool, on_text: TextSink | None
) -> Reply | HelperCall | None:
    if job.messages[-1].role != "user":
        return None  # a tool's answer or the assistant's words to continue: for the model
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
    live = helpers.live() if offer_tools and not job.options.raw_prompt else []
    if not live:
        return None
    return _answer_with_tools(job, engine, helpers, live, on_text)


def _answer_with_tools(
    job: Job, engine: Engine, helpers: HelperGateway, live: list[HelperInfo],
    on_text: TextSink | None,
) -> Reply | HelperCall:  # fmt: skip
    """Offer the live helpers as tools, the model's call held to the call grammar; if the
    model calls one, plan its call (the model answers with its outcome in
    `answer_after_helper`), else its words are the reply."""
    tools = helper_tools(live)
    messages = with_instruction(as_text(job.messages), instruction(tools, "auto", HELPERS_HEADING),
                                get_settings().system_prompt)  # fmt: skip
    offered = job.model_copy(update={"messages": messages})
    asking = offered.options.model_copy(
        update={"tools": tools, "tool_choice": "auto", "parallel_tool_calls": False}
    )
    reply = _generate(offered.model_copy(update={"options": asking}), engine, "", on_text,
                      instructed=True)  # fmt: skip
    if not reply.tool_calls:
        return reply
    call = reply.tool_calls[0]
    tool_call = calls_text([call])
    planned = helpers.plan(call.name, helper_input(call), offered, tool_call=tool_call)
    if isinstance(planned, HelperCall):
        return planned
    then = AfterHelper(helper=call.name, job=offered, tool_call=tool_call)
    return answer_after_helper(then, planned, engine, on_text)


def generate_reply(
    job: Job, engine: Engine, worker: str = "", on_text: TextSink | None = None
) -> Reply:
    """Generate the answer to `job`: text, or calls of the tools it offers (held to the
    grammar of its response format and tools); blank generations are retried, then
    replaced politely."""
    return _generate(job, engine, worker, on_text)


def _prepared(job: Job, instructed: bool) -> list[ChatMessage]:
    """The conversation as the engine gets it: tool calls and answers written as text, and
    the offered tools in the system prompt."""
    if job.options.raw_prompt:
        return list(job.messages)
    # A required call comes next whatever the tools answered: then no "answer in words".
    messages = as_text(job.messages, answer_next=job.options.tool_choice in {"auto", "none"})
    tools = offered_tools(job.options)
    if tools and not instructed:
        section = instruction(tools, job.options.tool_choice, TOOLS_HEADING)
        messages = with_instruction(messages, section, get_settings().system_prompt)
    return messages


def _refusal(job: Job, error: ValueError) -> str:
    """The sentence for a job that cannot be answered as asked (logged for the operator)."""
    log.warning("job %s cannot be answered as asked: %s", job.id, error)
    return REFUSED_REPLY.format(reason=str(error).rstrip("."))


def _generate(
    job: Job, engine: Engine, worker: str, on_text: TextSink | None, instructed: bool = False
) -> Reply:
    started = time.monotonic()
    try:
        tools = [] if job.options.raw_prompt else offered_tools(job.options)
        options = job.options.model_copy(update={"grammar": grammar_for(job.options)})
        messages = _prepared(job, instructed)
    except ValueError as error:
        text = _refusal(job, error)
        if on_text is not None:
            on_text(text)
        return job.reply(text, engine.model_name, engine.name, finish_reason="fallback",
                         worker=worker)  # fmt: skip
    # With tools, a call is never streamed as text: `gate` holds it back.
    gate = StreamGate(on_text, options.tool_choice) if tools else None
    sink = gate if gate is not None else on_text
    finish_reason: FinishReason
    produced: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] | None = None

    def collect(text: str) -> None:
        produced.append(text)
        if sink is not None:
            sink(text)

    try:
        generation: Generation = engine.generate(messages, options, collect)
        calls = parse_calls(generation.text, tools) if tools else []
        if not calls and not generation.text.strip():
            log.warning("blank generation for job %s; retrying once", job.id)
            produced.clear()
            generation = engine.generate(messages, _retry_options(options), collect)
            calls = parse_calls(generation.text, tools) if tools else []
        # A continuation (raw prompt, prefill) is joined to what came before by the caller:
        # its leading space is part of it.
        verbatim = options.raw_prompt or job.continues_answer
        text = "" if calls else generation.text if verbatim else generation.text.strip()
        finish_reason = "tool_calls" if calls else generation.finish_reason
        prompt_tokens, completion_tokens = generation.prompt_tokens, generation.completion_tokens
        logprobs = getattr(generation, "logprobs", None)
        if gate is not None and not calls and text:
            gate.release()  # text held back in case it was a call (it was not)
    except PromptTooLongError as error:
        log.info("job %s refused: %s", job.id, error)
        text = TOO_LONG_REPLY.format(reason=error)
        finish_reason, prompt_tokens, completion_tokens = "context_length_exceeded", 0, 0
    except ValueError as error:
        # The engine could not follow the job's grammar (llama.cpp refused it, or it was
        # too slow to follow): a sentence, and the slot is already free for the others.
        text = _refusal(job, error)
        finish_reason, prompt_tokens, completion_tokens = "fallback", 0, 0
        if on_text is not None:
            on_text(f"\n{text}")
    except GenerationTimeLimitError:
        # Out of time: what was generated so far beats nothing; an apology beats a traceback.
        partial = "".join(produced).strip()
        if gate is not None and may_be_call(partial):
            partial = ""  # half a call is no answer
        log.warning("job %s hit its time limit after %d characters", job.id, len(partial))
        text = f"{partial} …" if partial else TIMED_OUT_REPLY
        finish_reason, prompt_tokens, completion_tokens = "length", 0, 0
    if not text and not calls:
        log.warning("blank generation twice for job %s; sending the fallback", job.id)
        text, finish_reason = BLANK_FALLBACK, "fallback"
        if on_text is not None:
            on_text(text)
    return job.reply(
        text,
        engine.model_name,
        engine.name,
        finish_reason=finish_reason,
        tool_calls=calls,
        logprobs=logprobs,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        worker=worker,
        duration_ms=(time.monotonic() - started) * 1000,
    )
