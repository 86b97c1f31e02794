"""HTML for the account pages, built with ``twisted.web.template``.

Every piece of text and every attribute value goes through Twisted's
flattener, which escapes ``<``, ``>``, ``&`` and quotes; nothing here joins
HTML strings by hand, so a practice name like ``<script>`` shows as text.
The pages carry no script and no inline style (the CSP forbids both), one
stylesheet, labels on every field and plain semantic markup, so they read
well in a screen reader and without CSS.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.template import Tag, flattenString, tags

SERVICE = "Postvault Secure Messaging"


def render(tag: Tag) -> bytes:
    """Flatten synchronously (our tags hold no Deferreds)."""
    out: list[bytes] = []
    failures: list[Any] = []
    flattenString(None, tag).addCallbacks(out.append, failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + out[0]


def nav(role: str | None, csrf: str | None, current: str) -> Tag:
    if role is None:
        return tags.nav()
    links = [("/account", "Account"), ("/mailbox", "Mailbox settings"), ("/password", "Password"),
             ("/contacts", "Contacts")]
    if role == "member":
        links.append(("/office", "Office settings"))
    links.append(("/setup", "Mail program setup"))
    items = []
    for href, label in links:
        a = tags.a(label, href=href)
        if href == current:
            a(**{"aria-current": "page"})
        items.append(tags.li(a))
    items.append(tags.li(tags.form(hidden("csrf", csrf or ""), tags.button("Log out", type="submit"),
                                   method="post", action="/logout", class_="inline")))
    return tags.nav(tags.ul(*items), **{"aria-label": "Account pages"})


def page(title: str, *content: Any, role: str | None = None, csrf: str | None = None, current: str = "",
         user: str | None = None, notice: str | None = None, errors: Sequence[str] = ()) -> bytes:
    """A whole page: header with navigation, the title, messages, content."""
    banner = [tags.a(SERVICE, href="/", class_="brand")]
    if user:
        banner.append(tags.span("Signed in as ", tags.strong(user), class_="who"))
    messages: list[Tag] = []
    if notice:
        messages.append(tags.p(notice, class_="notice", role="status"))
    if errors:
        messages.append(tags.div(tags.p("Please correct the following:" if len(errors) > 1 else "Please correct this:"),
                                 tags.ul(*(tags.li(e) for e in errors)), class_="errors", role="alert"))
    doc = tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.meta(name="referrer", content="no-referrer"),
            tags.title(f"{title} – {SERVICE}"),
            tags.link(rel="stylesheet", href="/static/style.css"),
        ),
        tags.body(
            tags.a("Skip to content", href="#main", class_="skip"),
            tags.header(tags.div(*banner, class_="bar"), nav(role, csrf, current)),
            Tag("main")(tags.h1(title), *messages, *content, id="main"),  # not in Twisted's tag list
            tags.footer(tags.p("Your messages are read in your mail program; these pages never show them. "
                               "Please log out when you are done.")),
        ),
        lang="en",
    )
    return render(doc)


def hidden(name: str, value: str) -> Tag:
    return tags.input(type="hidden", name=name, value=value)


def form(action: str, csrf: str, *fields: Any, submit: str = "Save", cls: str = "") -> Tag:
    return tags.form(hidden("csrf", csrf), *fields, tags.p(tags.button(submit, type="submit"), class_="actions"),
                     method="post", action=action, class_=cls or "form")


def field(name: str, label: str, value: str = "", *, kind: str = "text", help: str | None = None,
          required: bool = True, autocomplete: str | None = None, **extra: str) -> Tag:
    ident = f"f-{name}"
    attrs: dict[str, str] = {"type": kind, "name": name, "id": ident}
    if kind != "password":
        attrs["value"] = value
    if required:
        attrs["required"] = "required"
    if autocomplete:
        attrs["autocomplete"] = autocomplete
    if help:
        attrs["aria-describedby"] = f"{ident}-help"
    attrs.update(extra)
    parts: list[Any] = [tags.label(label, for_=ident), tags.input(**attrs)]
    if help:
        parts.append(tags.span(help, id=f"{ident}-help", class_="help"))
    return tags.div(*parts, class_="field")


def select(name: str, label: str, options: Iterable[tuple[str, str]], current: str, *,
           help: str | None = None) -> Tag:
    ident = f"f-{name}"
    opts = []
    for value, text in options:
        opt = tags.option(text, value=value)
        if value == current:
            opt(selected="selected")
        opts.append(opt)
    attrs: dict[str, str] = {"name": name, "id": ident}
    if help:
        attrs["aria-describedby"] = f"{ident}-help"
    parts: list[Any] = [tags.label(label, for_=ident), tags.select(*opts, **attrs)]
    if help:
        parts.append(tags.span(help, id=f"{ident}-help", class_="help"))
    return tags.div(*parts, class_="field")


def radios(name: str, legend: str, options: Iterable[tuple[str, str]], current: str) -> Tag:
    items = []
    for value, text in options:
        ident = f"f-{name}-{value}"
        box = tags.input(type="radio", name=name, value=value, id=ident)
        if value == current:
            box(checked="checked")
        items.append(tags.div(box, tags.label(text, for_=ident), class_="choice"))
    return tags.fieldset(tags.legend(legend), *items)


def facts(rows: Iterable[tuple[str, Any]]) -> Tag:
    """A definition list of label/value pairs."""
    out: list[Tag] = []
    for label, value in rows:
        out += [tags.dt(label), tags.dd(value)]
    return tags.dl(*out, class_="facts")


def table(caption: str, head: Sequence[str], rows: Iterable[Sequence[Any]]) -> Tag:
    return tags.table(
        tags.caption(caption),
        tags.thead(tags.tr(*(tags.th(h, scope="col") for h in head))),
        tags.tbody(*(tags.tr(*(tags.td(c) for c in row)) for row in rows)),
    )
