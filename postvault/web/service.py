"""The HTTPS service of ``postvault serve``: ``twisted.web`` on the ``https``
listener, over asyncio's TLS with the runtime's ``TLSContextHolder`` (the
same context, BCP 195 settings and SIGHUP reload as the mail listeners; the
adapter is the IMAP service's ``Bridge``). With ``https`` in ``[proxy]
listeners`` a PROXY protocol header is read before TLS (``proxyproto.py``)
and the pages' ``client_ip`` is the client it names.

Invariants:
- Every response carries the security headers (``http.SECURITY_HEADERS``),
  error pages of Twisted's own included: ``_Request.process`` sets them
  before anything else.
- A request body is held in memory, never in a temp file (Twisted spools
  bodies over 100 KB to disk), and one over ``MAX_BODY`` is refused with
  413: the pages only take small forms, and a password must not reach disk.
- Page handlers run as asyncio tasks on the loop; their blocking work runs
  on the app's own thread pool (``pages.WebApp.run``).
- ``stop`` stops listening, lets running requests finish for up to
  ``drain_seconds``, then closes every connection; the sessions (and the
  private keys they hold) go with the process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet import defer
from twisted.web import resource, server

from ..imapd.transport import Bridge, StreamTransport
from ..proxyproto import Listener, start_listener
from ..runtime import Runtime
from .http import SECURITY_HEADERS, Response, WebRequest
from .pages import WebApp
from .sessions import Clock

log = logging.getLogger("postvault.web")

MAX_BODY = 64 * 1024
MAX_FIELDS = 200
SWEEP_SECONDS = 60.0
# What the web pages' clock reads; tests replace it before the service
# starts (tests/web/launcher.py) to move time without waiting.
CLOCK: Clock = time.time
STATIC_CSS = "static/style.css"


class _CappedBody(io.BytesIO):
    """A request body in memory, up to a limit; past it, only a flag."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, data: Any) -> int:
        if self.overflow:
            return len(data)
        if self.tell() + len(data) > self.limit:
            self.overflow = True
            self.seek(0)
            self.truncate()
            return len(data)
        return super().write(data)


