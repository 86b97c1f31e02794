"""The account pages: sign-up, log in/out, account, mailbox settings,
password, contacts, office settings, mail-program setup, and the automatic
setup files that mail programs fetch on their own.

``WebApp.handle`` takes a ``WebRequest`` and returns a ``Response``; it
never raises (an unexpected error is a 500 page, logged without its
message). Every store call, password check and key unwrap runs on the
app's thread pool (``run``), never on the event loop.

Order of checks on a POST: session (or pre-session) first, then the CSRF
token, then the form. A missing or wrong token is refused with 403 before
anything is read or changed.

No PHI: these pages show account data only (addresses, practice and
mailbox names, settings); they never open or list a message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from zoneinfo import available_timezones

from email_validator import EmailNotValidError, validate_email
from twisted.web.template import Tag, tags

from ..errors import AuthenticationFailed, InvalidInput, LoginLimited, NoSuchAccount
from ..login import authenticate
from ..notices.hooks import invite_and_send
from ..policy.passwords import password_problem
from ..policy.schema import Policy
from ..runtime import Runtime
from ..store.accounts import (
    MAX_INTERVAL_MINUTES,
    MIN_INTERVAL_MINUTES,
    InvitationNeedsKey,
)
from ..store.notify import Change
from ..store.offices import (
    SignupLink,
    allowance_problem,
    office_bounds,
    parse_extensions,
)
from . import autoconfig
from . import templates as t
from .csrf import CsrfKeys, same
from .http import PRE_COOKIE, SESSION_COOKIE, Response, WebRequest, cookie, redirect
from .sessions import Clock, SessionStore, WebSession
from .vcard import Card, vcards

log = logging.getLogger("postvault.web")
T = TypeVar("T")
Handler = Callable[[WebRequest], Awaitable[Response]]

TIMEZONES: tuple[str, ...] = tuple(sorted(available_timezones()))
NOTIFY_CHOICES = (
    ("every", "An email for every new message"),
    ("batched", "At most one email per interval while mail is unread"),
    ("off", "No emails"),
)
# Messages after a redirect come from this table only: nothing a visitor
# puts in the query string is ever shown back.
NOTICES = {
    "saved": "Your changes are saved.",
    "password": "Your password is changed. Your other sessions, mail programs included, were signed out; "
                "sign them in again with the new password.",
    "bye": "You are logged out.",
    "expired": "Your session ended. Please log in again.",
    "welcome": "Your account is ready. Your messages, including any waiting for you, are in your mail program: "
               "set it up with the settings below.",
    "added": "The contact is in your address book.",
    "removed": "The contact is removed from your address book.",
    "invited": "The invitation is on its way.",
    "reinvited": "A new invitation is on its way; the old link no longer works.",
    "already_active": "This colleague already has an account and can receive your messages.",
    "already_pending": "This colleague was invited already and has not signed up yet.",
}


def _email_ok(text: str) -> str | None:
    """A normalized address, or None if it is not one."""
    if not text or len(text) > 320 or any(c in text for c in "\r\n\0"):
        return None
    try:
        # As the PMS import checks: syntax only (no DNS from a web form),
        # the reserved .test domain allowed, stored in ASCII (IDNA) form.
        checked = validate_email(text, check_deliverability=False, allow_smtputf8=False, test_environment=True)
    except EmailNotValidError:
        return None
    return checked.ascii_email or checked.normalized


class WebApp:
    """The pages of one ``postvault serve``."""

    def __init__(self, runtime: Runtime, clock: Clock, threads: int = 4) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.clock = clock
        self.sessions = SessionStore(clock, lambda: self.policy.sessions)
        self.csrf = CsrfKeys()
        # Few threads: each login may hold Argon2id's 64 MiB.
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="postvault-web")
        self.settings = autoconfig.mail_settings(runtime.config)
        self.get_routes: dict[str, Handler] = {
            "/": self.home, "/login": self.login_page, "/account": self.account_page,
            "/mailbox": self.mailbox_page, "/password": self.password_page, "/contacts": self.contacts_page,
            "/contacts.vcf": self.contacts_vcf, "/office": self.office_page, "/setup": self.setup_page,
            "/setup/config-v1.1.xml": self.setup_thunderbird, "/setup/postvault.mobileconfig": self.setup_apple,
            "/.well-known/autoconfig/mail/config-v1.1.xml": self.autoconfig,
            "/mail/config-v1.1.xml": self.autoconfig,
        }
        self.post_routes: dict[str, Handler] = {
            "/login": self.login_post, "/logout": self.logout_post, "/account": self.account_post,
            "/mailbox": self.mailbox_post, "/password": self.password_post, "/contacts/add": self.contact_add,
            "/contacts/edit": self.contact_edit, "/contacts/remove": self.contact_remove,
            "/contacts/invite": self.contact_invite, "/office": self.office_post,
        }

    @property
    def policy(self) -> Policy:
        return self.runtime.policy.policy

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kw))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- dispatch -----------------------------------------------------------------

    async def handle(self, req: WebRequest) -> Response:
        try:
            return await self._dispatch(req)
        except Exception:  # noqa: BLE001 - any bug becomes a 500 page, never a traceback to the browser
            # The path without a sign-up token: a token in a log is a key.
            shown = "/signup/..." if req.path.startswith("/signup/") else req.path[:100]
            log.exception("web: %s %s failed", req.method, shown)
            return self.error(500, "Something went wrong", "The server could not finish this request. "
                              "Nothing was changed unless the page said so; please try again.")

    async def _dispatch(self, req: WebRequest) -> Response:
        req.session = self.sessions.get(req.cookies.get(SESSION_COOKIE))
        path = req.path
        method = "GET" if req.method == "HEAD" else req.method
        if path.lower() == "/autodiscover/autodiscover.xml":
            if method != "POST":
                return self.error(405, "Not allowed", "Mail programs POST to this address.", allow="POST")
            return await self.autodiscover(req)
        if path.startswith("/signup/"):
            token = path.removeprefix("/signup/")
            if method == "GET":
                return await self.signup_page(req, token)
            if method == "POST":
                return await self.signup_post(req, token)
            return self.error(405, "Not allowed", "This page takes GET and POST.", allow="GET, POST")
        routes = self.get_routes if method == "GET" else self.post_routes if method == "POST" else {}
        handler = routes.get(path)
        if handler is None:
            if path in self.get_routes or path in self.post_routes:
                allow = ", ".join(m for m, r in (("GET", self.get_routes), ("POST", self.post_routes)) if path in r)
                return self.error(405, "Not allowed", "This page does not take that kind of request.", allow=allow)
            return self.error(404, "Page not found", "There is no page at this address.")
        if method == "POST" and req.session is None and path != "/login":
            # Nothing to act for (the session ended): nothing is done.
            return redirect("/login?done=expired")
        if method == "POST" and not self._csrf_ok(req):
            return self.error(403, "Request refused",
                              "This form was not sent from this site's own page, or the page was too old. "
                              "Nothing was changed. Go back, reload the page and try again.")
        return await handler(req)

    def _csrf_ok(self, req: WebRequest) -> bool:
        given = req.form.get("csrf")
        if req.path in ("/login",) or req.path.startswith("/signup/"):
            return self.csrf.check_pre(req.cookies.get(PRE_COOKIE), given)
        if req.session is None:
            # No session to hold a token: the handler would send the
            # visitor to the login page, but a POST without one is refused.
            return False
        return same(req.session.csrf, given)

    def _pre_token(self, req: WebRequest) -> str:
        """The CSRF token of an anonymous form; makes the cookie if needed."""
        pre = req.cookies.get(PRE_COOKIE)
        if not pre or len(pre) > 100:
            pre = req.new_pre = secrets.token_urlsafe(32)
        return self.csrf.pre_token(pre)

    def _with_pre(self, req: WebRequest, resp: Response) -> Response:
        if req.new_pre:
            resp.cookies.append(cookie(PRE_COOKIE, req.new_pre))
        return resp

    # -- page helpers ---------------------------------------------------------------

    def error(self, status: int, title: str, text: str, *, allow: str | None = None,
              session: WebSession | None = None) -> Response:
        body = t.page(title, tags.p(text), tags.p(tags.a("Go to the start page", href="/")),
                      role=session.role if session else None, csrf=session.csrf if session else None,
                      user=session.email if session else None)
        resp = Response(status, body)
        if allow:
            resp.headers.append(("Allow", allow))
        return resp

    def page(self, req: WebRequest, title: str, *content: Any, status: int = 200, current: str = "",
             errors: list[str] | None = None) -> Response:
        s = req.session
        assert s is not None
        notice = NOTICES.get(req.query.get("done", ""))
        body = t.page(title, *content, role=s.role, csrf=s.csrf, current=current, user=s.email, notice=notice,
                      errors=errors or [])
        return Response(status, body)

    @staticmethod
    def need_login() -> Response:
        return redirect("/login")

    # -- start, log in, log out -------------------------------------------------------

    async def home(self, req: WebRequest) -> Response:
        return redirect("/account" if req.session else "/login")

    async def login_page(self, req: WebRequest, *, errors: list[str] | None = None, email: str = "",
                         status: int = 200) -> Response:
        if req.session is not None and not errors:
            return redirect("/account")
        token = self._pre_token(req)
        content = [
            t.form("/login", token,
                   t.field("email", "Email address", email, kind="email", autocomplete="username"),
                   t.field("password", "Password", kind="password", autocomplete="current-password"),
                   submit="Log in"),
            tags.p("Invited by a practice? Use the sign-up link in your invitation email first. "
                   "Forgot your password? Ask the office that invited you, or your administrator."),
        ]
        notice = NOTICES.get(req.query.get("done", ""))
        return self._with_pre(req, Response(status, t.page("Log in", *content, notice=notice, errors=errors or [])))

    async def login_post(self, req: WebRequest) -> Response:
        email = req.form.get("email", "").strip()
        password = req.form.get("password", "")
        if not email or not password:
            return await self.login_page(req, errors=["Enter your email address and password."], email=email,
                                         status=422)
        try:
            account = await self.run(authenticate, self.store, self.policy, email, password,
                                     client_ip=req.client_ip, protocol="web", unwrap=True)
        except LoginLimited as exc:
            text = getattr(exc.decision, "text", "Too many failed logins; try again later.")
            resp = await self.login_page(req, errors=[text], email=email, status=429)
            resp.headers.append(("Retry-After", "60"))
            return resp
        except AuthenticationFailed:
            return await self.login_page(req, errors=["The email address or the password is wrong."], email=email,
                                         status=422)
        if req.session is not None:
            self.sessions.drop(req.session)  # a new login never reuses an old session id
        raw, _ = self.sessions.create(account)
        log.info("web: login account=%s", account.email)
        return redirect("/account", cookies=[cookie(SESSION_COOKIE, raw)])

    async def logout_post(self, req: WebRequest) -> Response:
        if req.session is not None:
            self.sessions.drop(req.session)
        return redirect("/login?done=bye", cookies=[cookie(SESSION_COOKIE, "", expire=True)])

    # -- sign-up ----------------------------------------------------------------------

    def _link_problem(self, req: WebRequest, link: SignupLink) -> Response:
        ask = (f"{link.member_practice} ({link.member})" if link.member else "the office that invited you")
        if link.state == "expired":
            title, status = "This sign-up link has expired", 410
            text = f"Sign-up links are valid for a limited time. Ask {ask} to send you a new invitation."
        elif link.state == "used":
            title, status = "This sign-up link has been used", 410
            text = ("Your account is already set up: log in with your email address and password. "
                    f"If you did not sign up yourself, contact {ask} at once.")
        elif link.state == "revoked":
            title, status = "This sign-up link was replaced", 410
            text = (f"A newer invitation replaced this one. Use the link in the most recent email from {ask}, "
                    "or ask them to send a new one.")
        else:
            title, status = "This sign-up link is not valid", 404
            text = ("Check that the whole link was copied from the invitation email. If it still does not work, "
                    "ask the office that invited you to send a new invitation.")
        content = [tags.p(text), tags.p(tags.a("Go to the log-in page", href="/login"))]
        return Response(status, t.page(title, *content))

    async def signup_page(self, req: WebRequest, token: str, *, errors: list[str] | None = None,
                          practice: str = "", tz: str = "", status: int = 200) -> Response:
        link = await self.run(self.store.signup_link, token)
        if link.state != "valid":
            return self._link_problem(req, link)
        rules = self.policy.passwords
        pre = self._pre_token(req)
        content = [
            tags.p("You were invited by ", tags.strong(link.member_practice), f" ({link.member}) to exchange "
                   "secure messages. Your account: ", tags.strong(link.colleague), "."),
            t.form(f"/signup/{token}", pre,
                   t.field("practice", "Practice name", practice, autocomplete="organization",
                           help="The name colleagues see, e.g. \u201cOrtho Partners\u201d.", maxlength="200"),
                   t.select("timezone", "Time zone", ((z, z) for z in TIMEZONES), tz or "UTC",
                            help="Used for the dates in your notifications."),
                   t.field("password", "Password", kind="password", autocomplete="new-password",
                           help=f"At least {rules.min_length} characters and hard to guess: a phrase of several "
                                "unrelated words works well. Not your address or practice name.",
                           minlength=str(rules.min_length)),
                   t.field("password2", "Password again", kind="password", autocomplete="new-password"),
                   submit="Sign up"),
        ]
        return self._with_pre(req, Response(status, t.page("Sign up for secure messaging", *content,
                                                          errors=errors or [])))

    async def signup_post(self, req: WebRequest, token: str) -> Response:
        if not self.csrf.check_pre(req.cookies.get(PRE_COOKIE), req.form.get("csrf")):
            return self.error(403, "Request refused", "This form was not sent from this site's own page, or the "
                              "page was too old. Nothing was changed. Go back, reload the page and try again.")
        link = await self.run(self.store.signup_link, token)
        if link.state != "valid":
            return self._link_problem(req, link)
        practice = req.form.get("practice", "").strip()
        tz = req.form.get("timezone", "")
        password, again = req.form.get("password", ""), req.form.get("password2", "")
        errors = []
        if not practice or not practice.isprintable() or len(practice) > 200:
            errors.append("Enter your practice name (up to 200 characters, on one line).")
        if tz not in available_timezones():
            errors.append("Choose your time zone from the list.")
        problem = await self.run(password_problem, password, policy=self.policy.passwords,
                                 user_inputs=[link.colleague, practice])
        if problem:
            errors.append(f"Password: {problem}.")
        elif password != again:
            errors.append("The two passwords are not the same.")
        if errors:
            return await self.signup_page(req, token, errors=errors, practice=practice, tz=tz, status=422)
        try:
            info = await self.run(self.store.sign_up, token, practice, tz, password)
        except InvalidInput as exc:
            return await self.signup_page(req, token, errors=[str(exc)], practice=practice, tz=tz, status=422)
        log.info("web: sign-up account=%s", info.email)
        try:
            account = await self.run(authenticate, self.store, self.policy, info.email, password,
                                     client_ip=req.client_ip, protocol="web", unwrap=True)
        except (AuthenticationFailed, LoginLimited):
            return redirect("/login?done=welcome")
        raw, _ = self.sessions.create(account)
        return redirect("/setup?done=welcome", cookies=[cookie(SESSION_COOKIE, raw)])

    # -- account information ------------------------------------------------------------

    async def account_page(self, req: WebRequest, *, errors: list[str] | None = None,
                           form: dict[str, str] | None = None, status: int = 200) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        info = await self.run(self.store.get_account, s.email)
        notify = await self.run(self.store.notification_settings, s.email)
        form = form or {}
        content = [
            t.facts([("User name", info.email),
                     ("Role", "Member office" if info.role == "member" else "Colleague"),
                     ("Practice name", info.practice_name), ("Mailbox name", info.mailbox_name),
                     ("Time zone", info.timezone),
                     ("Notification address", notify.address + ("" if notify.custom_address else " (your own)"))]),
            tags.h2("Change account information"),
            t.form("/account", s.csrf,
                   t.field("practice", "Practice name", form.get("practice", info.practice_name),
                           autocomplete="organization", maxlength="200"),
                   t.select("timezone", "Time zone", ((z, z) for z in TIMEZONES),
                            form.get("timezone", info.timezone)),
                   t.field("notify_address", "Notification address",
                           form.get("notify_address", notify.address if notify.custom_address else ""),
                           kind="email", required=False,
                           help="Where new-message notices go. Leave empty to use your own address. "
                                "Notices never contain the message."),
                   submit="Save account information"),
        ]
        return self.page(req, "Account information", *content, status=status, current="/account", errors=errors)

    async def account_post(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        practice = req.form.get("practice", "").strip()
        tz = req.form.get("timezone", "")
        address_text = req.form.get("notify_address", "").strip()
        errors = []
        if not practice or not practice.isprintable() or len(practice) > 200:
            errors.append("Enter the practice name (up to 200 characters, on one line).")
        if tz not in available_timezones():
            errors.append("Choose a time zone from the list.")
        address = _email_ok(address_text) if address_text else None
        if address_text and address is None:
            errors.append("The notification address is not a valid email address.")
        if errors:
            return await self.account_page(req, errors=errors, form=req.form, status=422)
        await self.run(self.store.update_account, s.email, practice_name=practice, timezone_name=tz, actor=s.email,
                       client_ip=req.client_ip, protocol="web")
        current = await self.run(self.store.notification_settings, s.email)
        if (address or None) != (current.address if current.custom_address else None):
            await self.run(self.store.set_notification_settings, s.email, address=address, actor=s.email)
        return redirect("/account?done=saved")

    # -- mailbox settings ------------------------------------------------------------------

    async def mailbox_page(self, req: WebRequest, *, errors: list[str] | None = None,
                           form: dict[str, str] | None = None, status: int = 200) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        info = await self.run(self.store.get_account, s.email)
        notify = await self.run(self.store.notification_settings, s.email)
        form = form or {}
        content = [
            t.form("/mailbox", s.csrf,
                   t.field("mailbox_name", "Mailbox name", form.get("mailbox_name", info.mailbox_name),
                           help="The name others see for your mailbox.", maxlength="200"),
                   t.radios("mode", "Email notifications of new messages", NOTIFY_CHOICES,
                            form.get("mode", notify.mode)),
                   t.field("interval", "Interval in minutes (for \u201cat most one per interval\u201d)",
                           form.get("interval", str(notify.interval_minutes)), kind="number",
                           min=str(MIN_INTERVAL_MINUTES), max=str(MAX_INTERVAL_MINUTES)),
                   submit="Save mailbox settings"),
            tags.p("Notices go to ", tags.strong(notify.address),
                   "; change that on the ", tags.a("account page", href="/account"), ".", class_="help"),
        ]
        return self.page(req, "Mailbox settings", *content, status=status, current="/mailbox", errors=errors)

    async def mailbox_post(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        name = req.form.get("mailbox_name", "").strip()
        mode = req.form.get("mode", "")
        errors = []
        if not name or not name.isprintable() or len(name) > 200:
            errors.append("Enter the mailbox name (up to 200 characters, on one line).")
        if mode not in {m for m, _ in NOTIFY_CHOICES}:
            errors.append("Choose how you want to be notified.")
        try:
            interval = int(req.form.get("interval", ""))
            if not MIN_INTERVAL_MINUTES <= interval <= MAX_INTERVAL_MINUTES:
                raise ValueError
        except ValueError:
            interval = 0
            errors.append(f"The interval must be a whole number of minutes from {MIN_INTERVAL_MINUTES} "
                          f"to {MAX_INTERVAL_MINUTES}.")
        if errors:
            return await self.mailbox_page(req, errors=errors, form=req.form, status=422)
        await self.run(self.store.set_mailbox_name, s.email, name, actor=s.email, client_ip=req.client_ip,
                       protocol="web")
        await self.run(self.store.set_notification_settings, s.email, mode=mode, interval_minutes=interval,
                       actor=s.email)
        return redirect("/mailbox?done=saved")

    # -- password ---------------------------------------------------------------------------

    async def password_page(self, req: WebRequest, *, errors: list[str] | None = None,
                            status: int = 200) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        rules = self.policy.passwords
        content = [
            t.form("/password", s.csrf,
                   tags.input(type="hidden", name="username", value=s.email, autocomplete="username"),
                   t.field("old", "Current password", kind="password", autocomplete="current-password"),
                   t.field("new", "New password", kind="password", autocomplete="new-password",
                           help=f"At least {rules.min_length} characters and hard to guess.",
                           minlength=str(rules.min_length)),
                   t.field("new2", "New password again", kind="password", autocomplete="new-password"),
                   submit="Change password"),
            tags.p("Changing the password signs out your other sessions, including your mail programs; "
                   "they ask for the new password. Your messages stay as they are.", class_="help"),
        ]
        return self.page(req, "Change password", *content, status=status, current="/password", errors=errors)

    async def password_post(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        old, new, again = req.form.get("old", ""), req.form.get("new", ""), req.form.get("new2", "")
        info = await self.run(self.store.get_account, s.email)
        errors = []
        problem = await self.run(password_problem, new, policy=self.policy.passwords,
                                 user_inputs=[info.email, info.practice_name, info.mailbox_name])
        if problem:
            errors.append(f"New password: {problem}.")
        elif new != again:
            errors.append("The two new passwords are not the same.")
        elif new == old:
            errors.append("The new password must differ from the current one.")
        if errors:
            return await self.password_page(req, errors=errors, status=422)
        try:
            # The auth limits apply: the old password is guessable here too.
            await self.run(authenticate, self.store, self.policy, s.email, old, client_ip=req.client_ip,
                           protocol="web", unwrap=False)
        except LoginLimited as exc:
            text = getattr(exc.decision, "text", "Too many failed attempts; try again later.")
            return await self.password_page(req, errors=[text], status=429)
        except AuthenticationFailed:
            return await self.password_page(req, errors=["The current password is wrong."], status=422)
        await self.run(self.store.change_password, s.email, old, new)
        self.end_other_sessions(s, req.client_ip)
        raw = self.sessions.rotate(s)
        return redirect("/password?done=password", cookies=[cookie(SESSION_COOKIE, raw)])

    def end_other_sessions(self, keep: WebSession, client_ip: str | None) -> None:
        """After a password change: this account's other web sessions end
        here; its IMAP sessions hear a "logout" change on the store's bus
        and say BYE (``imapd.server.IMAPServer.on_change``)."""
        ended = self.sessions.drop_account(keep.account_id, keep=keep)
        self.store.bus.publish(Change(keep.account_id, "", "logout", ()))
        self.store.record_event("sessions.end", actor=keep.email, account=keep.email, client_ip=client_ip,
                                protocol="web", detail=f"reason=password-change web={ended}")

    # -- contacts ---------------------------------------------------------------------------------

    async def contacts_page(self, req: WebRequest, *, errors: list[str] | None = None,
                            status: int = 200) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        if s.role != "member":
            members = await self.run(self.store.contacts, s.email)
            infos = await self.run(self.store.accounts, members)
            inviters = [(infos[m.lower()].practice_name if m.lower() in infos else "", m) for m in members]
            content: list[Any] = [
                tags.p("The offices that invited you. You can reply to their messages in your mail program."),
                t.table("Your contacts", ["Practice", "Email address"], inviters) if inviters
                else tags.p("No contacts yet."),
                tags.p(tags.a("Download these contacts (vCard)", href="/contacts.vcf", download="contacts.vcf")),
            ]
            return self.page(req, "Contacts", *content, status=status, current="/contacts", errors=errors)
        book = await self.run(self.store.address_book, s.email)
        states = {"none": "Not invited", "pending": "Invited, not signed up", "active": "Has an account",
                  "disabled": "Account disabled"}
        rows: list[tuple[Any, ...]] = []
        for c in book:
            edit = tags.form(t.hidden("csrf", s.csrf), t.hidden("email", c.email),
                             tags.input(type="text", name="name", value=c.name,
                                        **{"aria-label": f"Name of {c.email}"}),
                             tags.input(type="text", name="practice", value=c.practice,
                                        **{"aria-label": f"Practice of {c.email}"}),
                             tags.button("Save", type="submit", class_="secondary"),
                             method="post", action="/contacts/edit")
            actions: list[Tag] = [edit]
            if c.account_state in ("none", "pending"):
                actions.append(tags.form(t.hidden("csrf", s.csrf), t.hidden("email", c.email),
                                         tags.button("Invite again" if c.account_state == "pending" else "Invite",
                                                     type="submit", class_="secondary"),
                                         method="post", action="/contacts/invite"))
            actions.append(tags.form(t.hidden("csrf", s.csrf), t.hidden("email", c.email),
                                     tags.button("Remove", type="submit", class_="secondary"),
                                     method="post", action="/contacts/remove"))
            rows.append((c.email, states.get(c.account_state, c.account_state), tags.div(*actions)))
        content = [
            tags.p("Your address book: the colleagues you can write to. Import it from your practice management "
                   "system with ", tags.code("postvault contacts import"), " or add colleagues here."),
            t.table("Address book", ["Email address", "Status", "Name and practice"], rows)
            if rows else tags.p("Your address book is empty."),
            tags.p(tags.a("Download the address book (vCard)", href="/contacts.vcf", download="contacts.vcf")),
            tags.h2("Add a colleague"),
            t.form("/contacts/add", s.csrf,
                   t.field("email", "Email address", kind="email"),
                   t.field("name", "Name", required=False, maxlength="200"),
                   t.field("practice", "Practice", required=False, maxlength="200"),
                   tags.div(tags.input(type="checkbox", name="invite", value="yes", id="f-invite"),
                            tags.label("Send an invitation now", for_="f-invite"), class_="choice"),
                   submit="Add to address book"),
        ]
        return self.page(req, "Contacts", *content, status=status, current="/contacts", errors=errors)

    async def contacts_vcf(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        if s.role == "member":
            book = await self.run(self.store.address_book, s.email)
            cards = [Card(c.email, c.name, c.practice) for c in book]
        else:
            members = await self.run(self.store.contacts, s.email)
            infos = await self.run(self.store.accounts, members)
            cards = [Card(m, infos[m.lower()].mailbox_name if m.lower() in infos else "",
                          infos[m.lower()].practice_name if m.lower() in infos else "") for m in members]
        return Response(200, vcards(cards), "text/vcard; charset=utf-8",
                        [("Content-Disposition", 'attachment; filename="contacts.vcf"')])

    def _member(self, req: WebRequest) -> WebSession | Response:
        s = req.session
        if s is None:
            return self.need_login()
        if s.role != "member":
            return self.error(403, "For member offices only", "Only member offices manage an address book and "
                              "office settings.", session=s)
        return s

    async def contact_add(self, req: WebRequest) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        email = _email_ok(req.form.get("email", "").strip())
        name, practice = req.form.get("name", "").strip(), req.form.get("practice", "").strip()
        errors = []
        if email is None:
            errors.append("Enter a valid email address.")
        elif email.lower() == s.email.lower():
            errors.append("That is your own address.")
        if any(len(v) > 200 or (v and not v.isprintable()) for v in (name, practice)):
            errors.append("Name and practice must be up to 200 characters, on one line.")
        if errors or email is None:
            return await self.contacts_page(req, errors=errors, status=422)
        await self.run(self.store.add_contact, s.email, email, name, practice)
        if req.form.get("invite") == "yes":
            return await self._invite(req, s, email)
        return redirect("/contacts?done=added")

    async def contact_edit(self, req: WebRequest) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        try:
            await self.run(self.store.edit_contact, s.email, req.form.get("email", ""),
                           name=req.form.get("name", ""), practice=req.form.get("practice", ""), actor=s.email)
        except (InvalidInput, NoSuchAccount) as exc:
            return await self.contacts_page(req, errors=[str(exc)], status=422)
        return redirect("/contacts?done=saved")

    async def contact_remove(self, req: WebRequest) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        try:
            await self.run(self.store.remove_contact, s.email, req.form.get("email", ""), actor=s.email)
        except (InvalidInput, NoSuchAccount) as exc:
            return await self.contacts_page(req, errors=[str(exc)], status=422)
        return redirect("/contacts?done=removed")

    async def contact_invite(self, req: WebRequest) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        email = _email_ok(req.form.get("email", "").strip())
        if email is None:
            return await self.contacts_page(req, errors=["Enter a valid email address."], status=422)
        return await self._invite(req, s, email)

    async def _invite(self, req: WebRequest, s: WebSession, email: str) -> Response:
        try:
            # The member's own session opens the escrow, so a renewed link
            # carries the waiting mail over (store.accounts, invitations).
            result = await self.run(invite_and_send, self.store, self.runtime.config, s.email, email, actor=s.email,
                                    member_session=s.account)
        except InvitationNeedsKey:
            why = ("This colleague was invited by another office and the link has expired; only that office can "
                   "send a new one without losing the messages waiting for the colleague.")
            return await self.contacts_page(req, errors=[why], status=409)
        except (InvalidInput, NoSuchAccount) as exc:
            return await self.contacts_page(req, errors=[str(exc)], status=422)
        return redirect(f"/contacts?done={result.status}")

    # -- office settings --------------------------------------------------------------------------

    async def office_page(self, req: WebRequest, *, errors: list[str] | None = None, typed: str | None = None,
                          status: int = 200) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        policy = self.policy
        admin = sorted(policy.office(s.email).allow_extensions)
        stored = sorted((await self.run(self.store.office_allowances, [s.email])).get(s.email.lower(), frozenset()))
        bounds = office_bounds(policy.attachments)
        inactive = [e for e in stored if e not in bounds]
        content: list[Any] = [
            tags.p("Some file types are blocked in attachments because they can carry harmful content. If your "
                   "office and its colleagues need to exchange one of them (for example disk images from an "
                   "imaging device), allow it here. It applies at once to every message of your conversations, "
                   "in both directions. Programs and scripts can never be allowed, and every file is still "
                   "checked for hidden programs."),
            t.facts([("Allowed by your administrator", ", ".join(admin) or "none"),
                     ("Allowed by your office", ", ".join(stored) or "none")]),
        ]
        if inactive:
            content.append(tags.p("Not in effect, because the administrator's policy no longer lets offices allow "
                                  "them: ", ", ".join(inactive), class_="help"))
        content += [
            t.form("/office", s.csrf,
                   t.field("extensions", "File types your office allows", typed if typed is not None
                           else ", ".join(stored), required=False,
                           help="File extensions separated by commas, e.g. \u201ciso, docm\u201d. "
                                "Leave empty to allow none."),
                   submit="Save office settings"),
            tags.details(tags.summary("File types an office may allow"), tags.p(", ".join(sorted(bounds)),
                                                                                class_="mono")),
        ]
        return self.page(req, "Office settings", *content, status=status, current="/office", errors=errors)

    async def office_post(self, req: WebRequest) -> Response:
        s = self._member(req)
        if isinstance(s, Response):
            return s
        typed = req.form.get("extensions", "")
        wanted = parse_extensions(typed)
        attachments = self.policy.attachments
        errors = [p for p in (allowance_problem(e, attachments) for e in wanted) if p]
        if len(wanted) > 100:
            errors.append("That is too many file types at once.")
        if errors:
            return await self.office_page(req, errors=[e[0].upper() + e[1:] + "." for e in errors], typed=typed,
                                          status=422)
        await self.run(self.store.set_office_allowances, s.email, wanted, actor=s.email, client_ip=req.client_ip,
                       protocol="web")
        return redirect("/office?done=saved")

    # -- mail program setup -------------------------------------------------------------------------

    async def setup_page(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        st = self.settings
        host = tags.code(st.hostname)

        def server_rows(servers: tuple[autoconfig.Server, ...]) -> list[tuple[Any, ...]]:
            return [(tags.code(str(x.port)), x.tls, "Yes" if i == 0 else "Alternative") for i, x in enumerate(servers)]

        user = tags.code(s.email)
        content: list[Any] = [
            tags.p("Read and send your secure messages in your usual mail program. Use these settings; "
                   "the password is the one you chose for this account."),
            t.facts([("Server (incoming and outgoing)", host), ("User name", user),
                     ("Password", "your account password"), ("Authentication", "Normal password")]),
            t.table("Incoming mail (IMAP)", ["Port", "Connection security", "Preferred"], server_rows(st.incoming)),
            t.table("Outgoing mail (SMTP)", ["Port", "Connection security", "Preferred"], server_rows(st.outgoing)),
            tags.h2("Downloads"),
            tags.ul(
                tags.li(tags.a("Thunderbird settings file (config-v1.1.xml)", href="/setup/config-v1.1.xml",
                               download="config-v1.1.xml")),
                tags.li(tags.a("Apple Mail profile for Mac, iPhone and iPad (postvault.mobileconfig)",
                               href="/setup/postvault.mobileconfig", download="postvault.mobileconfig")),
                class_="downloads"),
        ]
        imap = st.incoming[0] if st.incoming else None
        smtp = st.outgoing[0] if st.outgoing else None
        if imap and smtp:
            content += [
                tags.h2("Thunderbird"),
                tags.ol(tags.li("Choose ", tags.strong("Account Settings \u2192 Account Actions \u2192 Add Mail "
                                                       "Account"), "."),
                        tags.li("Enter your name, ", user, " and your password, then ", tags.strong("Continue"),
                                ". Thunderbird finds the settings itself."),
                        tags.li("If it does not, choose ", tags.strong("Configure manually"), ": incoming IMAP ",
                                host, " port ", tags.code(str(imap.port)), " ", imap.tls, "; outgoing SMTP ", host,
                                " port ", tags.code(str(smtp.port)), " ", smtp.tls, "; authentication ",
                                tags.strong("Normal password"), "; user name ", user, " for both.")),
                tags.h2("Outlook"),
                tags.ol(tags.li("Choose ", tags.strong("File \u2192 Add Account"), ", enter ", user, ", open ",
                                tags.strong("Advanced options"), " and tick ",
                                tags.strong("Let me set up my account manually"), "."),
                        tags.li("Choose ", tags.strong("IMAP"), ". Incoming: server ", host, ", port ",
                                tags.code(str(imap.port)), ", encryption ", imap.tls, ". Outgoing: server ", host,
                                ", port ", tags.code(str(smtp.port)), ", encryption ", smtp.tls, "."),
                        tags.li("User name ", user, " and your password.")),
                tags.h2("Apple Mail (Mac, iPhone, iPad)"),
                tags.ol(tags.li("Download the profile above and open it; on a Mac, approve it in ",
                                tags.strong("System Settings \u2192 Privacy & Security \u2192 Profiles"),
                                "; on iPhone or iPad in ", tags.strong("Settings \u2192 Profile Downloaded"), "."),
                        tags.li("Enter your password when asked."),
                        tags.li("Without the profile: add an ", tags.strong("Other Mail Account"), " of type ",
                                tags.strong("IMAP"), " with server ", host, " for incoming and outgoing mail and ",
                                "user name ", user, "; Mail uses SSL on ports ", tags.code(str(imap.port)), " and ",
                                tags.code(str(smtp.port)), ".")),
            ]
        return self.page(req, "Set up your mail program", *content, current="/setup")

    async def setup_thunderbird(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        return Response(200, autoconfig.thunderbird_xml(self.settings, s.email), "application/xml; charset=utf-8",
                        [("Content-Disposition", 'attachment; filename="config-v1.1.xml"')])

    async def setup_apple(self, req: WebRequest) -> Response:
        s = req.session
        if s is None:
            return self.need_login()
        info = await self.run(self.store.get_account, s.email)
        body = autoconfig.mobileconfig(self.settings, s.email, info.mailbox_name)
        return Response(200, body, "application/x-apple-aspen-config",
                        [("Content-Disposition", 'attachment; filename="postvault.mobileconfig"')])

    # -- automatic setup (no login: mail programs fetch these themselves) ---------------------------

    async def autoconfig(self, req: WebRequest) -> Response:
        # The same answer for every address, account or not: it tells no
        # one which addresses exist.
        email = autoconfig.checked_address(req.query.get("emailaddress"))
        return Response(200, autoconfig.thunderbird_xml(self.settings, email), "text/xml; charset=utf-8",
                        cache="no-store")

    async def autodiscover(self, req: WebRequest) -> Response:
        email = autoconfig.autodiscover_email(req.body)
        if email is None:
            return Response(200, autoconfig.autodiscover_error(), "application/xml; charset=utf-8")
        return Response(200, autoconfig.autodiscover_xml(self.settings, email), "application/xml; charset=utf-8")

