"""Rendering a tenant's own templates in a child process, with limits.

Jinja2's sandbox stops a template from reaching Python's internals (``''.__class__``), not
from using up the machine: ``{% for a in range(100000) %}{% for b in range(100000) %}
{% endfor %}{% endfor %}`` loops 10^10 times, ``{{ 'x'|center(10**9) }}`` asks for a
gigabyte, and either would hold the engine's event loop (every tenant's leads) for as long
as it runs. A template a tenant stored (:mod:`engine.notify.overrides`) is therefore
rendered here: in a fresh Python process (``python -I``, no environment: no secret reaches
it) that limits its own CPU time (:data:`CPU_S`, ``RLIMIT_CPU``) and address space
(:data:`MEMORY_BYTES`, ``RLIMIT_AS``) before it reads the template, and is killed after
:data:`WALL_S`. Each rendered part is at most :data:`MAX_RENDERED_BYTES`. At most
:data:`MAX_CHILDREN` run at once per engine process; waiting for a turn is not counted.

A child costs about 0.1 s (a new interpreter importing Jinja2): templates are checked,
previewed and test-sent through it, and the notify worker renders a message of an
overridden kind through it (one child for all the message's recipients). Templates without
any ``{{``, ``{%`` or ``{#`` are text alone and render here (nothing in them runs). The
default templates are the engine's own and render in-process
(:func:`engine.notify.templates.render`).

The child reads one JSON request on stdin and writes one JSON answer on stdout:
``{"op": "validate" | "render", "kind", "templates": {subject, text, html}, "contexts":
[...]}`` -> ``{"rendered": [{subject, text, html, unsubscribe_url}]}`` or ``{"error":
{"part", "reason"}}``. ``validate`` is :func:`engine.notify.templates.validate` (the kind's
sample data); ``render`` renders each context.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import resource
import shutil
import sys
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import msgspec

from engine.notify import NotifyError, TemplateError, templates
from engine.notify.templates import Rendered, Templates

CPU_S: Final = 3  # CPU seconds of one child (RLIMIT_CPU: SIGXCPU, then SIGKILL)
MEMORY_BYTES: Final = 512 * 1024 * 1024  # its address space (RLIMIT_AS: MemoryError)
WALL_S: Final = 10.0  # from its start to its answer, on a busy machine too
MAX_RENDERED_BYTES: Final = 1024 * 1024  # a rendered part (UTF-8)
MAX_CHILDREN: Final = max(1, (os.cpu_count() or 2) // 2)  # at once, per engine process

_MARKS: Final = ("{{", "{%", "{#")
# the child's working directory: an empty one of its own (not the engine's, which holds
# its config); made once per engine process, removed at exit
_EMPTY_DIR: Final = tempfile.mkdtemp(prefix="leadflow-sandbox-")
atexit.register(shutil.rmtree, _EMPTY_DIR, ignore_errors=True)
_CHILD = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
          "from engine.notify.sandbox import main; main()")


class _Parts(msgspec.Struct):
    subject: str
    text: str
    html: str


class _Request(msgspec.Struct):
    op: Literal["validate", "render"]
    kind: str
    templates: _Parts
    contexts: list[dict[str, Any]] = []


class _Out(msgspec.Struct):
    subject: str
    text: str
    html: str
    unsubscribe_url: str | None = None


class _Failure(msgspec.Struct):
    part: str
    reason: str


class _Answer(msgspec.Struct):
    rendered: list[_Out] | None = None
    error: _Failure | None = None


_answer = msgspec.json.Decoder(_Answer)
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def _turn() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _turns.get(loop)
    if sem is None:
        sem = _turns[loop] = asyncio.Semaphore(MAX_CHILDREN)
    return sem


async def validate(kind: str, templates: Templates) -> Rendered:
    """:func:`engine.notify.templates.validate` of a tenant's templates, in a child: the
    rendered sample, or :class:`engine.notify.TemplateError` (a template that takes too
    long or too much memory too). NotifyError when no child could be run."""
    return (await _run("validate", kind, templates, []))[0]


async def render(kind: str, templates: Templates,
                 contexts: Sequence[Mapping[str, Any]]) -> list[Rendered]:
    """``kind`` rendered with each of ``contexts`` (JSON values: text, integers, booleans),
    in one child; raises as :func:`validate`."""
    if not contexts:
        return []
    return await _run("render", kind, templates, [dict(c) for c in contexts])


def _literal(tpl: Templates) -> bool:
    """No tag, expression or comment anywhere: the templates are their own output, and
    rendering them runs nothing (Jinja2's default delimiters; no line statements)."""
    return not any(mark in part for part in (tpl.subject, tpl.text, tpl.html)
                   for mark in _MARKS)


async def _run(op: Literal["validate", "render"], kind: str, tpl: Templates,
               contexts: list[dict[str, Any]]) -> list[Rendered]:
    if _literal(tpl):  # no child for text alone
        return _here(op, kind, tpl, contexts)
    request = msgspec.json.encode(_Request(
        op, kind, _Parts(tpl.subject, tpl.text, tpl.html), contexts))
    async with _turn():
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", _CHILD, msgspec.json.encode(sys.path).decode(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env={}, cwd=_EMPTY_DIR)
        except OSError as exc:
            raise NotifyError(f"cannot start the template renderer: {exc.strerror}") from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(request), WALL_S)
        except TimeoutError:
            raise TemplateError(kind, "-", f"took more than {WALL_S:g} s to render") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    try:
        answer = _answer.decode(out)
    except msgspec.DecodeError:
        answer = _Answer()
    if answer.error is not None:
        raise TemplateError(kind, answer.error.part, answer.error.reason)
    if answer.rendered is None:  # killed: its CPU time, or its memory where Python could not say
        raise TemplateError(kind, "-", f"stopped while rendering (exit {proc.returncode}): "
                            f"more than {CPU_S} s of CPU or {MEMORY_BYTES >> 20} MiB")
    return [Rendered(r.subject, r.text, r.html, r.unsubscribe_url) for r in answer.rendered]


