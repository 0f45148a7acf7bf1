"""The ``gpt4people`` command: up, ask, worker, status, models and the rest.

Errors an operator can fix (a bad setting, Redis down, no worker) end with a
one-line message and a distinct exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Sequence

from kernel.catalogue import BUNDLED_MODELS
from kernel.channels import delivered_channels
from kernel.logs import configure_logging
from kernel.model_files import ModelNotFoundError
from kernel.redis_urls import redact_text, scrub, url_secrets
from kernel.settings import Settings, SettingsError, get_settings

EXIT_SETTINGS = 2
EXIT_REDIS = 3
EXIT_TIMEOUT = 4
EXIT_FAILED = 5


class CliError(Exception):
    """A failure reported as one line on stderr with an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from gpt4people.supervisor import StackError, run_stack
    from kernel.model_files import resolve_model_path
    from kernel.redis_client import RedisUnavailableError

    if args.workers and settings.engine == "llama":
        resolve_model_path(settings)  # assemble the default model once, with progress, up front
    try:
        return run_stack(settings, args.workers)
    except RedisUnavailableError as error:
        raise CliError(str(error), EXIT_REDIS) from None
    except StackError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from kernel.contract import (
        INFERENCE_QUEUE,
        ChatMessage,
        GenerationOptions,
        Job,
        gpu_queue,
        model_queue,
    )
    from kernel.redis_client import RedisUnavailableError, ping
    from workers.app import app
    from workers.client import JobFailedError, JobTimeoutError, submit, wait_for_reply

    prompt = " ".join(args.prompt).strip()
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    if not prompt:
        raise CliError("nothing to ask: give a prompt, or - to read it from stdin", EXIT_SETTINGS)
    if len(prompt) > settings.max_prompt_chars:
        raise CliError(
            f"the prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars} "
            "(GPT4P_MAX_PROMPT_CHARS)",
            EXIT_SETTINGS,
        )
    job = Job(
        channel="cli",
        user=getpass.getuser(),
        messages=[ChatMessage(role="user", content=prompt)],
        options=GenerationOptions(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            priority=args.priority,
        ),
        reply_to="cli",
    )
    timeout = args.timeout or settings.job_timeout
    queue = gpu_queue(args.gpu) if args.gpu is not None else INFERENCE_QUEUE
    if args.model:
        queue = model_queue(args.model)
    try:
        ping(str(app.conf.broker_url), timeout=3)
        submit(app, job, queue=queue)
        reply = wait_for_reply(app, job.id, timeout)
    except RedisUnavailableError as error:
        raise CliError(
            f"{error}. Start the stack with `gpt4people up`, or set GPT4P_REDIS_URL.", EXIT_REDIS
        ) from None
    except JobTimeoutError as error:
        raise CliError(
            f"{error}; is a worker consuming {queue}? (`gpt4people status`)", EXIT_TIMEOUT
        ) from None
    except JobFailedError as error:
        raise CliError(str(error), EXIT_FAILED) from None
    if args.json:
        print(reply.model_dump_json(indent=2))
    else:
        print(reply.text)
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from answer.engines import batches
    from kernel.contract import (
        INFERENCE_QUEUE,
        gpu_queue,
        interactive_queue,
        model_queue,
        worker_queue,
    )
    from kernel.model_files import model_aliases, model_label
    from workers.commandline import (
        celery_command,
        inference_worker_arguments,
        mark_inference_worker,
    )

    if args.gpus is not None:
        return _run_gpu_workers(args)
    # The model's queue, and its older names' (`ask --model gemma-3-270m-q4_k_m`).
    names = [model_label(settings), *model_aliases(settings)]
    queues = [INFERENCE_QUEUE, *(model_queue(name) for name in names)]
    hostname = args.hostname or "worker@%h"
    concurrency = args.concurrency or settings.worker_concurrency
    if args.gpu is not None:
        # Set before llama.cpp is imported anywhere: the pool processes inherit both.
        device = args.cuda_device if args.cuda_device is not None else args.gpu
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
        os.environ["GPT4P_GPU"] = str(args.gpu)  # offload all layers unless told otherwise
        queues.append(gpu_queue(args.gpu))
        hostname = args.hostname or f"gpu{args.gpu}@%h"
        concurrency = 1  # unbatched: one inference at a time per GPU
    if settings.engine == "llama":
        from kernel.model_files import resolve_model_path

        resolve_model_path(settings)  # assemble the default model in the parent, once
    mark_inference_worker(os.environ)
    if batches(settings):
        # Its own queue first: the next turns of the conversations its cache holds.
        from celery.utils.nodenames import default_nodename, host_format

        # Named as Celery names the worker ("cpu1" is celery@cpu1).
        queues.insert(0, worker_queue(host_format(default_nodename(hostname))))
    # Each queue's fast lane first: the worker takes interactive jobs before the others.
    queues = [*(interactive_queue(queue) for queue in queues), *queues]
    command = celery_command(*inference_worker_arguments(settings, queues, hostname, concurrency))
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached


