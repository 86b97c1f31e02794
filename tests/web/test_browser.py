"""The whole life cycle in headless Chromium (Debian's, driven by Selenium
through the system chromedriver; no browser is downloaded):

a member imports its PMS export (CLI) and writes to a colleague who has no
account (SMTP); the invitation reaches the smarthost sink; the browser
follows the link and signs up; the waiting message is read over IMAP and
answered over SMTP; the member's notification reaches the sink and holds no
subject or body text; a password change in the browser ends an open IMAP
session and the new password opens the old mail; the member allows an
attachment type on its office page.

The browser trusts the development certificate by its key only
(``--ignore-certificate-errors-spki-list``, with a fresh profile) and finds
``mail.example.test`` at 127.0.0.1 through ``--host-resolver-rules``.
Every page is screenshot into ``tests/artifacts/`` (ignored by git; CI
keeps it).
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import imaplib
import os
import re
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .conftest import ARTIFACTS, HOST, PASSWORD, Server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SUBJECT = "Patient Alice Example: x-ray follow-up 4417"
BODY = "Confidential: crown on tooth 14, code ZX9Q."
REPLY_BODY = "Seen the films, reply text QW7T."
COLLEAGUE_PASSWORD = "maple orbit lantern canyon"
NEW_PASSWORD = "quiet violin harbour seventeen"

webdriver = pytest.importorskip("selenium.webdriver")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install chromium and chromium-driver (see .ci/run)")
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.support.ui import Select
from selenium.webdriver.support.expected_conditions import staleness_of


def spki_hash(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def browser(server: Server, tmp_path: Path) -> Iterator[object]:
    spki = spki_hash((server.home / "certs" / "server.pem").read_bytes())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-dev-shm-usage", "--window-size=1100,1300", f"--user-data-dir={tmp_path / 'profile'}",
                f"--ignore-certificate-errors-spki-list={spki}",
                f"--host-resolver-rules=MAP {HOST} 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))  # type: ignore[attr-defined]


def fill(driver: object, fields: dict[str, str]) -> None:
    for name, value in fields.items():
        box = driver.find_element(By.NAME, name)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)


def submit(driver: object) -> None:
    """Click the form's button and wait until the answer page replaced it:
    click() returns before the navigation, so reading page_source at once
    can still see the old page (a CI run failed that way)."""
    old = driver.find_element(By.TAG_NAME, "html")  # type: ignore[attr-defined]
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()  # type: ignore[attr-defined]
    WebDriverWait(driver, 20).until(staleness_of(old))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def cli(server: Server, *args: str, stdin: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    env.update({
        "POSTVAULT_STORE_KDF_ITERATIONS": "1",
        # The same listeners as the server, so links the CLI makes are right.
        **{f"POSTVAULT_LISTEN_{k.upper()}": f"127.0.0.1:{p}" for k, p in server.ports.items()},
        "POSTVAULT_NOTIFY_RELAY": "",
    })
    done = subprocess.run([sys.executable, "-m", "postvault.cli.main", *args, "--home", str(server.home)],
                          input=stdin, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def imap(server: Server, user: str, password: str) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.context())
    conn.login(user, password)
    return conn


def send(server: Server, user: str, password: str, msg: EmailMessage) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=server.context(), timeout=30) as smtp:
        smtp.login(user, password)
        smtp.send_message(msg)


def scan_clean(raw: bytes) -> None:
    """No subject or body text of the secure messages, in any encoding."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    decoded = raw.decode("utf-8", "replace") + "\n" + "\n".join(
        str(part.get_content()) for part in msg.walk() if part.get_content_maintype() == "text")
    for secret in ("Alice", "x-ray", "4417", "ZX9Q", "crown", "QW7T", "films"):
        assert secret.lower() not in decoded.lower(), secret


