"""The batched llama.cpp engine: many jobs decoded together, continuously.

One engine per worker process owns the model and one llama.cpp context with a
KV-cache sequence per slot (GPT4P_PARALLEL slots of GPT4P_N_CTX tokens each).
Its thread runs the decode loop: every step puts the next token of every
generating job, plus chunks of the prompts of jobs that just arrived, into one
``llama_batch`` and calls ``llama_decode`` once. Jobs join between steps and
leave when they finish; each keeps its own sampler (temperature, top-p, seed),
stop strings, token limit and deadline. The Celery task threads call
:meth:`BatchedLlamaEngine.generate`, which hands the job over and waits for
its text (streamed back through a queue, so ``on_text`` runs in the task's
own thread; gathered for TEXT_INTERVAL_S, so a task thread wakes some 20 times
a second rather than once per token).

Priorities: while an interactive job (`options.priority`: a person waiting) is in the
batch, a step decodes only the interactive jobs. A person's message that arrives while
long generations fill the batch joins at the next step and is generated as fast as on an
idle model; the others keep their slots and caches, paused, their time limit stopped (up
to the hard limit, GPT4P_TASK_TIME_LIMIT), and go on when it is answered. Normal and bulk
jobs share the batch alike (their order is the queue's business): the batch never idles
while there is work. GPT4P_PRIORITY_SLOTS slots beyond GPT4P_PARALLEL are there for
interactive jobs: the worker fills them only from its queues' fast lanes.

Prefix cache: a slot keeps the tokens of its last job in its KV sequence; a
new job goes to the free slot that shares the longest prefix with its prompt
(a conversation's next turn finds its history there) and only the rest is
evaluated.

A job with a grammar (``options.grammar``: JSON, a schema, tool calls) has its own
grammar sampler in its own chain: the token the job would pick anyway is checked
against the grammar first, and only when the grammar refuses it is the grammar applied
to the whole vocabulary (llama.cpp's common sampler does the same), so the other jobs
of the batch never see it. That pass runs over the whole vocabulary in one C call and
costs more the more ways the grammar can go on (an ambiguous schema): a pass over
GRAMMAR_STEP_BUDGET_S, or a job's grammar work past its budget in all, ends that
job with `GrammarTooSlowError`, and at most GRAMMAR_JOBS jobs with a grammar decode at once
(the others wait for a slot), since every job in the batch waits for each step. With
``options.logprobs`` a job also gets each token's log
probability in the model's distribution at that step, and the most likely tokens there.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp._logger import set_verbose

from answer.engines import (
    Generation,
    GenerationTimeLimitError,
    GrammarTooSlowError,
    TextDelta,
    TextSink,
    batch_slots,
    offloaded_layers,
)
from answer.engines.prompting import PromptFitter
from answer.engines.vocabulary import special_tokens
from answer.guard import AnswerGuard
from kernel.contract import ChatMessage, GenerationOptions, TokenLogprob, TopLogprob
from kernel.model_files import model_label, resolve_model_path
from kernel.settings import Settings

log = logging.getLogger(__name__)

# The sampler chain of llama-cpp-python's create_completion, with its defaults.
TOP_K = 40
MIN_P = 0.05
DEFAULT_TOP_P = 0.95
BATCH_TOKENS = 512  # tokens per llama_decode call (prompt chunks + one per generating job)
# A job's text is handed to its task thread at most this often (the first piece at once):
# waking a thread per token takes a core from the decode on a small machine.
TEXT_INTERVAL_S = 0.05
# After the last interactive job of a batch ends, the others stay paused this long: the
# answer still has its way out (its result stored, its delivery task, the SMS or HTTP
# send), and on a small CPU a batch resuming at once takes the cores from it.
PAUSE_AFTER_INTERACTIVE_S = 0.1
# A job paused this long in all (a steady stream of interactive work) is no longer paused:
# it goes on beside the interactive jobs, so no job waits for ever.
MAX_PAUSE_S = 30.0
# A grammar's pass over the whole vocabulary runs in the engine thread, so every job of the
# batch waits for it: one pass over this ends the job, and so does grammar work in all
# (passes, checks and accepts) past GRAMMAR_JOB_BUDGET_S plus GRAMMAR_TOKEN_BUDGET_S per token
# generated (a long answer to a plain schema costs some 15 ms a token on a small CPU); at most
# GRAMMAR_JOBS jobs with a grammar decode at once.
GRAMMAR_STEP_BUDGET_S = 0.25
GRAMMAR_JOB_BUDGET_S = 3.0
GRAMMAR_TOKEN_BUDGET_S = 0.05
GRAMMAR_JOBS = 2
# _logprob looks for the likeliest tokens through the largest logit of each block of this many.
LOGPROB_BLOCK = 256
FinishReason = Literal["stop", "length"]
# One token's log probability and the most likely (token, log probability) at its step,
# as the engine thread records it; the caller's thread makes the `TokenLogprob`s.
RawLogprob = tuple[int, float, list[tuple[int, float]]]
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class EngineStoppedError(RuntimeError):
    """The engine was stopped while a job waited for it."""


_STDERR = threading.Lock()


def init_grammar(vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler for the GBNF `grammar`, or None when llama.cpp refuses it.

    llama.cpp prints a grammar it cannot parse, whole, to stderr (fprintf, not its log
    callback, so `set_verbose` cannot stop it): the caller's enum values and property names
    would land in the worker's log. So stderr goes to a temporary file during the parse and
    comes back only when the grammar was accepted; a refusal is logged in one line.
    """
    with _STDERR, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if not sampler:
            log.error("llama.cpp refused a grammar of %d characters (not logged)", len(grammar))
            return None
        captured.seek(0)
        if text := captured.read():  # what other threads wrote meanwhile
            os.write(2, text)
        return sampler