def _run_gpu_workers(args: argparse.Namespace) -> int:
    """One pinned worker per GPU found, supervised until Ctrl-C or SIGTERM."""
    from gpt4people.gpus import NoGpuError, detect_gpus
    from gpt4people.supervisor import Child, supervise

    if args.gpus != "all":
        raise CliError("--gpus takes 'all' (or use --gpu N for one GPU)", EXIT_SETTINGS)
    try:
        indexes = detect_gpus()
    except NoGpuError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None
    children = [
        Child(f"gpu{i}", [sys.executable, "-m", "gpt4people.cli", "worker", "--gpu", str(i)])
        for i in indexes
    ]
    print(f"gpt4people: starting {len(children)} pinned worker(s): GPUs {indexes}", flush=True)
    return supervise(children)


def _cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    from workers.commandline import celery_command, delivery_worker_arguments

    hostname = args.hostname or "deliver@%h"
    arguments = delivery_worker_arguments(args.channels, hostname, args.concurrency,
                                          settings.log_level)  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, celery_command(*arguments))
    return 0  # not reached


# Flower options an inherited environment must not decide: the address and the login are
# GPT4People's settings, checked before Flower starts.
FLOWER_ENV_OVERRIDES = ("FLOWER_ADDRESS", "FLOWER_PORT", "FLOWER_BASIC_AUTH",
                        "FLOWER_UNAUTHENTICATED_API")  # fmt: skip


def _cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from gpt4people.supervisor import StackError, check_flower_exposure
    from workers.app import app

    try:
        check_flower_exposure(settings)
    except StackError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None
    for name in FLOWER_ENV_OVERRIDES:
        os.environ.pop(name, None)
    if settings.flower_basic_auth is not None:
        # Flower reads FLOWER_BASIC_AUTH from the environment: set in this process, it is
        # on no command line (every user's `ps`) and not even in /proc/PID/environ.
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    # Flower asks the workers what they run as it starts, before they are up: the failed
    # inspections it warns of are the normal start of a stack.
    logging.getLogger("flower.inspector").setLevel(logging.ERROR)
    login = " (login: GPT4P_FLOWER_BASIC_AUTH)" if settings.flower_basic_auth else ""
    logging.getLogger("gpt4people.flower").info(
        "Flower on http://%s:%s/%s", settings.flower_host, settings.flower_port, login
    )
    # In this process, whose logging is set up: tornado then keeps our handler (it adds
    # its own only to a root logger with none), so Flower's lines are in our format.
    # --quiet: no banner (its list of tasks is a wall of lines).
    app.start(["--quiet", "flower", f"--port={settings.flower_port}",
               f"--address={settings.flower_host}",
               f"--logging={settings.log_level.lower()}"])  # fmt: skip
    return 0


def _cmd_email(args: argparse.Namespace, settings: Settings) -> int:
    import signal as signals

    from channels.email.poller import EmailNotConfiguredError, MailboxPoller
    from workers.app import app, broker_redis

    try:
        poller = MailboxPoller(settings, broker_redis(), app)
    except EmailNotConfiguredError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None

    def stop(*_: object) -> None:
        poller.stop.set()

    signals.signal(signals.SIGTERM, stop)
    signals.signal(signals.SIGINT, stop)
    poller.run()
    return 0


def _cmd_telegram(args: argparse.Namespace, settings: Settings) -> int:
    import signal as signals

    from channels.telegram.poller import TelegramPollingError, UpdatePoller
    from workers.app import app, broker_redis

    def stop(*_: object) -> None:
        poller.interrupt()

    try:
        poller = UpdatePoller(settings, broker_redis(), app)
        signals.signal(signals.SIGTERM, stop)
        signals.signal(signals.SIGINT, stop)
        poller.prepare(delete_webhook=args.delete_webhook)
    except TelegramPollingError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None
    poller.run()
    return 0


