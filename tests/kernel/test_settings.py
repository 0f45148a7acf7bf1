"""Settings come from GPT4P_* variables; a wrong value is an error naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.settings import SettingsError, load_settings
from tests.conftest import base_env, run_cli


def test_defaults_need_no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPT4P_ENGINE", "GPT4P_MODEL_PATH", "GPT4P_REDIS_URL", "GPT4P_HTTP_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.engine == "llama"
    assert settings.model_path is None
    assert settings.http_port == 8000
    assert settings.flower_port == 5555


def test_values_are_read_and_converted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("GPT4P_ENGINE", "echo")
    monkeypatch.setenv("GPT4P_N_CTX", "8192")
    monkeypatch.setenv("GPT4P_MODEL_PATH", str(gguf))
    monkeypatch.setenv("GPT4P_REDIS_URL", "rediss://:secret@redis.example:6380/2")
    settings = load_settings()
    assert (settings.engine, settings.n_ctx, settings.model_path) == ("echo", 8192, gguf)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GPT4P_N_CTX", "lots"),
        ("GPT4P_N_CTX", "16"),
        ("GPT4P_ENGINE", "gpt5"),
        ("GPT4P_HTTP_PORT", "70000"),
        ("GPT4P_MAX_TOKENS", "0"),
        ("GPT4P_REDIS_URL", "http://localhost:6379"),
        ("GPT4P_REDIS_URL", "sentinel://h1:26379;redis://h2:6379"),
        ("GPT4P_REDIS_URL", "sentinel://:a@h1:26379;sentinel://:b@h2:26379"),
        ("GPT4P_REDIS_URL", "sentinel://h1:26379/zero"),
        ("GPT4P_REDIS_WAIT_TIMEOUT", "0"),
        ("GPT4P_MODEL_PATH", "/nowhere/model.gguf"),
        ("GPT4P_MODEL", "gpt-5"),
        ("GPT4P_IMAP_SSL", "maybe"),
    ],
)
def test_a_wrong_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_the_cli_reports_a_bad_setting_in_one_line(state_dir: Path) -> None:
    done = run_cli(["status"], base_env(state_dir, n_threads="-3"), timeout=60)
    assert done.returncode == 2
    assert "GPT4P_N_THREADS" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path: Path, state_dir: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_text("<html>404 Not Found</html>")
    done = run_cli(["worker"], base_env(state_dir, model_path=str(junk)), timeout=60)
    assert done.returncode == 2
    assert "GPT4P_MODEL_PATH" in done.stderr and "not a GGUF file" in done.stderr


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker Compose passes `${VAR:-}` for an unset variable as an empty string.
    monkeypatch.setenv("GPT4P_TWILIO_ACCOUNT_SID", "")
    monkeypatch.setenv("GPT4P_HTTP_API_KEY", "")
    settings = load_settings()
    assert settings.twilio_account_sid is None
    assert settings.http_api_key is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [("GPT4P_HTTP_API_KEY", "   "), ("GPT4P_HTTP_API_KEY", "short-key"),
     ("GPT4P_HTTP_API_KEYS", "a-key-of-twenty-chars,short"), ("GPT4P_HTTP_API_KEYS", " , ")],
)  # fmt: skip
def test_a_blank_or_short_api_key_is_refused_without_being_shown(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # A blank key would silently leave every endpoint open; a short one can be guessed.
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable}: .*16 characters") as refused:
        load_settings()
    assert "short" not in str(refused.value)


def test_a_list_of_long_api_keys_may_end_with_a_comma(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT4P_HTTP_API_KEYS", "key-of-client-a-0001,key-of-client-b-0002,")
    keys = load_settings().http_api_keys
    assert keys is not None and keys.get_secret_value().startswith("key-of-client-a")


def test_requiring_email_auth_needs_our_servers_authserv_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the id nothing counts as authenticated: the mailbox would answer no one.
    monkeypatch.delenv("GPT4P_EMAIL_AUTHSERV_ID", raising=False)
    monkeypatch.setenv("GPT4P_EMAIL_REQUIRE_AUTH", "true")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "GPT4P_EMAIL_REQUIRE_AUTH" in str(refused.value)
    assert "GPT4P_EMAIL_AUTHSERV_ID" in str(refused.value)
    monkeypatch.setenv("GPT4P_EMAIL_AUTHSERV_ID", "mx.example.com")
    assert load_settings().email_require_auth


def test_the_bundled_model_is_named_as_people_write_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPT4P_MODEL", raising=False)
    assert load_settings().model == "smollm2-135m-instruct"
    monkeypatch.setenv("GPT4P_MODEL", " Gemma-3-270M ")
    assert load_settings().model == "gemma-3-270m"
    monkeypatch.setenv("GPT4P_MODEL", "gemma-3-270m-q4_k_m")  # its older name
    assert load_settings().model == "gemma-3-270m"


@pytest.mark.parametrize(
    ("value", "meant"),
    [("true", "tls"), ("False", "plain"), ("yes", "tls"), ("0", "plain"), ("starttls", "starttls")],
)
def test_imap_ssl_takes_true_and_false(
    monkeypatch: pytest.MonkeyPatch, value: str, meant: str
) -> None:
    monkeypatch.setenv("GPT4P_IMAP_SSL", value)
    assert load_settings().imap_ssl == meant


def test_a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        "# as Compose reads it\nGPT4P_HTTP_PORT=8123\nGPT4P_IMAP_SSL=false\n"
        "GPT4P_N_CTX=8192\nCOMPOSE_PROJECT_NAME=gpt4people\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    for name in ("GPT4P_HTTP_PORT", "GPT4P_IMAP_SSL", "GPT4P_N_CTX", "GPT4P_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPT4P_N_CTX", "2048")
    settings = load_settings()
    assert (settings.http_port, settings.imap_ssl, settings.n_ctx) == (8123, "plain", 2048)


def test_a_wrong_value_in_dotenv_names_its_variable(state_dir: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GPT4P_HTTP_PORT=eighty\n", encoding="utf-8")
    done = run_cli(["status"], base_env(state_dir, env_file=".env"), timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert "GPT4P_HTTP_PORT" in done.stderr and "Traceback" not in done.stderr
    # A file saved in another encoding is a one-line error too, naming the file.
    (tmp_path / ".env").write_bytes(b"GPT4P_SYSTEM_PROMPT=caf\xe9\n")
    done = run_cli(["models"], base_env(state_dir, env_file=".env"), timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert ".env" in done.stderr and "Traceback" not in done.stderr
    # GPT4P_ENV_FILE="" reads none.
    assert run_cli(["models"], base_env(state_dir), timeout=60, cwd=tmp_path).returncode == 0


def test_channel_priorities_are_written_as_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.channels import channel_priority

    monkeypatch.setenv("GPT4P_CHANNEL_PRIORITIES", "email=interactive, http = bulk")
    settings = load_settings()
    assert channel_priority("email", settings) == "interactive"
    assert channel_priority("http", settings) == "bulk"
    assert channel_priority("sms", settings) == "interactive"  # the built-in default
    monkeypatch.setenv("GPT4P_CHANNEL_PRIORITIES", "sms=urgent")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "GPT4P_CHANNEL_PRIORITIES" in str(refused.value)
