"""What the outside review (issue 14) found sound, kept so: each test is an attack that fails.

The review tried every public door as an attacker would and found these closed:
picture links are never fetched (only Twilio's media host, whose credentials a
redirect to storage does not carry), forged webhooks are refused, nothing runs
a shell, the containers run as a user without privileges, and neither logs nor
metrics name a person. Each test plays the attack against real parts: one
stack for the module on its own Redis database (the web app, an echo inference
worker, the delivery worker and the real image helper; Twilio's REST API is the
recorder) and plain HTTP servers on loopback addresses that record every
request they get, standing for hosts an attacker would like us to call.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import itertools
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from PIL import Image
from twilio.request_validator import HMAC_SHA256, RequestValidator

from channels.sms.state import number_id
from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import INFERENCE_QUEUE, INFERENCE_TASK, MediaRef
from kernel.helper_registry import HelperRegistry
from kernel.media import MediaRefusedError, fetch_media
from kernel.settings import Settings
from tests.channels.test_sms import replies, text, wait_idle
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import (
    ROOT,
    base_env,
    emptied_database,
    redis_url,
    settings_of,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from workers.app import celery_for

DB_SEC_KEPT = 21  # DB_SEC_OPS + 1: this module's stack, on the session's Redis
ECHO, DELIVER, IMAGE = "echo@sec-kept", "deliver@sec-kept", "image@sec-kept"
# A host other than Twilio's (and than the web app's): all of 127.0.0.0/8 is loopback.
ELSEWHERE = "127.0.0.2"
# What the image helper says when it opened a picture; never said for a refused one.
DESCRIBED = "PNG image, 8×8 pixels"
# How a refusal of a picture is worded, whichever check refused it.
REFUSED = re.compile(r"only open pictures|not accepted|could not|can't|cannot", re.IGNORECASE)

_numbers = itertools.count(1)


def fresh_number() -> str:
    """A phone number no other test texts from."""
    return f"+1777{next(_numbers):07d}"


def small_png() -> bytes:
    """A real 8x8 PNG, which the image helper can describe."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = small_png()


# --- Plain HTTP servers that record who called them ----------------------------------------


@dataclass
class Hit:
    """One request a recording server received."""

    path: str
    authorization: str | None


Answer = Callable[[Hit], tuple[int, dict[str, str], bytes]]


def serve_png(_: Hit) -> tuple[int, dict[str, str], bytes]:
    """Answer any request with the PNG, as a storage host serving a picture would."""
    return 200, {"Content-Type": "image/png"}, PNG


@dataclass
class RecordingServer:
    """An HTTP server on a loopback address that records every request it gets."""

    answer: Answer
    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recorded(self) -> list[Hit]:
        """The requests received so far."""
        with self.lock:
            return list(self.hits)


def _recording_handler(server: RecordingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _answer(self) -> None:
            hit = Hit(self.path, self.headers.get("Authorization"))
            with server.lock:
                server.hits.append(hit)
            status, headers, body = server.answer(hit)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _answer

    return Handler


@contextlib.contextmanager
def recording_server(host: str, answer: Answer = serve_png) -> Iterator[RecordingServer]:
    """A `RecordingServer` on a free port of `host` until leaving."""
    recorder = RecordingServer(answer)
    server = ThreadingHTTPServer((host, 0), _recording_handler(recorder))
    recorder.url = f"http://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()


# --- The module's stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, twilio: TwilioRecorder
) -> dict[str, str]:
    """Settings of the module's processes: the echo engine, Twilio pointed at the recorder."""
    return base_env(
        tmp_path_factory.mktemp("sec-kept"),
        redis_url=redis_url(redis_server, DB_SEC_KEPT),
        engine="echo",
        **twilio.settings(),
        sms_retry_backoff="0.1",
    )


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Iterator[redis.Redis]:
    """A client of the module's database, empty at the start and at the end."""
    with emptied_database(env["GPT4P_REDIS_URL"]) as client:
        yield client


def start_image_helper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`gpt4people helper image` (its log is in the state folder)."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"{IMAGE}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "helper", "image", "--hostname", IMAGE,
         "--concurrency", "1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def web(env: dict[str, str], client: redis.Redis) -> Iterator[str]:
    """The image helper (live), the echo and delivery workers and the web app; its URL."""
    processes = [start_image_helper(env)]
    try:
        processes.append(start_worker(env, ECHO))
        processes.append(start_worker(env, DELIVER, command="deliver"))
        registry = HelperRegistry(client)
        wait_for(lambda: "image" in {h.name for h in registry.live()}, 90,
                 "the image helper to register", every=0.2)  # fmt: skip
        port = free_port()
        processes.append(start_web(env, port))
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            stop_process(process)


