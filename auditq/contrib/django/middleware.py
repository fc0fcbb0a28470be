"""Django middleware (sync and async): the request context, the actor and the tenant.

    MIDDLEWARE = [..., "auditq.contrib.django.middleware.AuditMiddleware", ...]

The request id, client IP and user agent are bound when the middleware is entered (options
from `AUDITQ_MIDDLEWARE`, as for `auditq.middleware.AuditDjangoMiddleware`). The actor and the
tenant are bound in `process_view`, which Django runs after every middleware's request phase,
so after `AuthenticationMiddleware` wherever this one is listed, and only for requests that
reach a view: `request.user` is not touched before authentication, nor for requests that
never get that far.

- actor: `AUDITQ_ACTOR` (a dotted path to `request -> actor_id | None`), by default the
  authenticated user's primary key (`actor_type="user"`); anonymous requests bind no actor.
- tenant: `AUDITQ_TENANT` (a dotted path to `request -> tenant_id | None`); none by default.

Either callable may be `async def`; a plain one runs in a thread under ASGI, as Django's ORM
requires.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async

from ... import signals
from ...context import Bound, current
from ...middleware import RequestAuditor
from ...signals import adrain_if_stopping, drain_if_stopping

Resolver = Callable[[Any], Any]


def user_actor(request: Any) -> str | None:
    """The default actor: the authenticated user's primary key."""
    user = getattr(request, "user", None)
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return str(user.pk)


async def _auser_actor(request: Any) -> str | None:
    auser = getattr(request, "auser", None)
    if auser is None:
        return await sync_to_async(user_actor)(request)
    user = await auser()
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return str(user.pk)


def _load(setting: str) -> Resolver | None:
    from django.conf import settings
    from django.utils.module_loading import import_string

    value = getattr(settings, setting, None)
    if value is None:
        return None
    found = import_string(value) if isinstance(value, str) else value
    if not callable(found):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"settings.{setting} must name a callable")
    return found  # type: ignore[no-any-return]


def _with(bound: Bound, tenant: Any, actor: Any) -> Bound:
    values = list(bound)
    if tenant is not None:
        values[0] = str(tenant)
    if actor is not None:
        values[1] = str(actor)
        values[2] = values[2] or "user"
    return tuple(values)


class AuditMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.conf import settings

        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        self.auditor = RequestAuditor(**dict(getattr(settings, "AUDITQ_MIDDLEWARE", None) or {}))
        header = self.auditor.request_id_header
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")
        if self.is_async:
            markcoroutinefunction(self)
            # Django adapts process_view by whether it is a coroutine function.
            self.process_view = self._aprocess_view  # type: ignore[method-assign,assignment]
        self.actor_of = _load("AUDITQ_ACTOR")
        # The app installs the exit handlers at ready(); a pre-fork server that loaded the
        # project in its master resets them in each worker, so the first request in a new
        # process installs them again (from the main thread only; elsewhere a no-op).
        self._exit_handlers = bool(getattr(settings, "AUDITQ_EXIT_HANDLERS", True)) and (
            "auditq.contrib.django" in settings.INSTALLED_APPS
        )
        self.tenant_of = _load("AUDITQ_TENANT")

    def _bound(self, request: Any) -> Bound:
        auditor, meta = self.auditor, request.META
        return auditor.bind(
            meta.get(self._environ_key),
            meta.get("REMOTE_ADDR"),
            meta.get("HTTP_X_FORWARDED_FOR"),
            meta.get("HTTP_USER_AGENT"),
        )

    def _check_handlers(self) -> None:
        if self._exit_handlers:
            signals.ensure_installed()

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        self._check_handlers()
        started, status = time.perf_counter(), 500
        bound = self._bound(request)
        token = current.set(bound)
        try:
            response = self.get_response(request)
            status = int(response.status_code)
            self._echo(response, bound)
            return response
        finally:
            self._finish(request, status, started)
            current.reset(token)
            drain_if_stopping()

    async def __acall__(self, request: Any) -> Any:
        self._check_handlers()
        started, status = time.perf_counter(), 500
        bound = self._bound(request)
        token = current.set(bound)
        try:
            response = await self.get_response(request)
            status = int(response.status_code)
            self._echo(response, bound)
            return response
        finally:
            self._finish(request, status, started)
            current.reset(token)
            await adrain_if_stopping()

    def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        tenant = _call_sync(self.tenant_of, request) if self.tenant_of else None
        actor = _call_sync(self.actor_of or user_actor, request)
        current.set(_with(current.get() or self._bound(request), tenant, actor))

    async def _aprocess_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        tenant = await _call_async(self.tenant_of, request) if self.tenant_of else None
        actor = await (
            _call_async(self.actor_of, request) if self.actor_of else _auser_actor(request)
        )
        current.set(_with(current.get() or self._bound(request), tenant, actor))

    def _echo(self, response: Any, bound: Bound) -> None:
        if self.auditor.echo_request_id:
            response[self.auditor.request_id_header] = str(bound[3])

    def _finish(self, request: Any, status: int, started: float) -> None:
        if not self.auditor.log_requests:
            return
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        self.auditor.log_request(
            str(request.method),
            str(request.path),
            route if isinstance(route, str) and route else None,
            status,
            started,
        )


def _call_sync(resolver: Resolver, request: Any) -> Any:
    if inspect.iscoroutinefunction(resolver):
        return async_to_sync(resolver)(request)
    return resolver(request)


def _call_async(resolver: Resolver, request: Any) -> Awaitable[Any]:
    if inspect.iscoroutinefunction(resolver):
        return resolver(request)  # type: ignore[no-any-return]
    return sync_to_async(resolver)(request)