# ---- the child ------------------------------------------------------------------------------


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    # past a sandbox escape: no file written (a pipe is not a file), no process started
    # (for a user other than root, which the kernel does not hold to RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _here(op: Literal["validate", "render"], kind: str, tpl: Templates,
          contexts: Sequence[Mapping[str, Any]]) -> list[Rendered]:
    """What the child does (raises TemplateError), also the literal-text fast path."""
    if op == "validate":
        done = [templates.validate(kind, tpl.subject, tpl.text, tpl.html)]
    else:
        done = [templates.render(kind, c, tpl) for c in contexts]
    for r in done:
        for part in ("subject", "text", "html"):
            size = len(getattr(r, part).encode("utf-8", "surrogatepass"))
            if size > MAX_RENDERED_BYTES:
                raise TemplateError(kind, part, f"renders {size} bytes, more than "
                                                f"{MAX_RENDERED_BYTES}")
    return done


def _child(raw: bytes) -> _Answer:
    try:
        req = msgspec.json.decode(raw, type=_Request)
    except msgspec.MsgspecError as exc:
        return _Answer(error=_Failure("-", f"bad request: {exc}"))
    tpl = Templates(req.templates.subject, req.templates.text, req.templates.html)
    try:
        done = _here(req.op, req.kind, tpl, req.contexts)
    except TemplateError as exc:
        return _Answer(error=_Failure(exc.part, exc.reason))
    except MemoryError:
        return _Answer(error=_Failure("-", f"needs more than {MEMORY_BYTES >> 20} MiB"))
    return _Answer(rendered=[_Out(r.subject, r.text, r.html, r.unsubscribe_url)
                             for r in done])


def main() -> None:
    """The child: limits first, then one request from stdin, one answer to stdout."""
    _limit()
    answer = _child(sys.stdin.buffer.read())
    try:
        out = msgspec.json.encode(answer)
    except (UnicodeEncodeError, MemoryError):  # a lone surrogate in a rendered part
        out = msgspec.json.encode(_Answer(error=_Failure("-", "renders text that is not "
                                                              "valid Unicode")))
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