def ask_about_picture(web: str, url: str) -> tuple[int, str]:
    """POST a chat completion with a picture at `url`; the status and what the caller reads."""
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    response = httpx.post(f"{web}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": parts}]})  # fmt: skip
    body: dict[str, Any] = response.json()
    if response.status_code == 200:
        return 200, str(body["choices"][0]["message"]["content"])
    return response.status_code, str(body["error"]["message"])


def mms(web: str, twilio: TwilioRecorder, number: str, media_url: str) -> httpx.Response:
    """Post the signed webhook of an MMS from `number` with one PNG at `media_url`."""
    return text(web, twilio, number, "what is this?", NumMedia="1", MediaUrl0=media_url,
                MediaContentType0="image/png")  # fmt: skip


# --- Picture links: never fetched; MMS media from Twilio's host only ------------------------


def test_an_inline_picture_is_described_so_refusals_below_are_not_vacuous(web: str) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert ask_about_picture(web, url) == (200, DESCRIBED + ", RGB; no EXIF data.")


@pytest.mark.parametrize("where", ["twilio's host", "the same host", "another host"])
def test_an_image_url_link_is_never_fetched(web: str, twilio: TwilioRecorder, where: str) -> None:
    # Even a link to Twilio's own media host: fetching it would carry our Twilio login.
    name = f"link-{uuid.uuid4().hex}.png"
    twilio.media[name] = (PNG, "image/png")
    host = {"twilio's host": None, "the same host": "127.0.0.1", "another host": ELSEWHERE}[where]
    with recording_server(host or "127.0.0.1") as server:
        url = f"{twilio.url}/media/{name}" if host is None else f"{server.url}/{name}"
        status, answer = ask_about_picture(web, url)
        assert status in {200, 400, 422}, answer
        assert DESCRIBED not in answer and REFUSED.search(answer), answer
        assert server.recorded() == []
    assert name not in twilio.fetches


@pytest.mark.parametrize("url", ["file:///etc/passwd", "file://localhost/etc/passwd",
                                 "FILE:///etc/hostname", "ftp://127.0.0.1/x.png"])  # fmt: skip
def test_an_image_url_of_a_local_file_or_another_scheme_is_refused(web: str, url: str) -> None:
    status, answer = ask_about_picture(web, url)
    assert status in {200, 400, 422}, answer
    assert REFUSED.search(answer), answer
    assert "root:" not in answer and DESCRIBED not in answer


def test_mms_media_on_twilios_host_is_described(web: str, twilio: TwilioRecorder) -> None:
    name, number = f"mms-{uuid.uuid4().hex}.png", fresh_number()
    twilio.media[name] = (PNG, "image/png")
    assert mms(web, twilio, number, f"{twilio.url}/media/{name}").status_code == 200
    assert replies(twilio, number, 1)[0].startswith(DESCRIBED)
    assert twilio.fetches.count(name) == 1


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_mms_media_named_on_another_host_is_not_fetched(
    web: str, twilio: TwilioRecorder, client: redis.Redis, scheme: str
) -> None:
    # Twilio signed this form; the media URL in it still has to be on Twilio's host.
    number = fresh_number()
    with recording_server(ELSEWHERE) as server:
        media_url = f"{server.url}/stolen.png" if scheme == "http" else "file:///etc/passwd"
        webhook = mms(web, twilio, number, media_url)
        # Refused at the door (a 400, no reply) or by the image helper (a reply saying so).
        assert webhook.status_code in {200, 400}, webhook.text
        if webhook.status_code == 200:
            answer = replies(twilio, number, 1)[0]
            assert DESCRIBED not in answer and "root:" not in answer
            assert REFUSED.search(answer), answer
        wait_idle(client)
        assert server.recorded() == []


def twilio_media_host(storage: RecordingServer, login: str) -> Answer:
    """Twilio's media host: with our login, a redirect to the picture in storage."""

    def answer(hit: Hit) -> tuple[int, dict[str, str], bytes]:
        if hit.authorization != login:
            return 401, {"Content-Type": "application/json"}, b'{"code": 20003}'
        return 302, {"Location": f"{storage.url}/stored.png"}, b""

    return answer


