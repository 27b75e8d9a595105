"""A model's chat template (jinja2 code from its folder), compiled and rendered with bounded time, output and value
sizes: in a sandbox whose operators, calls, filters and loops check the limits before they build anything large,
and whose output is streamed so that its length is checked as it grows."""
from __future__ import annotations

import functools
import re
import threading
import time

from .config import ModelError


class ChatTemplateError(ValueError):
    """The chat template refused the messages (raise_exception, or an error while rendering, or a rendering that
    went past the time, output or value limits below)."""


# Limits of a chat template's rendering. Values and output may also be twice as long as the messages' own text.
TEMPLATE_SECONDS = 2.0
TEMPLATE_CHARS = 1_000_000
TEMPLATE_INT = 100_000  # widths, repeat counts and other int arguments of string builders
TEMPLATE_INT_BITS = 65_536  # integers built with * and **
_EMITTED_FACTOR = 10  # output written anywhere (macros and set blocks included), relative to TEMPLATE_CHARS
def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---- bounded chat-template rendering -------------------------------------------------------------------------------
_render_state = threading.local()  # the limits of the rendering under way in this thread


def _tick() -> None:
    deadline = getattr(_render_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template: rendering took longer than the limit of {TEMPLATE_SECONDS:g} s")


def _max_chars() -> int:
    return getattr(_render_state, "chars", TEMPLATE_CHARS)


def _refuse_size(n: int, what: str) -> None:
    if n > _max_chars():
        raise ChatTemplateError(f"chat template: {what} would have length {n}, over the limit of {_max_chars()}")


def _sized(value):
    """A value a template built: refused when longer than the limit."""
    if isinstance(value, (str, list, tuple, dict, set, frozenset, bytes)):
        _refuse_size(len(value), f"a {type(value).__name__}")
    return value


def _refuse_int(v, what: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > TEMPLATE_INT:
        raise ChatTemplateError(f"chat template: {what} {v} is over the limit of {TEMPLATE_INT}")


def _refuse_format(fmt: str) -> None:
    """Widths and precisions written in a format string ('%0999999999d', '{:>999999999}')."""
    for digits in re.findall(r"\d+", fmt):
        _refuse_int(int(digits[:12]), "a number in a format string,")


def _checked_binop(op: str, a, b):
    """The operators that can build a huge value in one step: checked before they run."""
    ints = all(isinstance(v, int) and not isinstance(v, float) for v in (a, b))
    if op == "**" and ints and abs(a) > 1 and b > 0 and b * a.bit_length() > TEMPLATE_INT_BITS:
        raise ChatTemplateError(f"chat template: {a} ** {b} is over the limit of {TEMPLATE_INT_BITS} bits")
    if op == "*":
        if ints and a.bit_length() + b.bit_length() > TEMPLATE_INT_BITS:
            raise ChatTemplateError(f"chat template: a product over the limit of {TEMPLATE_INT_BITS} bits")
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _refuse_size(len(seq) * max(n, 0), f"{type(seq).__name__} * {n}")
    if op == "%" and isinstance(a, str):
        _refuse_format(a)
        for v in b if isinstance(b, tuple) else (b,):
            _refuse_int(v, "a width")
    return _sized(_BINOPS[op](a, b))


_BINOPS = {"*": lambda a, b: a * b, "**": lambda a, b: a ** b, "%": lambda a, b: a % b, "+": lambda a, b: a + b}


def _predicted_size(name: str, value, args: tuple, kwargs: dict) -> int | None:
    """The size of what a string builder is about to make, for those whose result can be a product of sizes."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if not isinstance(value, str):
        if name == "join" and hasattr(value, "__len__"):  # the join filter: value is the sequence
            sep = arg(0, "d", "")
            return len(value) * len(sep) if isinstance(sep, str) else None
        return None
    if name == "replace":
        old, new, count = arg(0, "old"), arg(1, "new"), arg(2, "count")
        if isinstance(old, str) and isinstance(new, str):
            n = value.count(old) if old else len(value) + 1
            if isinstance(count, int) and count >= 0:
                n = min(n, count)
            return len(value) + n * max(len(new) - len(old), 0)
    elif name == "join":  # str.join: value is the separator
        items = arg(0, "iterable")
        return len(value) * len(items) if hasattr(items, "__len__") else None
    elif name == "expandtabs":
        size = arg(0, "tabsize", 8)
        return len(value) + value.count("\t") * size if isinstance(size, int) else None
    elif name == "indent":
        width = arg(0, "width", 4)
        return len(value) + (value.count("\n") + 1) * len(width) if isinstance(width, str) else None
    elif name == "wordwrap":
        width, wrap = arg(0, "width", 79), arg(2, "wrapstring")
        if isinstance(width, int) and isinstance(wrap, str):
            return len(value) + (len(value) // max(width, 1) + 1) * len(wrap)
    elif name == "translate":
        table = arg(0, "table")
        if isinstance(table, dict):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            return len(value) * longest
    elif name in ("format", "format_map"):
        _refuse_format(value)
    return None


def _check_call(name: str, value, args: tuple, kwargs: dict) -> None:
    _tick()
    for v in (*args, *kwargs.values()):
        _refuse_int(v, f"argument of {name}():")
    size = _predicted_size(name, value, args, kwargs)
    if size is not None:
        _refuse_size(size, f"the result of {name}()")


def _bounded_filter(name: str, f):
    value_at = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # after the context jinja passes

    @functools.wraps(f)  # keeps jinja_pass_arg
    def run(*args, **kwargs):
        value = args[value_at] if len(args) > value_at else None
        _check_call(name, value, args[value_at + 1:], kwargs)
        return _sized(f(*args, **kwargs))
    return run


def _loop(iterable):
    """Every {% for %} iterates through this: the time limit holds inside loops that write nothing."""
    for item in iterable:
        _tick()
        yield item


def _emitted(value):
    """Every piece of output, buffered ones (macros, set blocks, filter blocks) included, counts here."""
    n = getattr(_render_state, "emitted", None)
    if n is not None:
        n += len(value) if isinstance(value, str) else 0
        limit = _EMITTED_FACTOR * _max_chars()
        if n > limit:
            raise ChatTemplateError(f"chat template: it wrote more than the limit of {limit} characters")
        _render_state.emitted = n
    return value


def _bounded_environment():
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        def __setitem__(self, name, value):
            super().__setitem__(name, _sized(value))

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(_BINOPS)  # also keeps them from being folded at compile time

        def call_binop(self, context, operator, left, right):
            return _checked_binop(operator, left, right)

        def call(self, context, obj, /, *args, **kwargs):
            owner = getattr(obj, "__self__", None)
            _check_call(getattr(obj, "__name__", "a function"), owner if isinstance(owner, str) else None,
                        args, kwargs)
            return _sized(super().call(context, obj, *args, **kwargs))

        def wrap_str_format(self, value):
            run = super().wrap_str_format(value)
            if run is None:
                return None

            def checked(*args, **kwargs):
                _refuse_format(value.__self__)
                return run(*args, **kwargs)
            return checked

    def wrap(node, name):
        return nodes.Filter(node, name, [], [], None, None)

    class Guard(NodeTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = wrap(node.iter, "dllm_loop")
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return wrap(node, "dllm_sized")

        def visit_AssignBlock(self, node):
            self.generic_visit(node)
            node.filter = wrap(node.filter, "dllm_sized")
            return node

        def visit_Output(self, node):
            self.generic_visit(node)
            node.nodes = [wrap(n, "dllm_emitted") for n in node.nodes]
            return node

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals.pop("lipsum", None)  # n paragraphs of min..max words each: a product no check sees coming
    env.globals["namespace"] = BoundedNamespace
    env.globals["raise_exception"] = _raise_exception
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(dllm_loop=_loop, dllm_sized=_sized, dllm_emitted=_emitted)
    return env, Guard()


def compile_template(text: str, where: str):
    """The template compiled in the bounded sandbox; ModelError (naming `where`) when it does not compile."""
    from jinja2 import TemplateError

    env, guard = _bounded_environment()
    try:
        tree = guard.visit(env.parse(text))
        tree.set_environment(env)
        return env.from_string(tree)
    except TemplateError as e:
        raise ModelError(f"{where}: chat_template does not compile ({e})") from None
    except RecursionError:
        raise ModelError(f"{where}: chat_template is nested too deeply") from None


def render(template, messages: list[dict], **variables) -> str:
    """The template's output for these messages; ChatTemplateError (one line) past a limit or on any error."""
    limit = TEMPLATE_CHARS + 2 * sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    state = _render_state
    state.deadline, state.chars, state.emitted = time.monotonic() + TEMPLATE_SECONDS, limit, 0
    out, size = [], 0
    chunks = None
    try:
        chunks = template.generate(messages=messages, **variables)
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ChatTemplateError(f"chat template: output longer than the limit of {limit} characters")
            _tick()
            out.append(chunk)
        return "".join(out)
    except ChatTemplateError:
        raise
    except RecursionError:
        raise ChatTemplateError("chat template: recursion too deep") from None
    except Exception as e:  # a template is code: jinja errors, TypeErrors, sandbox refusals
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {first_line(e)}") from None
    finally:
        if chunks is not None:
            chunks.close()
        state.deadline = state.emitted = None