def test_life_cycle_in_the_browser(server: Server, browser: object, tmp_path: Path) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    driver = browser
    base = f"https://{HOST}:{server.https}"
    member, colleague = "office@smile-dental.test", "jane@ortho-partners.test"

    # 1. The member office, and its address book from the PMS export.
    cli(server, "member", "add", member, "--practice", "Smile Dental", "--timezone", "America/New_York",
        "--password-stdin", stdin=PASSWORD + "\n")
    export = tmp_path / "pms-export.csv"
    export.write_text('\ufeffName;Practice;Email;Phone\n"Ortho, Jane";Ortho Partners;' + colleague + ";555-0100\n",
                      "utf-8")
    out = cli(server, "contacts", "import", str(export), "--member", member)
    assert "added" in out
    assert server.store.address_book(member)[0].account_state == "none"

    # 2. The member writes to the colleague, who has no account yet.
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = member, colleague, SUBJECT
    msg.set_content(BODY)
    send(server, member, PASSWORD, msg)  # the submission server invites them first

    # 3. The invitation arrives at the smarthost.
    invitation = server.wait_for_mail(lambda m: colleague in m.rcpt_tos)
    scan_clean(invitation.data)
    text = email.message_from_bytes(invitation.data, policy=email.policy.default).get_body(("plain",)).get_content()
    link = re.search(r"https://\S+/signup/[A-Za-z0-9_-]+", text)
    assert link, text
    assert link[0].startswith(base + "/signup/")

    # 4. The browser follows the link and signs up.
    driver.get(link[0])  # type: ignore[attr-defined]
    assert "Sign up" in driver.title and "Smile Dental" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "01-signup")
    fill(driver, {"practice": "Ortho Partners", "password": COLLEAGUE_PASSWORD, "password2": "not the same one"})
    Select(driver.find_element(By.NAME, "timezone")).select_by_value("America/Chicago")  # type: ignore[attr-defined]
    submit(driver)
    assert "not the same" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "02-signup-error")
    fill(driver, {"password": COLLEAGUE_PASSWORD, "password2": COLLEAGUE_PASSWORD})
    submit(driver)
    assert driver.current_url == f"{base}/setup?done=welcome"  # type: ignore[attr-defined]
    page = driver.page_source  # type: ignore[attr-defined]
    assert "Your account is ready" in page and str(server.ports["imaps"]) in page and colleague in page
    shot(driver, "03-mail-setup")
    info = server.store.get_account(colleague)
    assert (info.state, info.practice_name, info.timezone) == ("active", "Ortho Partners", "America/Chicago")

    # 5. The waiting message is readable over IMAP with the new password.
    conn = imap(server, colleague, COLLEAGUE_PASSWORD)
    conn.select("INBOX")
    _, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    waiting = email.message_from_bytes(data[0][1], policy=email.policy.default)
    assert waiting["Subject"] == SUBJECT and BODY in waiting.get_body(("plain",)).get_content()
    conn.logout()

    # 6. The colleague replies over SMTP.
    reply = EmailMessage()
    reply["From"], reply["To"], reply["Subject"] = colleague, member, "Re: " + SUBJECT
    reply["In-Reply-To"] = reply["References"] = waiting["Message-ID"]
    reply.set_content(REPLY_BODY)
    send(server, colleague, COLLEAGUE_PASSWORD, reply)
    with imap(server, member, PASSWORD) as conn:
        conn.select("INBOX", readonly=True)
        _, found = conn.search(None, "ALL")
        assert found[0].split(), "the reply is not in the member's INBOX"

    # 7. The account pages, each screenshot.
    for path, name, expect in (("/account", "04-account", "Ortho Partners"),
                               ("/mailbox", "05-mailbox-settings", "Email notifications"),
                               ("/contacts", "06-colleague-contacts", "Smile Dental")):
        driver.get(base + path)  # type: ignore[attr-defined]
        assert expect in driver.page_source, path  # type: ignore[attr-defined]
        shot(driver, name)
    driver.get(base + "/mailbox")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "f-mode-batched").click()  # type: ignore[attr-defined]
    fill(driver, {"interval": "20"})
    submit(driver)
    assert "Your changes are saved" in driver.page_source  # type: ignore[attr-defined]
    assert server.store.notification_settings(colleague).mode == "batched"

    # 8. A password change in the browser ends an open IMAP session; the
    #    new password opens the old mail.
    open_session = imap(server, colleague, COLLEAGUE_PASSWORD)
    open_session.select("INBOX")
    driver.get(base + "/password")  # type: ignore[attr-defined]
    shot(driver, "07-password")
    fill(driver, {"old": COLLEAGUE_PASSWORD, "new": NEW_PASSWORD, "new2": NEW_PASSWORD})
    submit(driver)
    assert "Your password is changed" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "08-password-changed")
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
        for _ in range(50):
            open_session.noop()
            time.sleep(0.1)
    with pytest.raises(imaplib.IMAP4.error):
        imap(server, colleague, COLLEAGUE_PASSWORD)
    conn = imap(server, colleague, NEW_PASSWORD)
    conn.select("INBOX", readonly=True)
    _, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    again = email.message_from_bytes(data[0][1], policy=email.policy.default)
    assert again["Subject"] == SUBJECT and BODY in again.get_body(("plain",)).get_content()
    conn.logout()

    # 9. Log out; the used link now says so and names whom to ask.
    driver.find_element(By.CSS_SELECTOR, "nav form button").click()  # type: ignore[attr-defined]
    # The click returns before the next page has loaded; wait for it (bounded)
    # rather than read the old page on a busy machine.
    WebDriverWait(driver, 20).until(lambda d: "You are logged out" in d.page_source)
    assert "You are logged out" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "09-logged-out")
    driver.get(link[0])  # type: ignore[attr-defined]
    assert "has been used" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "10-used-link")

    # 10. The member logs in, sees its address book and allows a file type.
    driver.get(base + "/login")  # type: ignore[attr-defined]
    shot(driver, "11-login")
    fill(driver, {"email": member, "password": PASSWORD})
    submit(driver)
    assert driver.current_url == f"{base}/account"  # type: ignore[attr-defined]
    driver.get(base + "/contacts")  # type: ignore[attr-defined]
    assert colleague in driver.page_source and "Has an account" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "12-member-contacts")
    driver.get(base + "/office")  # type: ignore[attr-defined]
    fill(driver, {"extensions": "docm, iso"})
    submit(driver)
    assert "Your changes are saved" in driver.page_source  # type: ignore[attr-defined]
    shot(driver, "13-office-settings")
    assert server.store.office_allowances([member]) == {member: frozenset({"docm", "iso"})}
    driver.get(base + "/setup")  # type: ignore[attr-defined]
    shot(driver, "14-member-setup")

    # 11. The member's notification of the reply: at the sink, no PHI.
    notice = server.wait_for_mail(lambda m: member in m.rcpt_tos)
    scan_clean(notice.data)
    assert b"Ortho Partners" in notice.data