@pytest.mark.parametrize("storage_host", [ELSEWHERE, "127.0.0.1"])
def test_a_redirect_from_twilios_media_host_is_followed_without_our_login(
    twilio: TwilioRecorder, storage_host: str
) -> None:
    sid, token = twilio.account_sid, twilio.auth_token
    login = "Basic " + base64.b64encode(f"{sid}:{token}".encode()).decode()
    with recording_server(storage_host) as storage:
        with recording_server("127.0.0.1", twilio_media_host(storage, login)) as media:
            settings = Settings(twilio_account_sid=sid, twilio_auth_token=token,
                                twilio_api_base=media.url)  # fmt: skip
            ref = MediaRef(url=f"{media.url}/Media/ME1", content_type="image/png")
            assert fetch_media(ref, settings) == PNG
            assert [h.authorization for h in media.recorded()] == [login]
        assert [h.authorization for h in storage.recorded()] == [None]


def test_a_redirect_from_twilios_media_host_to_a_local_file_is_refused(
    twilio: TwilioRecorder, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    redirect: Answer = lambda _: (302, {"Location": secret.as_uri()}, b"")  # noqa: E731
    with recording_server("127.0.0.1", redirect) as media:
        settings = Settings(twilio_account_sid=twilio.account_sid,
                            twilio_auth_token=twilio.auth_token,
                            twilio_api_base=media.url)  # fmt: skip
        ref = MediaRef(url=f"{media.url}/Media/ME2", content_type="image/png")
        with pytest.raises((httpx.HTTPError, MediaRefusedError)):
            fetch_media(ref, settings)
        assert len(media.recorded()) == 1


# --- Twilio's signature: every forgery is a 403 ---------------------------------------------


def forged(web: str, twilio: TwilioRecorder, number: str, forgery: str) -> httpx.Response:
    """Post the webhook of `number`'s text, altered as `forgery` says after or before signing."""
    url = f"{web}/sms"
    params, headers = twilio.webhook(url, number, "hello")
    signature = headers["X-Twilio-Signature"]
    sign = RequestValidator(twilio.auth_token).compute_signature
    if forgery == "empty signature":
        signature = ""
    elif forgery == "signed for another URL":
        signature = sign("https://attacker.example/sms", params)
    elif forgery == "signed for another path":
        signature = sign(f"{web}/sms/other", params)
    elif forgery == "body changed after signing":
        params = {**params, "Body": "/calc 6*7"}
    elif forgery == "media added after signing":
        params = {**params, "NumMedia": "1", "MediaUrl0": f"http://{ELSEWHERE}/x.png"}
    elif forgery == "field removed after signing":
        signature = sign(url, {**params, "FromCity": "Springfield"})
    elif forgery == "signature truncated":
        signature = signature[:-2]
    elif forgery == "one character changed":
        signature = ("A" if signature[0] != "A" else "B") + signature[1:]
    elif forgery == "signed with sha256":
        signature = RequestValidator(twilio.auth_token).compute_signature(url, params, HMAC_SHA256)
    return httpx.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=30)


@pytest.mark.parametrize("forgery", [
    "empty signature", "signed for another URL", "signed for another path",
    "body changed after signing", "media added after signing", "field removed after signing",
    "signature truncated", "one character changed", "signed with sha256",
])  # fmt: skip
def test_every_forged_webhook_is_a_403_and_nothing_is_sent(
    web: str, twilio: TwilioRecorder, client: redis.Redis, forgery: str
) -> None:
    number = fresh_number()
    response = forged(web, twilio, number, forgery)
    assert response.status_code == 403
    assert "hello" not in response.text and number not in response.text
    assert text(web, twilio, number, "genuine").status_code == 200
    replies(twilio, number, 1)
    wait_idle(client)
    assert twilio.delivered(number) == ["genuine"]


def _names(node: ast.AST) -> set[str]:
    """Every identifier and attribute name inside `node`."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
    return found


def test_the_signature_is_compared_in_constant_time() -> None:
    # Timing cannot be asserted without a clock: check the comparison is Twilio's own, whose
    # `compare` looks at every character whatever the first difference.
    tree = ast.parse((ROOT / "channels" / "sms" / "webhook.py").read_text())
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    secret = re.compile(r"signature|auth_token|token", re.IGNORECASE)
    naive = [
        ast.unparse(n) for n in compares
        if any(secret.search(name) for name in _names(n))
        and not all(isinstance(op, ast.Is | ast.IsNot) for op in n.ops)
    ]  # fmt: skip
    assert naive == [], "a signature or token compared with ==/!= (timing leak)"
    verify = next(n for n in ast.walk(tree)
                  if isinstance(n, ast.FunctionDef) and n.name == "verify_signature")  # fmt: skip
    assert {"RequestValidator", "validate"} <= _names(verify)
    assert "compare" in RequestValidator.validate.__code__.co_names


# --- Celery reads JSON only ------------------------------------------------------------------


class TouchOnLoad:
    """A pickle that creates a file when it is loaded: what an attacker would queue."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return Path.touch, (self.path,)