def _cmd_helper(args: argparse.Namespace, settings: Settings) -> int:
    from helpers.worker import HelperNotFoundError, load_helper, run_helper_worker
    from workers.app import app

    try:
        helper = load_helper(args.name)
    except HelperNotFoundError as error:
        raise CliError(str(error), EXIT_SETTINGS) from None
    hostname = args.hostname or f"{helper.name}@%h"
    run_helper_worker(app, helper, hostname, args.concurrency, settings.log_level,
                      settings.helper_ttl)  # fmt: skip
    return 0


def _cmd_helpers(args: argparse.Namespace, settings: Settings) -> int:
    from kernel.helper_registry import HelperRegistry
    from kernel.redis_client import RedisUnavailableError, ping, redis_client, resolve_redis_url

    url = resolve_redis_url(settings)
    try:
        ping(url, timeout=3)
    except RedisUnavailableError as error:
        raise CliError(str(error), EXIT_REDIS) from None
    with redis_client(url, settings, socket_timeout=5) as client:
        helpers = HelperRegistry(client, ttl=settings.helper_ttl).all()
    if args.json:
        print(json.dumps([{**h.__dict__, "live": h.live} for h in helpers], indent=2))
        return 0
    if not helpers:
        print("no helpers registered (start one: gpt4people helper calc)")
    for h in helpers:
        state = f"live on {', '.join(h.instances)}" if h.live else "NOT RUNNING"
        print(f"{h.name:<10} {state}\n           {h.description}\n"
              f"           capabilities: {', '.join(h.capabilities) or '-'}"
              + (f"; accepts: {', '.join(h.accepts)}" if h.accepts else ""))  # fmt: skip
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from gpt4people.status import collect_status, format_status

    if args.job:
        return _job_status(args, settings)
    report = collect_status(settings, timeout=args.timeout)
    text = json.dumps(report, indent=2) if args.json else format_status(report)
    print(scrub(text, _secrets(settings)))
    return 0 if report["redis"]["up"] else EXIT_REDIS


def _secrets(settings: Settings) -> set[str]:
    """Every password this process knows, in each form it could be written, to mask."""
    from kernel.redis_client import resolve_redis_url

    found = url_secrets(resolve_redis_url(settings))
    if settings.redis_sentinel_password is not None:
        found.add(settings.redis_sentinel_password.get_secret_value())
    return found