class _Transport(StreamTransport):
    """The IMAP adapter plus the TCP switches Twisted's HTTP channel calls."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        # asyncio sets TCP_NODELAY on every TCP socket it creates already.
        return None

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        return None


class _Bridge(Bridge):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return
        assert isinstance(transport, asyncio.Transport)
        self.transport = _Transport(self, transport, self._secure)
        self.peer = self.transport.getPeer().host
        self.protocol = self._make()
        self.protocol.makeConnection(self.transport)


class _Request(server.Request):
    def process(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.setHeader(name.encode(), value.encode())
        super().process()


class _Site(server.Site):
    requestFactory = _Request
    # No "TwistedWeb/x.y" in the Server header (see _Root.render).
    displayTracebacks = False

    def getContentFile(self, length: int | None) -> io.BytesIO:
        return _CappedBody(MAX_BODY)

    def log(self, request: Any) -> None:
        # Twisted's access log would record every path, sign-up tokens
        # included; our own log lines name the account instead.
        return None


def _css() -> bytes:
    from importlib import resources

    return resources.files("postvault.web").joinpath(STATIC_CSS).read_bytes()


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, service: WebService) -> None:
        super().__init__()
        self.service = service
        self.css = _css()

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"Server", b"Postvault")
        early = self._early(request)
        if early is not None:
            _write(request, early)
            return server.NOT_DONE_YET
        req = _convert(request)
        self.service.busy += 1
        d = defer.Deferred.fromFuture(asyncio.ensure_future(self.service.app.handle(req)))

        def done(resp: Response) -> None:
            _write(request, resp)

        def failed(f: Any) -> None:
            log.error("web: response failed (%s)", f.type.__name__ if f.type else "?")
            if not request.finished and not getattr(request, "_disconnected", False):
                request.setResponseCode(500)
                request.finish()

        def settle(result: Any) -> Any:
            self.service.busy -= 1
            return result

        d.addCallbacks(done, failed).addBoth(settle)
        return server.NOT_DONE_YET

    def _early(self, request: server.Request) -> Response | None:
        """Answers that need no page handler: the stylesheet, a body too big."""
        content = request.content
        if isinstance(content, _CappedBody) and content.overflow:
            return Response(413, b"Request too large\n", "text/plain; charset=utf-8", [("Connection", "close")])
        path = request.path.decode("ascii", "replace")
        if path == "/static/style.css" and request.method in (b"GET", b"HEAD"):
            return Response(200, self.css, "text/css; charset=utf-8", cache="public, max-age=3600")
        return None


def _convert(request: server.Request) -> WebRequest:
    uri = request.uri.decode("ascii", "replace")
    parts = urlsplit(uri)
    query = dict(reversed(parse_qsl(parts.query, keep_blank_values=True, max_num_fields=MAX_FIELDS)))
    body = b""
    if request.content is not None:
        request.content.seek(0)
        body = request.content.read()
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
    form: dict[str, str] = {}
    if request.method == b"POST" and ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            # reversed + dict: the first value of a repeated field wins.
            form = dict(reversed(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                                           max_num_fields=MAX_FIELDS)))
        except (UnicodeDecodeError, ValueError):
            form = {}
    cookies = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.received_cookies.items()}
    peer = request.getClientAddress()
    return WebRequest(
        method=request.method.decode("ascii", "replace").upper(), path=unquote(parts.path) or "/", query=query,
        form=form, cookies=cookies, client_ip=getattr(peer, "host", None), body=body, content_type=ctype,
    )


def _write(request: server.Request, resp: Response) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(resp.status)
    for name, value in resp.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    for value in resp.cookies:
        request.responseHeaders.addRawHeader(b"Set-Cookie", value.encode("latin-1"))
    request.setHeader(b"Cache-Control", resp.cache.encode())
    if resp.body or resp.status != 303:
        request.setHeader(b"Content-Type", resp.content_type.encode())
    request.setHeader(b"Content-Length", str(len(resp.body)).encode())
    request.write(resp.body)
    request.finish()


class WebService:
    """What ``serve.build_services`` starts and stops."""

    name = "web"

    def __init__(self, runtime: Runtime, clock: Clock | None = None) -> None:
        self.runtime = runtime
        self.app = WebApp(runtime, clock or CLOCK)
        self.site = _Site(_Root(self), timeout=60)
        self.busy = 0
        self._bridges: set[Bridge] = set()
        self._servers: list[Listener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._unwatch: Any = None

    async def start(self) -> list[str]:
        endpoint = self.runtime.config.listen.https
        if endpoint is None:
            return []
        # A password changed on another node ends this node's web sessions
        # of that account too (IMAP sessions hear it on their own).
        self._unwatch = self.runtime.store.bus.watch_remote(self._remote_change)
        srv = await start_listener("https", endpoint, self._bridge, self.runtime.config.proxy,
                                   tls=self.runtime.tls.context, handshake_timeout=30)
        self._servers.append(srv)
        self._sweeper = asyncio.create_task(self._sweep(), name="postvault-web-sweep")
        return [f"https {endpoint}"]

    def _remote_change(self, change: Any) -> None:
        # On the notice thread; SessionStore is thread-safe.
        if change.kind == "logout":
            ended = self.app.sessions.drop_account(change.account_id)
            if ended:
                log.info("ended %d web sessions: password changed on another node", ended)

    def _bridge(self) -> Bridge:
        bridge = _Bridge(lambda: self.site.buildProtocol(None), secure=True, on_close=self._bridges.discard)
        self._bridges.add(bridge)
        return bridge

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.app.sessions.sweep()

    async def stop(self, drain_seconds: float) -> None:
        if self._unwatch is not None:
            self._unwatch()
        for srv in self._servers:
            srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + drain_seconds
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for bridge in list(self._bridges):
            if bridge.transport is not None:
                bridge.transport.loseConnection()
        for srv in self._servers:
            await srv.wait_closed()
        self.app.close()