def test_a_pickled_job_on_the_queue_is_never_loaded(
    web: str, env: dict[str, str], client: redis.Redis, tmp_path: Path
) -> None:
    # Whoever can write to Redis can queue a message; a pickle would run their code.
    marker = tmp_path / "pickle-ran"
    app = celery_for(settings_of(env))
    try:
        app.send_task(INFERENCE_TASK, args=[TouchOnLoad(marker)], queue=INFERENCE_QUEUE,
                      serializer="pickle")  # fmt: skip
    finally:
        app.close()
    wait_for(lambda: client.llen(INFERENCE_QUEUE) == 0, 30, "the worker to take the message")
    # The same worker still answers (after the message it refused): it was not loaded.
    body = {"messages": [{"role": "user", "content": "still here?"}]}
    response = httpx.post(f"{web}/v1/chat/completions", json=body, timeout=60)
    assert response.json()["choices"][0]["message"]["content"] == "still here?"
    assert not marker.exists()


# --- No shell ---------------------------------------------------------------------------------

PACKAGES = ("kernel", "answer", "workers", "channels", "helpers", "gpt4people")
PRODUCT = [*(ROOT / package for package in PACKAGES), ROOT / "celeryconfig.py"]
SHELL_CALLS = frozenset({
    "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell", "pty.spawn", "platform.popen",
})  # fmt: skip
PROCESS_CALLS = frozenset({
    "subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
    "subprocess.check_output", "asyncio.create_subprocess_exec", "os.posix_spawn",
    "os.posix_spawnp", *(f"os.exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
    *(f"os.spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
})  # fmt: skip
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "/bin/sh", "/bin/bash", "/usr/bin/env"})


