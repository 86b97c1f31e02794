"""Tests of conf/postvault.toml: schema, loading, env overrides, rendering, show."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from postvault.conf import (
    Config,
    Endpoint,
    ListenConfig,
    LogConfig,
    NotifyConfig,
    Relay,
    StoreConfig,
    TLSConfig,
    load_config,
    load_config_text,
    render_default_config,
    show_config,
)
from postvault.conf.schema import RecoveryConfig
from postvault.errors import ConfigError, HomeError

REPO = Path(__file__).resolve().parents[2]
SOURCE = "conf/postvault.toml"
HOST = 'hostname = "mail.example.test"\n'
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home folder with the certificate files the default config names."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.pem").write_bytes(PEM)
    (tmp_path / "certs" / "server.key").write_bytes(PEM.replace(b"CERTIFICATE", b"PRIVATE KEY"))
    (tmp_path / "conf").mkdir()
    return tmp_path


def load(text: str, home: Path, environ: dict[str, str] | None = None) -> Config:
    return load_config_text(text, home=home, source=SOURCE, environ=environ or {})


def refusal(text: str, home: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, home, environ)
    message = str(info.value)
    assert "\n" not in message
    return message


def expected_defaults(home: Path) -> Config:
    return Config(
        hostname="mail.example.test",
        listen=ListenConfig(
            imaps=Endpoint("0.0.0.0", 993),
            imap=Endpoint("0.0.0.0", 143),
            submissions=Endpoint("0.0.0.0", 465),
            submission=Endpoint("0.0.0.0", 587),
            https=Endpoint("0.0.0.0", 443),
        ),
        tls=TLSConfig(cert=home / "certs" / "server.pem", key=home / "certs" / "server.key"),
        store=StoreConfig(
            url=f"sqlite:///{home}/data/postvault.db",
            blobs=home / "data" / "blobs",
            kdf_memory_kib=65536,
            kdf_iterations=3,
            kdf_lanes=4,
        ),
        notify=NotifyConfig(relay=None, from_="no-reply@mail.example.test"),
        log=LogConfig(level="info", file=None),
        recovery=RecoveryConfig(keys=(), gnupg_home=home / "data" / "gnupg", emergency_max_hours=72),
    )


# --- defaults and the shipped file -----------------------------------------


def test_rendered_default_loads_and_equals_defaults(home: Path) -> None:
    text = render_default_config("mail.example.test")
    tomllib.loads(text)
    assert load(text, home) == expected_defaults(home)
    # Only the hostname is required; everything else defaults to the same.
    assert load(HOST, home) == expected_defaults(home)


def test_every_key_is_commented_in_the_rendering() -> None:
    lines = render_default_config("mail.example.test").splitlines()
    for number, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[number - 1].startswith("# "), line


def test_shipped_example_is_the_rendering() -> None:
    shipped = (REPO / "conf" / "postvault.toml").read_text(encoding="utf-8")
    assert shipped == render_default_config("mail.example.test")


def test_load_config_reads_home(home: Path) -> None:
    (home / "conf" / "postvault.toml").write_text(render_default_config("mx.example.test"), encoding="utf-8")
    config = load_config(home, environ={})
    assert config.hostname == "mx.example.test"
    assert config.notify.from_ == "no-reply@mx.example.test"
    assert config.tls.cert == home / "certs" / "server.pem"


def test_load_config_without_file_is_a_home_error(tmp_path: Path) -> None:
    with pytest.raises(HomeError, match="postvault.toml: no such file"):
        load_config(tmp_path, environ={})


def test_load_config_names_the_real_file(home: Path) -> None:
    (home / "conf" / "postvault.toml").write_text('hostname = "bad_name"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(home, environ={})
    assert str(info.value).startswith(f"{home / 'conf' / 'postvault.toml'}: hostname: expected a DNS name")


def test_render_refuses_a_bad_hostname() -> None:
    with pytest.raises(ConfigError, match='hostname: expected a DNS name .*, got "not a host"'):
        render_default_config("not a host")


# --- values that are resolved, not just checked -----------------------------


def test_paths_and_urls_resolve_against_home(home: Path) -> None:
    config = load(HOST + '[store]\nurl = "sqlite:///db/x.db?timeout=5"\nblobs = "database"\n'
                  '[log]\nfile = "logs/postvault.log"\n', home)
    assert config.store.url == f"sqlite:///{home}/db/x.db?timeout=5"
    assert config.store.blobs is None
    assert config.log.file == home / "logs" / "postvault.log"
    absolute = load(HOST + f'[store]\nurl = "sqlite:///{home}/elsewhere.db"\n', home)
    assert absolute.store.url == f"sqlite:///{home}/elsewhere.db"


def test_relative_home_gives_absolute_paths(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(home.parent)
    config = load(HOST, Path(home.name))
    assert config.tls.cert.is_absolute() and config.tls.cert == home / "certs" / "server.pem"
    assert config.store.url == f"sqlite:///{home}/data/postvault.db"


def test_endpoints_parse(home: Path) -> None:
    config = load(HOST + '[listen]\nimaps = "[::1]:993"\nimap = ""\nhttps = "localhost:8443"\n', home)
    assert config.listen.imaps == Endpoint("::1", 993)
    assert str(config.listen.imaps) == "[::1]:993"
    assert config.listen.imap is None
    assert config.listen.https == Endpoint("localhost", 8443)


def test_relay_with_login(home: Path) -> None:
    config = load(HOST + '[notify]\nrelay = "me@example.test:s3cr:et@smtp.example.test:587"\n', home)
    assert config.notify.relay == Relay("smtp.example.test", 587, "me@example.test", "s3cr:et")
    assert "s3cr" not in repr(config)
    assert str(config.notify.relay) == "me@example.test:***@smtp.example.test:587"


def test_store_url_is_not_in_repr(home: Path) -> None:
    config = load(HOST + '[store]\nurl = "postgresql+psycopg://u:secret@h/db"\n', home)
    assert config.store.url == "postgresql+psycopg://u:secret@h/db"
    assert "secret" not in repr(config)


# --- refusals, each with an allowed twin -------------------------------------

# (refused document, the message after "conf/postvault.toml: ", allowed twin)
REFUSALS = [
    pytest.param(
        HOST + '[listen]\nimaps = "0.0.0.0:99999"\n',
        'listen.imaps: expected "host:port" with a port 1-65535, got "0.0.0.0:99999"',
        HOST + '[listen]\nimaps = "0.0.0.0:65535"\n', id="port-too-big"),
    pytest.param(
        HOST + '[listen]\nimap = "127.0.0.1:0"\n',
        'listen.imap: expected "host:port" with a port 1-65535, got "127.0.0.1:0"',
        HOST + '[listen]\nimap = "127.0.0.1:1"\n', id="port-zero"),
    pytest.param(
        HOST + '[listen]\nsubmission = "0.0.0.0"\n',
        'listen.submission: expected "host:port" (IPv6 as "[::1]:993"), got "0.0.0.0"',
        HOST + '[listen]\nsubmission = ""\n', id="no-port"),
    pytest.param(
        HOST + '[listen]\nimaps = "::1:993"\n',
        'listen.imaps: expected "host:port" (IPv6 as "[::1]:993"), got "::1:993"',
        HOST + '[listen]\nimaps = "[::1]:993"\n', id="ipv6-without-brackets"),
    pytest.param(
        HOST + '[listen]\nimaps = "[127.0.0.1]:993"\n',
        'listen.imaps: expected "host:port" (IPv6 as "[::1]:993") with an IPv6 address inside the brackets, '
        'got "[127.0.0.1]:993"',
        HOST + '[listen]\nimaps = "127.0.0.1:993"\n', id="ipv4-in-brackets"),
    pytest.param(
        HOST + '[listen]\nhttps = "bad host:443"\n',
        'listen.https: expected "host:port" (IPv6 as "[::1]:993") with an IP address or host name, '
        'got "bad host:443"',
        HOST + '[listen]\nhttps = "bad-host:443"\n', id="bad-listen-host"),
    pytest.param(
        'hostname = "-mail.example.test"\n',
        'hostname: expected a DNS name such as "mail.example.test", got "-mail.example.test"',
        'hostname = "mail.example.test"\n', id="hostname-hyphen"),
    pytest.param(
        'hostname = "mail_1.example.test"\n',
        'hostname: expected a DNS name such as "mail.example.test", got "mail_1.example.test"',
        'hostname = "localhost"\n', id="hostname-underscore"),
    pytest.param(
        'hostname = "10.0.0.1"\n',
        'hostname: expected a DNS name such as "mail.example.test", got "10.0.0.1"',
        'hostname = "mail10.example.test"\n', id="hostname-ip"),
    pytest.param(
        "[listen]\n",
        'hostname: missing; expected a DNS name such as "mail.example.test" (or set POSTVAULT_HOSTNAME)',
        HOST + "[listen]\n", id="hostname-missing"),
    pytest.param(
        "hostname = 5\n",
        "hostname: expected a string, got the integer 5",
        'hostname = "five.example.test"\n', id="hostname-not-a-string"),
    pytest.param(
        HOST + '[tls]\ncert = "certs/missing.pem"\n',
        'tls.cert: expected a readable PEM file, got "certs/missing.pem" ({home}/certs/missing.pem: no such file)',
        HOST + '[tls]\ncert = "certs/server.pem"\n', id="cert-missing"),
    pytest.param(
        HOST + '[tls]\nkey = "certs/server.der"\n',
        'tls.key: expected a readable PEM file, got "certs/server.der" ({home}/certs/server.der: no PEM block)',
        HOST + '[tls]\nkey = "certs/server.key"\n', id="key-not-pem"),
    pytest.param(
        HOST + '[tls]\nkey = "certs"\n',
        'tls.key: expected a readable PEM file, got "certs" ({home}/certs: is a folder)',
        HOST + '[tls]\nkey = "certs/../certs/server.key"\n', id="key-is-folder"),
    pytest.param(
        HOST + '[store]\nurl = "mysql://u:pw@h/db"\n',
        'store.url: expected "sqlite:///PATH" or "postgresql+psycopg://USER:PASSWORD@HOST/DB", '
        'got "mysql://u:***@h/db"',
        HOST + '[store]\nurl = "postgresql+psycopg://u:pw@h/db"\n', id="url-scheme"),
    pytest.param(
        HOST + '[store]\nurl = "postgresql://h/db"\n',
        'store.url: expected "sqlite:///PATH" or "postgresql+psycopg://USER:PASSWORD@HOST/DB", '
        'got "postgresql://h/db"',
        HOST + '[store]\nurl = "postgresql+psycopg://h/db"\n', id="url-postgres-driver"),
    pytest.param(
        HOST + '[store]\nurl = "sqlite:///:memory:"\n',
        'store.url: expected "sqlite:///PATH" with a database file path (relative to the home folder), '
        'got "sqlite:///:memory:"',
        HOST + '[store]\nurl = "sqlite:///memory.db"\n', id="url-sqlite-memory"),
    pytest.param(
        HOST + '[store]\nblobs = ""\n',
        'store.blobs: expected a folder path, or "database", got ""',
        HOST + '[store]\nblobs = "database"\n', id="blobs-empty"),
    pytest.param(
        HOST + "[store]\nkdf_memory_kib = 65535\n",
        "store.kdf_memory_kib: expected an integer from 65536 to 4294967295, got 65535",
        HOST + "[store]\nkdf_memory_kib = 65536\n", id="kdf-memory-small"),
    pytest.param(
        HOST + "[store]\nkdf_iterations = 0\n",
        "store.kdf_iterations: expected an integer from 1 to 4294967295, got 0",
        HOST + "[store]\nkdf_iterations = 1\n", id="kdf-iterations-zero"),
    pytest.param(
        HOST + "[store]\nkdf_lanes = 0\n",
        "store.kdf_lanes: expected an integer from 1 to 16777215, got 0",
        HOST + "[store]\nkdf_lanes = 1\n", id="kdf-lanes-zero"),
    pytest.param(
        HOST + '[store]\nkdf_iterations = "3"\n',
        'store.kdf_iterations: expected an integer, got the string "3"',
        HOST + "[store]\nkdf_iterations = 3\n", id="int-as-string"),
    pytest.param(
        HOST + "[store]\nkdf_lanes = true\n",
        "store.kdf_lanes: expected an integer, got the boolean true",
        HOST + "[store]\nkdf_lanes = 1\n", id="bool-is-not-int"),
    pytest.param(
        HOST + "[store]\nkdf_lanes = 4.0\n",
        "store.kdf_lanes: expected an integer, got the float 4.0",
        HOST + "[store]\nkdf_lanes = 4\n", id="float-is-not-int"),
    pytest.param(
        HOST + '[imap]\nindex_on_login = "no"\n',
        'imap.index_on_login: expected a boolean (true or false), got the string "no"',
        HOST + "[imap]\nindex_on_login = false\n", id="bool-as-string"),
    pytest.param(
        HOST + "[imap]\nindex_on_login = 0\n",
        "imap.index_on_login: expected a boolean (true or false), got the integer 0",
        HOST + "[imap]\nindex_on_login = true\n", id="int-is-not-bool"),
    pytest.param(
        HOST + "[listen]\nimaps = 993\n",
        "listen.imaps: expected a string, got the integer 993",
        HOST + '[listen]\nimaps = "0.0.0.0:993"\n', id="int-is-not-string"),
    pytest.param(
        HOST + '[notify]\nfrom = "no-reply"\n',
        'notify.from: expected a mail address such as "no-reply@mail.example.test", got "no-reply"',
        HOST + '[notify]\nfrom = "no-reply@example.test"\n', id="from-not-address"),
    pytest.param(
        HOST + '[notify]\nrelay = "smtp.example.test"\n',
        'notify.relay: expected "host:port" (IPv6 as "[::1]:993"), got "smtp.example.test"',
        HOST + '[notify]\nrelay = "smtp.example.test:587"\n', id="relay-no-port"),
    pytest.param(
        HOST + '[notify]\nrelay = "user@smtp.example.test:587"\n',
        'notify.relay: expected "host:port" or "user:password@host:port", got "user@smtp.example.test:587"',
        HOST + '[notify]\nrelay = "user:pw@smtp.example.test:587"\n', id="relay-login-without-password"),
    pytest.param(
        HOST + '[notify]\nrelay = "user:hunter2@smtp.example.test:99999"\n',
        'notify.relay: expected "host:port" with a port 1-65535, got "user:***@smtp.example.test:99999"',
        HOST + '[notify]\nrelay = "user:hunter2@smtp.example.test:2525"\n', id="relay-error-masks-password"),
    pytest.param(
        HOST + '[log]\nlevel = "verbose"\n',
        'log.level: expected "debug" or "info" or "warning" or "error", got "verbose"',
        HOST + '[log]\nlevel = "debug"\n', id="log-level"),
    pytest.param(
        HOST + '[listen]\nimapss = "0.0.0.0:993"\n',
        'listen.imapss: unknown key, did you mean "listen.imaps"?',
        HOST + '[listen]\nimaps = "0.0.0.0:993"\n', id="unknown-key"),
    pytest.param(
        HOST + '[listen]\nrelay = ""\n',
        'listen.relay: unknown key, did you mean "notify.relay"?',
        HOST + '[notify]\nrelay = ""\n', id="key-in-wrong-section"),
    pytest.param(
        HOST + '[listen]\nzzz = 1\n',
        "listen.zzz: unknown key; expected one of: imaps, imap, submissions, submission, https",
        HOST + "[listen]\n", id="unknown-key-far-off"),
    pytest.param(
        'hostnme = "mail.example.test"\n',
        'hostnme: unknown key, did you mean "hostname"?',
        'hostname = "mail.example.test"\n', id="unknown-top-level-key"),
    pytest.param(
        HOST + '[lisen]\nimaps = "0.0.0.0:993"\n',
        'lisen: unknown section, did you mean "[listen]"?',
        HOST + '[listen]\nimaps = "0.0.0.0:993"\n', id="unknown-section"),
    pytest.param(
        HOST + '[listen.extra]\nimaps = "0.0.0.0:993"\n',
        "listen.extra: unknown key; expected one of: imaps, imap, submissions, submission, https",
        HOST + '[listen]\nimaps = "0.0.0.0:993"\n', id="nested-table"),
    pytest.param(
        HOST + 'listen = "0.0.0.0:993"\n',
        'listen: expected a table [listen], got the string "0.0.0.0:993"',
        HOST + 'listen = {imaps = "0.0.0.0:993"}\n', id="section-not-a-table"),
    pytest.param(
        HOST + '[listen]\nimaps = "0.0.0.0:993\n',
        "line 3, column 21: expected valid TOML: Illegal character '\\n'",
        HOST + '[listen]\nimaps = "0.0.0.0:993"\n', id="toml-syntax"),
    pytest.param(
        HOST + HOST,
        "line 2, column 31: expected valid TOML: Cannot overwrite a value",
        HOST, id="toml-duplicate-key"),
]


@pytest.mark.parametrize(("refused", "message", "allowed"), REFUSALS)
def test_refusal_and_allowed_twin(home: Path, refused: str, message: str, allowed: str) -> None:
    (home / "certs" / "server.der").write_bytes(b"\x30\x82\x01\x0a")
    assert refusal(refused, home) == f"{SOURCE}: {message.format(home=home)}"
    load(allowed, home)


# --- environment overrides --------------------------------------------------


def test_env_overrides_each_type(home: Path) -> None:
    environ = {
        "POSTVAULT_HOSTNAME": "env.example.test",
        "POSTVAULT_LISTEN_IMAPS": "127.0.0.1:10993",
        "POSTVAULT_LISTEN_IMAP": "",
        "POSTVAULT_TLS_CERT": "certs/server.key",
        "POSTVAULT_STORE_URL": "postgresql+psycopg://u:secret@db.example.test/postvault",
        "POSTVAULT_STORE_BLOBS": "database",
        "POSTVAULT_STORE_KDF_MEMORY_KIB": "131072",
        "POSTVAULT_NOTIFY_RELAY": "smtp.example.test:25",
        "POSTVAULT_NOTIFY_FROM": "alerts@example.test",
        "POSTVAULT_LOG_LEVEL": "debug",
        "POSTVAULT_LOG_FILE": "postvault.log",
        "POSTVAULT_IMAP_INDEX_ON_LOGIN": "false",
        "POSTVAULT_HOME": str(home),  # the CLI's, not a config key
        "PATH": "/usr/bin",
    }
    config = load(render_default_config("mail.example.test"), home, environ)
    assert config.hostname == "env.example.test"
    assert config.listen.imaps == Endpoint("127.0.0.1", 10993)
    assert config.listen.imap is None
    assert config.listen.submissions == Endpoint("0.0.0.0", 465)
    assert config.tls.cert == home / "certs" / "server.key"
    assert config.store.url == "postgresql+psycopg://u:secret@db.example.test/postvault"
    assert config.store.blobs is None
    assert config.store.kdf_memory_kib == 131072
    assert config.store.kdf_iterations == 3
    assert config.imap.index_on_login is False
    assert load(render_default_config("mail.example.test"), home).imap.index_on_login is True
    assert config.notify.relay == Relay("smtp.example.test", 25)
    # An explicit from in the file wins over the hostname-derived default.
    assert config.notify.from_ == "alerts@example.test"
    assert config.log.level == "debug"
    assert config.log.file == home / "postvault.log"


def test_env_hostname_drives_derived_default(home: Path) -> None:
    config = load("", home, {"POSTVAULT_HOSTNAME": "env.example.test"})
    assert config.notify.from_ == "no-reply@env.example.test"


@pytest.mark.parametrize(("environ", "message", "allowed"), [
    pytest.param(
        {"POSTVAULT_LISTEN_IMAPS": "127.0.0.1:99999"},
        'POSTVAULT_LISTEN_IMAPS: listen.imaps: expected "host:port" with a port 1-65535, got "127.0.0.1:99999"',
        {"POSTVAULT_LISTEN_IMAPS": "127.0.0.1:10993"}, id="bad-endpoint"),
    pytest.param(
        {"POSTVAULT_STORE_KDF_ITERATIONS": "three"},
        'POSTVAULT_STORE_KDF_ITERATIONS: store.kdf_iterations: expected an integer (digits only), got "three"',
        {"POSTVAULT_STORE_KDF_ITERATIONS": "4"}, id="int-not-digits"),
    pytest.param(
        {"POSTVAULT_STORE_KDF_ITERATIONS": "-1"},
        'POSTVAULT_STORE_KDF_ITERATIONS: store.kdf_iterations: expected an integer (digits only), got "-1"',
        {"POSTVAULT_STORE_KDF_ITERATIONS": "1"}, id="int-negative"),
    pytest.param(
        {"POSTVAULT_IMAP_INDEX_ON_LOGIN": "0"},
        'POSTVAULT_IMAP_INDEX_ON_LOGIN: imap.index_on_login: expected true or false, got "0"',
        {"POSTVAULT_IMAP_INDEX_ON_LOGIN": "false"}, id="bool-not-word"),
    pytest.param(
        {"POSTVAULT_STORE_KDF_MEMORY_KIB": "1024"},
        "POSTVAULT_STORE_KDF_MEMORY_KIB: store.kdf_memory_kib: expected an integer from 65536 to 4294967295, "
        "got 1024",
        {"POSTVAULT_STORE_KDF_MEMORY_KIB": "65536"}, id="int-range"),
    pytest.param(
        {"POSTVAULT_TLS_KEY": "nope.key"},
        'POSTVAULT_TLS_KEY: tls.key: expected a readable PEM file, got "nope.key" ({home}/nope.key: no such file)',
        {"POSTVAULT_TLS_KEY": "certs/server.key"}, id="missing-file"),
    pytest.param(
        {"POSTVAULT_STORE_URL": "mysql://u:topsecret@h/db"},
        'POSTVAULT_STORE_URL: store.url: expected "sqlite:///PATH" or '
        '"postgresql+psycopg://USER:PASSWORD@HOST/DB", got "mysql://u:***@h/db"',
        {"POSTVAULT_STORE_URL": "postgresql+psycopg://u:topsecret@h/db"}, id="url-masked"),
    pytest.param(
        {"POSTVAULT_LISTEN_IMAPSS": "127.0.0.1:993"},
        "POSTVAULT_LISTEN_IMAPSS: unknown environment variable, did you mean POSTVAULT_LISTEN_IMAPS?",
        {"POSTVAULT_LISTEN_IMAPS": "127.0.0.1:993"}, id="unknown-close"),
    pytest.param(
        {"POSTVAULT_XYZZY": "1"},
        "POSTVAULT_XYZZY: unknown environment variable; "
        "expected POSTVAULT_<SECTION>_<KEY> naming a key of conf/postvault.toml",
        {"POSTVAULT_HOME": "/srv/postvault"}, id="unknown-far"),
])
def test_env_refusal_names_the_variable(home: Path, environ: dict[str, str], message: str,
                                        allowed: dict[str, str]) -> None:
    assert refusal(HOST, home, environ) == message.format(home=home)
    load(HOST, home, allowed)


def test_process_environment_is_the_default(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTVAULT_LISTEN_HTTPS", "")
    config = load_config_text(HOST, home=home, source=SOURCE)
    assert config.listen.https is None
    monkeypatch.setenv("POSTVAULT_NO_SUCH_KEY", "x")
    with pytest.raises(ConfigError, match="POSTVAULT_NO_SUCH_KEY: unknown environment variable"):
        load_config_text(HOST, home=home, source=SOURCE)


# --- show -------------------------------------------------------------------


def test_show_masks_passwords_and_is_valid_toml(home: Path) -> None:
    config = load(HOST + '[store]\nurl = "postgresql+psycopg://u:secret@h/db?sslmode=require&password=other"\n'
                  '[notify]\nrelay = "mailer:hunter2@smtp.example.test:587"\n', home)
    shown = show_config(config)
    assert "secret" not in shown and "other" not in shown and "hunter2" not in shown
    data = tomllib.loads(shown)
    assert data["store"]["url"] == "postgresql+psycopg://u:***@h/db?sslmode=require&password=***"
    assert data["notify"]["relay"] == "mailer:***@smtp.example.test:587"
    # Still a valid config: the masked password is just a different password.
    load(shown, home)


def test_show_round_trips(home: Path) -> None:
    config = load(HOST + '[listen]\nimaps = "[::1]:10993"\nimap = ""\n[store]\nblobs = "database"\n'
                  '[log]\nfile = "log/pv.log"\n', home)
    shown = show_config(config)
    assert 'imap = ""' in shown and 'blobs = "database"' in shown
    assert load(shown, home) == config
    # Absolute paths: the shown config means the same from any home.
    other = home / "other"
    assert load(shown, other) == config


def test_show_masks_plain_postgres_url(home: Path) -> None:
    config = load(HOST + '[store]\nurl = "postgresql+psycopg://u:secret@h/db"\n', home)
    assert tomllib.loads(show_config(config))["store"]["url"] == "postgresql+psycopg://u:***@h/db"