@dataclass
class _Request:
    """One job handed to the engine thread."""

    tokens: list[int]
    max_tokens: int
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None
    deadline: float
    ignore_eos: bool = False
    grammar: str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    guard: AnswerGuard | None = None  # where the answer stops being one (answer.guard)
    urgent: bool = False  # interactive: while one is in the batch, the others pause
    paused_s: float = 0.0  # how long it has been paused in all (MAX_PAUSE_S)
    latest: float = 0.0  # the deadline may move while the job is paused, not past this
    events: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    unsent: list[str] = field(default_factory=list)  # text not yet handed to the caller
    unsent_logprobs: list[RawLogprob] = field(default_factory=list)  # and its tokens'
    sent_at: float | None = None  # when text was last handed over (None: the first goes now)
    grammar_s: float = 0.0  # time spent in the job's grammar so far


@dataclass
class _Slot:
    """One KV-cache sequence and the job using it, if any."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    request: _Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, to be decoded in the next step
    sampler: Any = None
    grammar: Any = None  # the job's grammar sampler, outside `sampler`
    decoder: Any = None
    text: str = ""
    emitted: int = 0
    logprobs: list[RawLogprob] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)  # where each token's text ends
    logprobs_emitted: int = 0
    generated: int = 0
    logits_index: int = -1


def _stop_hold(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string (held back)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class BatchedLlamaEngine:
    """One GGUF model, one context, GPT4P_PARALLEL jobs decoded together."""

    name = "llama"

    def __init__(self, model: LlamaModel, settings: Settings, model_name: str) -> None:
        self._model = model
        self._settings = settings
        self.model_name = model_name
        self.parallel = batch_slots(settings)
        self._vocab = llama_cpp.llama_model_get_vocab(model.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        metadata = model.metadata()
        template = metadata.get("tokenizer.chat_template") or None
        special = special_tokens(self._vocab, self._n_vocab, self._piece_text, template)
        # The tokens that end an answer: end of generation, and any token that is not text.
        self._ends = special.never_text
        self._fitter = PromptFitter(settings, template,
                                    self._tokenize, self._piece_text, model.token_bos(),
                                    model.token_eos(), special.markers)  # fmt: skip
        self.chat_template = self._fitter.chat_template
        threads = settings.n_threads or os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx * self.parallel
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = self.parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        # One KV stream per sequence: a job attends to its own tokens only.
        params.kv_unified = False
        # Full-size sliding-window caches, so a kept prefix stays usable (Gemma 3).
        params.swa_full = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.model, params)
        if ctx is None:
            raise RuntimeError("llama.cpp could not create a context (KV cache too large?)")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(seq) for seq in range(self.parallel)]
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()  # grammar jobs kept out by GRAMMAR_JOBS
        self._scratch = np.empty(self._n_vocab, dtype=np.float32)  # for _logprob
        self._blocks = np.arange(0, self._n_vocab, LOGPROB_BLOCK)
        self._stopped = threading.Event()
        self._eog_tokens: list[int] | None = None
        self.text_interval = TEXT_INTERVAL_S
        self._urgent_until = 0.0  # the others stay paused until then (an interactive job ran)
        self.steps = 0  # llama_decode calls, for tests and metrics
        self.reused_tokens = 0  # prompt tokens found in the prefix cache
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: Settings, path: Path | None = None) -> BatchedLlamaEngine:
        """Load the configured GGUF once and start the decode loop."""
        path = path or resolve_model_path(settings)
        started = time.monotonic()
        gpu_layers = offloaded_layers(settings)
        set_verbose(False)  # llama.cpp's own log: errors only, as Llama(verbose=False) does
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # Repacked CPU weights use one kernel for a lone token and another for groups of
        # four: faster, but a token's logits then depend on the batch it is in.
        params.use_extra_bufts = not settings.batch_invariant
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
        engine = cls(model, settings, model_label(settings))
        log.info(
            "model loaded: %s in %.2fs (batched: %d slots + %d for interactive jobs, of %d "
            "tokens each, gpu_layers=%d)", path.name, time.monotonic() - started,
            settings.parallel, settings.priority_slots, settings.n_ctx, gpu_layers,
        )  # fmt: skip
        return engine

    # Tokens and text

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos, special))

    def _piece(self, token: int, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special)
        return buffer.raw[: max(n, 0)]

    def _piece_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="ignore")

    @property
    def busy_slots(self) -> int:
        """Slots with a job in them now."""
        return sum(1 for slot in self._slots if slot.request is not None)

    # The callers' side

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Complete the conversation with the others in flight; stream text into `on_text`.

        Raises `GenerationTimeLimitError` past GPT4P_TASK_SOFT_TIME_LIMIT (the text so far has
        gone to `on_text`): a threads pool has no time limits, so the engine keeps its own.
        """
        settings = self._settings
        prompt, tokens, max_tokens = self._fitter.fit(messages, options)
        now = time.monotonic()
        request = _Request(
            tokens=tokens,
            max_tokens=max_tokens,
            # ignore_eos also ignores the template's end-of-turn strings, not the caller's.
            stop=[s for s in [*([] if options.ignore_eos else prompt.stop), *options.stop] if s],
            temperature=settings.temperature if options.temperature is None
            else options.temperature,
            top_p=options.top_p if options.top_p is not None else DEFAULT_TOP_P,
            seed=options.seed if options.seed is not None else settings.seed,
            deadline=now + settings.task_soft_time_limit,
            # Paused behind more urgent jobs, a job's time stops, up to the hard time limit.
            latest=now + max(settings.task_soft_time_limit, settings.task_time_limit - 5),
            urgent=options.priority == "interactive",
            ignore_eos=options.ignore_eos,
            grammar=options.grammar,
            logprobs=options.logprobs,
            top_logprobs=options.top_logprobs if options.logprobs else 0,
            # A grammar's output is data, and ignore_eos asks for every token: no cut.
            guard=None if options.grammar is not None or options.ignore_eos else prompt.guard,
        )  # fmt: skip
        if self._stopped.is_set():
            raise EngineStoppedError("the engine is stopped")
        self._incoming.put(request)
        try:
            return self._wait(request, on_text)
        finally:
            request.cancelled.set()  # a caller that gave up frees its slot

    def _wait(self, request: _Request, on_text: TextSink | None) -> Generation:
        # The engine enforces the deadline (which moves while the job is paused); this is
        # only a guard against a dead engine.
        while True:
            guard = request.deadline + 60
            try:
                kind, value = request.events.get(timeout=max(0.1, guard - time.monotonic()))
            except queue.Empty:
                raise EngineStoppedError("the engine stopped answering") from None
            if kind == "text":
                text, raw = value
                if on_text is not None:
                    on_text(TextDelta(text, self._logprobs(raw)) if request.logprobs else text)
            elif kind == "done":
                generation, raw = value
                if request.logprobs:
                    return replace(generation, logprobs=self._logprobs(raw))
                return generation
            elif kind == "timeout":
                raise GenerationTimeLimitError("past GPT4P_TASK_SOFT_TIME_LIMIT")
            else:
                raise value  # an error from the engine thread

    def _top(self, token: int, logprob: float) -> TopLogprob:
        piece = self._piece(token)
        return TopLogprob(token=piece.decode("utf-8", errors="replace"), logprob=logprob,
                          bytes=list(piece))  # fmt: skip

    def _logprobs(self, raw: list[RawLogprob]) -> list[TokenLogprob]:
        """OpenAI's shape of the logprobs the engine thread recorded."""
        made = []
        for token, logprob, top in raw:
            sampled = self._top(token, logprob)
            made.append(TokenLogprob(**sampled.model_dump(),
                                     top_logprobs=[self._top(t, lp) for t, lp in top]))  # fmt: skip
        return made

    def close(self) -> None:
        """Stop the decode loop and free llama.cpp's memory."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._incoming.put(None)
        self._thread.join(30)
        for slot in self._slots:
            self._free_sampler(slot)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._model.close()

    # The engine thread

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._admit()
                if any(slot.request is not None for slot in self._slots):
                    self._step()
            except Exception as error:  # fail the jobs in flight, keep the engine
                log.exception("batched decode failed; failing the jobs in flight")
                for slot in self._slots:
                    if slot.request is not None:
                        slot.request.events.put(("error", error))
                        self._release(slot, keep=False)

    def _admit(self) -> None:
        """Move waiting jobs into free slots (block when there is nothing to do)."""
        busy = any(slot.request is not None for slot in self._slots)
        while True:
            free = [slot for slot in self._slots if slot.request is None]
            if not free:
                return
            request = self._next(block=not busy)
            if request is None:
                return
            self._start(request, free)
            busy = True

    def _next(self, block: bool) -> _Request | None:
        """The next job to start: grammar jobs kept waiting first, as soon as they may go."""
        grammars = sum(1 for slot in self._slots if slot.grammar is not None)
        for kept in list(self._waiting):
            if kept.cancelled.is_set():
                self._waiting.remove(kept)
            elif grammars < GRAMMAR_JOBS:
                self._waiting.remove(kept)
                return kept
        while True:
            try:
                request = self._incoming.get(block=block and not self._waiting,
                                             timeout=None if block else 0)  # fmt: skip
            except queue.Empty:
                return None
            if request is None:  # close()
                return None
            if request.cancelled.is_set():
                continue
            if request.grammar is not None and grammars >= GRAMMAR_JOBS:
                self._waiting.append(request)
                continue
            return request

    def _start(self, request: _Request, free: list[_Slot]) -> None:
        tokens = request.tokens

        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.cached, tokens, strict=False):
                if a != b:
                    break
                n += 1
            return n

        slot = max(free, key=shared)
        keep = min(shared(slot), len(tokens) - 1)  # at least one token gives the logits
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            keep = 0
        self.reused_tokens += keep
        slot.cached = tokens[:keep]
        slot.pending = tokens[keep:]
        slot.request = request
        slot.next_token = None
        slot.text, slot.emitted, slot.generated = "", 0, 0
        slot.logprobs, slot.token_ends, slot.logprobs_emitted = [], [], 0
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.sampler = self._sampler(request)
        if request.grammar is not None:
            slot.grammar = init_grammar(self._vocab, request.grammar)
            if slot.grammar is None:
                request.events.put(("error", ValueError("the grammar could not be parsed")))
                self._release(slot, keep=True)

    def _sampler(self, request: _Request) -> Any:
        if request.temperature <= 0:
            return None  # greedy: _greedy, no sampler state
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if request.ignore_eos and request.grammar is None:  # a grammar decides where it ends
            llama_cpp.llama_sampler_chain_add(chain, self._no_eog_sampler())
        seed = request.seed if request.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(TOP_K),
            llama_cpp.llama_sampler_init_top_p(request.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
            llama_cpp.llama_sampler_init_temp(request.temperature),
            llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF),
        ):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def _eog(self) -> list[int]:
        """Every token that ends an answer: end of generation, or not text (listed once)."""
        if self._eog_tokens is None:
            self._eog_tokens = [int(t) for t in np.flatnonzero(self._ends)]
        return self._eog_tokens

    def _no_eog_sampler(self) -> Any:
        """A logit bias that never picks an end-of-generation token."""
        eog = self._eog()
        biases = (llama_cpp.llama_logit_bias * len(eog))()
        for i, token in enumerate(eog):
            biases[i] = llama_cpp.llama_logit_bias(token, float("-inf"))
        return llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases)

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None
        if slot.grammar is not None:
            llama_cpp.llama_sampler_free(slot.grammar)
            slot.grammar = None

    def _step(self) -> None:
        """One llama_decode over the active jobs (only the interactive ones while there are
        any: the others pause, their time limit stopped); then sample and hand out text."""
        now = time.monotonic()
        for slot in self._slots:
            request = slot.request
            if request is None:
                continue
            if request.cancelled.is_set():
                self._release(slot, keep=True)
            elif now >= request.deadline:
                self._flush(slot, final=True)
                request.events.put(("timeout", None))
                self._release(slot, keep=True)
        active = [slot for slot in self._slots if slot.request is not None]
        if not active:
            return
        urgent = [s for s in active if s.request is not None and s.request.urgent]
        # The others wait, but a job paused MAX_PAUSE_S in all runs beside urgent ones.
        others = [s for s in active if s.request is not None and not s.request.urgent]
        waiting = [s for s in others if s.request is not None and s.request.paused_s < MAX_PAUSE_S]
        running, paused = active, []
        if urgent:
            self._urgent_until = now + PAUSE_AFTER_INTERACTIVE_S
            running, paused = urgent + [s for s in others if s not in waiting], waiting
        elif now < self._urgent_until:
            # A person's answer is on its way out: give it the cores a moment longer.
            time.sleep(min(self._urgent_until - now, 0.005))
            self._paused(waiting, time.monotonic() - now)
            return
        batch, n = self._batch, 0
        added: list[tuple[_Slot, list[int]]] = []
        for slot in running:  # one token for every generating job first
            if slot.request is not None and slot.next_token is not None:
                n = self._add(batch, n, slot, [slot.next_token], logits=True)
                added.append((slot, [slot.next_token]))
                slot.next_token = None
        for slot in running:  # then prompt chunks, as far as the batch has room
            if slot.request is None or not slot.pending or n >= BATCH_TOKENS:
                continue
            chunk = slot.pending[: BATCH_TOKENS - n]
            slot.pending = slot.pending[len(chunk) :]
            n = self._add(batch, n, slot, chunk, logits=not slot.pending)
            added.append((slot, chunk))
        if n == 0:
            return
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        self.steps += 1
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot, tokens in added:
            slot.cached.extend(tokens)
        for slot, _ in added:
            if slot.logits_index >= 0 and slot.request is not None:
                self._sample(slot, slot.logits_index)
            slot.logits_index = -1
        self._paused(paused, time.monotonic() - now)

    @staticmethod
    def _paused(slots: list[_Slot], spent: float) -> None:
        """The jobs of `slots` waited `spent` seconds for interactive ones: their time
        limit stops."""
        for slot in slots:
            if slot.request is not None:
                slot.request.paused_s += spent
                slot.request.deadline = min(slot.request.deadline + spent, slot.request.latest)

    def _add(self, batch: Any, n: int, slot: _Slot, tokens: list[int], logits: bool) -> int:
        pos = len(slot.cached)
        for i, token in enumerate(tokens):
            batch.token[n] = token
            batch.pos[n] = pos + i
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq
            batch.logits[n] = 0
            n += 1
        if logits:
            batch.logits[n - 1] = 1
            slot.logits_index = n - 1
        return n

    def _greedy(self, request: _Request, logits: np.ndarray) -> int:
        """The most likely token (numpy's argmax: the same pick as llama.cpp's greedy
        sampler, without copying the vocabulary into a candidates array)."""
        token = int(logits.argmax())
        if request.ignore_eos and request.grammar is None and self._ends[token]:
            masked = logits.copy()
            masked[self._ends] = -np.inf
            token = int(masked.argmax())
        return token

    def _allows(self, grammar: Any, token: int, logit: float) -> bool:
        """Whether the grammar accepts `token` next (checked alone, cheaply)."""
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, logit, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(candidates))
        return bool(np.isfinite(data[0].logit))

    def _constrained(self, slot: _Slot, logits: np.ndarray, index: int) -> int | None:
        """The job's pick, within its grammar; None when the grammar allows no token.

        Raises `GrammarTooSlowError` when the grammar's pass over the vocabulary takes
        over GRAMMAR_STEP_BUDGET_S, or the job's grammar work passes its budget.
        """
        request = slot.request
        assert request is not None
        greedy = request.temperature <= 0
        token = (self._greedy(request, logits) if greedy
                 else llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index))  # fmt: skip
        started = time.monotonic()
        allowed = self._allows(slot.grammar, token, float(logits[token]))
        request.grammar_s += time.monotonic() - started
        if not allowed:
            # The grammar refuses the free pick: apply it to the whole vocabulary, then pick.
            array = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
            array["id"] = np.arange(self._n_vocab, dtype=np.int32)
            array["logit"] = logits
            array["p"] = 0.0
            data = array.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
            candidates = llama_cpp.llama_token_data_array(data, self._n_vocab, -1, False)
            started = time.monotonic()
            llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(candidates))
            spent = time.monotonic() - started
            request.grammar_s += spent
            if spent > GRAMMAR_STEP_BUDGET_S:
                raise GrammarTooSlowError(
                    f"its response format is too complex to follow ({spent:.2f} s for one "
                    f"token, the limit is {GRAMMAR_STEP_BUDGET_S} s)"
                )
            best = int(array["logit"].argmax())
            if not np.isfinite(array["logit"][best]):
                return None
            if greedy:
                token = int(array["id"][best])
            else:
                llama_cpp.llama_sampler_apply(slot.sampler, ctypes.byref(candidates))
                token = int(data[candidates.selected].id)
                llama_cpp.llama_sampler_accept(slot.sampler, token)
        started = time.monotonic()
        llama_cpp.llama_sampler_accept(slot.grammar, token)
        request.grammar_s += time.monotonic() - started
        tokens = slot.generated + 1
        if request.grammar_s > GRAMMAR_JOB_BUDGET_S + GRAMMAR_TOKEN_BUDGET_S * tokens:
            raise GrammarTooSlowError(
                f"its response format is too complex to follow ({request.grammar_s:.1f} s "
                f"for {tokens} tokens)"
            )
        return token

    def _logprob(self, logits: np.ndarray, token: int, top: int) -> RawLogprob:
        """`token`'s log probability in the model's distribution, and the `top` likeliest.

        This runs per token in the engine thread, where every job of the batch waits for
        it: float32 in a buffer kept for it, and the `top` likeliest found without sorting
        or partitioning the vocabulary (numpy's argpartition alone takes some 2 ms).
        """
        maxima = np.maximum.reduceat(logits, self._blocks)  # each block's largest logit
        peak = float(maxima.max())
        shifted = np.subtract(logits, peak, out=self._scratch)
        normaliser = peak + float(np.log(np.exp(shifted, out=shifted).sum()))
        best: list[tuple[int, float]] = []
        if top:
            # The top-th largest block maximum: at least `top` logits reach it, so the
            # `top` largest are among those that do (usually a few dozen).
            floor = np.partition(maxima, -top)[-top] if top <= len(maxima) else -np.inf
            ids = np.flatnonzero(logits >= floor)
            ids = ids[np.argsort(-logits[ids], kind="stable")[:top]]
            best = [(int(t), float(logits[t]) - normaliser) for t in ids]
        return token, float(logits[token]) - normaliser, best

    def _sample(self, slot: _Slot, index: int) -> None:
        request = slot.request
        assert request is not None
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        picked: int | None
        if slot.grammar is not None:
            try:
                picked = self._constrained(slot, logits, index)
            except GrammarTooSlowError as error:
                log.warning("grammar job ended: %s", error)
                request.events.put(("error", error))
                self._release(slot, keep=True)
                return
        elif request.temperature <= 0:
            picked = self._greedy(request, logits)
        else:
            picked = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, index)
        if picked is None or self._ends[picked]:
            self._finish(slot, "stop")
            return
        token = picked
        if request.logprobs:
            slot.logprobs.append(self._logprob(logits, token, request.top_logprobs))
        slot.generated += 1
        slot.text += slot.decoder.decode(self._piece(token))
        slot.token_ends.append(len(slot.text))
        for stop in request.stop:
            at = slot.text.find(stop, max(0, slot.emitted - len(stop)))
            if at >= 0:
                self._cut(slot, at)
                return
        if request.guard is not None:
            cut = request.guard.cut(slot.text, slot.emitted)
            if cut is not None:
                self._cut(slot, cut)
                return
        if slot.generated >= request.max_tokens:
            self._finish(slot, "length")
            return
        self._flush(slot, final=False)
        slot.next_token = token

    def _cut(self, slot: _Slot, at: int) -> None:
        """End the answer at `at`: the bytes of a character still being decoded go too."""
        slot.text = slot.text[:at]
        slot.decoder.reset()
        self._finish(slot, "stop")

    def _flush(self, slot: _Slot, final: bool) -> None:
        """Hand the caller the text that can no longer turn into a stop string
        (gathered for TEXT_INTERVAL_S unless `final`)."""
        request = slot.request
        assert request is not None
        if final:
            slot.text += slot.decoder.decode(b"", final=True)
        if final:
            end = len(slot.text)
        else:
            held = _stop_hold(slot.text, request.stop)
            if request.guard is not None:
                held = max(held, request.guard.hold(slot.text, slot.emitted))
            end = len(slot.text) - held
        if end > slot.emitted:
            request.unsent.append(slot.text[slot.emitted : end])
            slot.emitted = end
        if request.logprobs:
            # A token goes with the text once all of it is handed over (or, at the end, if
            # any of it is: a stop string may cut through it); tokens past a cut are dropped.
            done = slot.logprobs_emitted
            while done < len(slot.token_ends) and (
                slot.token_ends[done] <= end
                or (final and (slot.token_ends[done - 1] if done else 0) < end)
            ):
                done += 1
            request.unsent_logprobs.extend(slot.logprobs[slot.logprobs_emitted : done])
            slot.logprobs_emitted = done
        if request.unsent:
            now = time.monotonic()
            if final or request.sent_at is None or now - request.sent_at >= self.text_interval:
                request.events.put(("text", ("".join(request.unsent), request.unsent_logprobs)))
                request.unsent, request.unsent_logprobs = [], []
                request.sent_at = now

    def _finish(self, slot: _Slot, reason: FinishReason) -> None:
        request = slot.request
        assert request is not None
        self._flush(slot, final=True)
        generation = Generation(text=slot.text, finish_reason=reason,
                                prompt_tokens=len(request.tokens),
                                completion_tokens=slot.generated)  # fmt: skip
        request.events.put(("done", (generation, slot.logprobs[: slot.logprobs_emitted])))
        self._release(slot, keep=True)

    def _release(self, slot: _Slot, keep: bool) -> None:
        """Free the slot; `keep` leaves its tokens in the KV cache for the next turn."""
        self._free_sampler(slot)
        slot.request = None
        slot.pending = []
        slot.next_token = None
        slot.logits_index = -1
        if not keep:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            slot.cached = []