def _imported(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name, for every import of the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, imported: dict[str, str]) -> str | None:
    """The dotted name a call goes to (`sp.run` -> `subprocess.run`), when it is one."""
    if isinstance(node, ast.Name):
        return imported.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, imported)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_text(node: ast.expr) -> bool:
    """Whether an argument is a command line in one string (parsed by a shell, or meant to)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_text(node.left) or _is_text(node.right)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (node.func.attr == "format" and _is_text(node.func.value))
    )


def _starts_with_text(call: ast.Call) -> bool:
    """Whether a call's first argument (subprocess's command) is one string."""
    return bool(call.args) and _is_text(call.args[0])


def shell_uses(source: str) -> list[str]:
    """Every way `source` runs a shell: shell=True, os.system and kin, string commands, sh -c."""
    tree = ast.parse(source)
    imported, found = _imported(tree), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, imported) or ""
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value)
               for k in node.keywords):  # fmt: skip
            found.append(f"shell=: {where}")
        if name in SHELL_CALLS:
            found.append(f"{name}: {where}")
        if name.startswith("subprocess.") and name in PROCESS_CALLS and _starts_with_text(node):
            found.append(f"a command in one string: {where}")
        if name in PROCESS_CALLS:
            words = [c.value for a in node.args for c in ast.walk(a) if isinstance(c, ast.Constant)]
            if any(isinstance(w, str) and w in SHELLS for w in words):
                found.append(f"a shell program: {where}")
    return found


SHELL_SAMPLES = [
    "import os\nos.system('ls')",
    "import os as o\no.popen('ls')",
    "from os import system\nsystem('ls')",
    "import subprocess\nsubprocess.run('ls -l', shell=True)",
    "from subprocess import Popen as P\nP(['ls'], shell=1)",
    "import subprocess\nsubprocess.check_output(f'ls {x}')",
    "import subprocess\nsubprocess.call('ls ' + x)",
    "import subprocess\nsubprocess.run(['sh', '-c', 'ls'])",
    "import os\nos.execv('/bin/sh', ['sh', '-c', x])",
    "import asyncio\nasyncio.create_subprocess_shell('ls')",
]


@pytest.mark.parametrize("sample", SHELL_SAMPLES)
def test_the_shell_detector_sees_each_form(sample: str) -> None:
    assert shell_uses(sample), sample


def test_the_detector_accepts_an_argument_list() -> None:
    ok = "import subprocess, sys, os\nsubprocess.run([sys.executable, '-m', 'x'], shell=False)\n"
    assert shell_uses(ok + "os.execv(sys.executable, [sys.executable, '-m', 'celery'])") == []


def test_no_product_code_runs_a_shell() -> None:
    files = [p for root in PRODUCT for p in ([root] if root.is_file() else root.rglob("*.py"))]
    assert len(files) > 20  # the packages were found
    found = {str(p.relative_to(ROOT)): shell_uses(p.read_text()) for p in files}
    assert {path: uses for path, uses in found.items() if uses} == {}


# --- Containers as a user without privileges --------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [(w[0].upper(), w[1].strip() if len(w) > 1 else "")
            for line in lines if line and not line.startswith("#")
            for w in [line.split(None, 1)]]  # fmt: skip


def test_the_image_runs_as_a_user_without_privileges() -> None:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    final = instructions[last_from:]
    users = [args.split(":")[0] for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER: it runs as root"
    user = users[-1]  # the last USER is the one the container runs as
    assert user not in {"root", "0"}
    created = [args for word, args in final if word == "RUN" and "useradd" in args]
    assert created, "the final stage creates no user of its own"
    uid = re.search(r"(?:--uid|-u)\s+(\d+)", created[-1])
    assert uid is not None and int(uid.group(1)) >= 1000, "a system or root uid"
    assert user in {*created[-1].split(), uid.group(1)}
    assert not re.search(r"--non-unique|\s-o\s", created[-1]), "a uid shared with root"
    for word, args in final:
        assert not (word in {"CMD", "ENTRYPOINT"} and re.search(r"\b(sudo|su|gosu)\b", args))


def test_no_compose_service_is_made_root_or_privileged() -> None:
    services: dict[str, dict[str, Any]] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
        "services"
    ]
    ours = [n for n, s in services.items() if str(s.get("image", "")).startswith("gpt4people")]
    assert {"web", "deliver", "flower", "helper-image"} <= set(ours)
    for name, service in services.items():
        user = str(service.get("user", "")).split(":")[0]
        assert user not in {"root", "0"}, name
        assert service.get("privileged") is not True, name
        assert not {"ALL", "SYS_ADMIN"} & set(service.get("cap_add", [])), name
        if name in ours:  # the Dockerfile's user applies
            assert "user" not in service, name
    # The official Redis image drops from root to its `redis` user only when the command
    # starts with redis-server (its entrypoint's rule).
    # A Redis service started through a script must name a user of its own.
    for name, service in services.items():
        if str(service.get("image", "")).startswith("redis:"):
            command = service["command"]
            words = command.split() if isinstance(command, str) else command
            assert words[0] == "redis-server" or service.get("user") == "redis", name


# --- No personal data in normal logs or metric labels -----------------------------------------


def test_no_number_address_or_text_reaches_the_metrics_or_the_logs(
    web: str, twilio: TwilioRecorder, client: redis.Redis, env: dict[str, str]
) -> None:
    number, address = fresh_number(), "ann.private@example.org"
    secret, name = "my secret diagnosis is flu", f"mms-{uuid.uuid4().hex}.png"
    twilio.media[name] = (PNG, "image/png")
    text(web, twilio, number, secret)
    text(web, twilio, number, f"/annsmith {secret}")  # a helper named after a person
    assert mms(web, twilio, number, f"{twilio.url}/media/{name}").status_code == 200
    replies(twilio, number, 3)
    body = {"model": address, "user": address, "messages": [{"role": "user", "content": secret}]}
    response = httpx.post(f"{web}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    wait_idle(client)
    metrics = httpx.get(f"{web}/metrics", timeout=30).text
    assert "gpt4p_jobs_received_total" in metrics
    personal = [number, number.lstrip("+"), number_id(number), address, secret, "annsmith"]
    assert [p for p in personal if p in metrics] == []
    logs = sorted(Path(env["GPT4P_STATE_DIR"]).glob("*.log"))
    assert {f"{IMAGE}.log", f"{ECHO}.log", f"{DELIVER}.log"} <= {log.name for log in logs}
    for log in logs:
        content = log.read_text(errors="replace")
        assert [p for p in (number, address, secret) if p in content] == [], log.name