def _job_status(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from gpt4people.whereabouts import locate_jobs
    from kernel.redis_client import redis_client, resolve_redis_url

    try:
        with redis_client(resolve_redis_url(settings), settings, socket_timeout=5,
                          socket_connect_timeout=3) as client:  # fmt: skip
            found = locate_jobs(client, args.job)
    except redis.RedisError as error:
        raise CliError(scrub(f"Redis unreachable ({error.__class__.__name__}: {error})",
                             _secrets(settings)), EXIT_REDIS) from None  # fmt: skip
    if args.json:
        print(json.dumps({job: dataclasses.asdict(where) for job, where in found.items()},
                         indent=2))  # fmt: skip
    else:
        print("\n".join(where.describe() for where in found.values()))
    return 0


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from gpt4people.models import InstallError, install, table

    if args.install is not None:
        unknown = [n for n in args.install if n not in BUNDLED_MODELS]
        if unknown:
            raise CliError(f"no bundled model named {unknown[0]!r}; one of: "
                           f"{', '.join(BUNDLED_MODELS)}", EXIT_SETTINGS)  # fmt: skip
        try:
            for path in install(settings, args.install):
                print(f"ready: {path}")
        except InstallError as error:
            raise CliError(str(error), EXIT_FAILED) from None
        return 0
    if args.json:
        from kernel.model_files import catalogue

        print(json.dumps([dataclasses.asdict(row) for row in catalogue(settings)], indent=2))
        return 0
    print(table(settings))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gpt4people``."""
    parser = argparse.ArgumentParser(
        prog="gpt4people",
        description="A language model people reach by SMS, email, HTTP and the command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the whole stack in the foreground (Ctrl-C stops it)")
    up.add_argument("--workers", type=int, default=1, help="inference workers (default 1; 0 ok)")
    up.set_defaults(handler=_cmd_up)

    ask = commands.add_parser("ask", help="send one prompt through the queue, print the reply")
    ask.add_argument("prompt", nargs="+", help="the prompt; - reads it from stdin")
    ask.add_argument("--max-tokens", type=int, help="cap on the answer's tokens")
    ask.add_argument("--temperature", type=float, help="sampling temperature (0-2)")
    ask.add_argument("--seed", type=int, help="sampling seed, for a reproducible answer")
    ask.add_argument("--timeout", type=float, help="seconds to wait (default GPT4P_JOB_TIMEOUT)")
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    ask.add_argument("--priority", choices=["interactive", "normal", "bulk"],
                     help="how soon (default: the cli channel's, interactive)")  # fmt: skip
    target = ask.add_mutually_exclusive_group()
    target.add_argument("--gpu", type=int, help="send it to the worker pinned to this GPU")
    target.add_argument("--model", help="send it to a worker serving this model")
    ask.set_defaults(handler=_cmd_ask)

    worker = commands.add_parser("worker", help="run one inference worker in the foreground")
    pin = worker.add_mutually_exclusive_group()
    pin.add_argument("--gpu", type=int, help="pin to this GPU and also consume its queue")
    pin.add_argument("--gpus", metavar="all", help="one pinned worker per GPU found (all)")
    worker.add_argument(
        "--cuda-device", type=int,
        help="CUDA index to use for --gpu N when they differ (in a container the one "
        "reserved GPU is 0)",
    )  # fmt: skip
    worker.add_argument("--hostname", help="Celery node name (default worker@%%h or gpuN@%%h)")
    worker.add_argument(
        "--concurrency", type=int, help="processes (default GPT4P_WORKER_CONCURRENCY)"
    )
    worker.set_defaults(handler=_cmd_worker)

    helper = commands.add_parser("helper", help="run one helper (calc, image, time or a module)")
    helper.add_argument("name", help="a built-in helper name, or a module path: pkg.mod[:attr]")
    helper.add_argument("--hostname", help="Celery node name (default NAME@%%h)")
    helper.add_argument("--concurrency", type=int, default=2, help="processes (default 2)")
    helper.set_defaults(handler=_cmd_helper)

    helpers = commands.add_parser("helpers", help="list registered helpers and their instances")
    helpers.add_argument("--json", action="store_true", help="print the list as JSON")
    helpers.set_defaults(handler=_cmd_helpers)

    flower = commands.add_parser(
        "flower", help="run Flower (GPT4P_FLOWER_HOST, GPT4P_FLOWER_PORT, GPT4P_FLOWER_BASIC_AUTH)"
    )
    flower.set_defaults(handler=_cmd_flower)

    email = commands.add_parser("email", help="answer mail: watch the IMAP mailbox (GPT4P_IMAP_*)")
    email.set_defaults(handler=_cmd_email)

    telegram = commands.add_parser(
        "telegram", help="answer Telegram by long polling (GPT4P_TELEGRAM_BOT_TOKEN)"
    )
    telegram.add_argument(
        "--delete-webhook", action="store_true",
        help="remove the bot's webhook first (Telegram answers no polling while one is set)",
    )  # fmt: skip
    telegram.set_defaults(handler=_cmd_telegram)

    deliver = commands.add_parser(
        "deliver", help="send replies out (SMS, email) from the deliver.* queues"
    )
    delivered = [c.name for c in delivered_channels()]
    deliver.add_argument(
        "--channels", nargs="+", default=delivered, choices=delivered,
        help=f"channels to deliver for (default: {' '.join(delivered)})",
    )  # fmt: skip
    deliver.add_argument("--hostname", help="Celery node name (default deliver@%%h)")
    deliver.add_argument("--concurrency", type=int, default=4, help="sending processes")
    deliver.set_defaults(handler=_cmd_deliver)

    models = commands.add_parser("models", help="list the bundled models (GPT4P_MODEL), "
                                 "installed or not; --install fetches them")  # fmt: skip
    models.add_argument("--install", nargs="*", metavar="NAME",
                        help="install these bundled models (none named: all) and prepare "
                        "their files")  # fmt: skip
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.set_defaults(handler=_cmd_models)

    status = commands.add_parser("status", help="show Redis, workers, queue depths and the model")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for workers")
    status.add_argument(
        "--job", action="append", metavar="ID",
        help="where this job is instead: queued, held by a worker, ledgered, answered, "
        "delivered (repeatable; an SMS job is sms-<MessageSid>)",
    )  # fmt: skip
    status.set_defaults(handler=_cmd_status)
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, "workers", 0) is not None and getattr(args, "workers", 0) < 0:
        parser.error("--workers must be 0 or more")
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not 0 <= temperature <= 2:
        parser.error("--temperature must be between 0 and 2")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpt4people`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    try:
        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)
        return int(args.handler(args, settings))
    except (SettingsError, ModelNotFoundError) as error:
        print(f"gpt4people: {redact_text(str(error))}", file=sys.stderr)
        return EXIT_SETTINGS
    except CliError as error:
        print(f"gpt4people: {redact_text(str(error))}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
