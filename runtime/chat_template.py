"""A model's chat template (jinja2 code from its folder), compiled and rendered with bounded time, output and value
sizes: in a sandbox whose operators, calls, filters and loops check the limits before they build anything large,
and whose output is streamed so that its length is checked as it grows."""
from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from itertools import repeat

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


_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = (dict, list, tuple, set, frozenset, *_DICT_VIEWS)


def _int_weight(v: int) -> int:
    return v.bit_length() // 3 + 1  # at least its decimal digits


def _weight(value, limit: float = sys.maxsize) -> int:
    """A bound, up to a small factor, on the text that anything can make of value (str, repr, JSON, join, pprint):
    a string weighs its length, a container its length times 1 + its depth (pprint indents each item that far)
    plus its items' weights, an item counted each time it appears ([x] * n holds n references, and its repr n
    copies). Counting stops once past limit, so that it costs O(limit) at most: every item taken adds at least 1."""
    return _measure(value, limit)[0]


def _measure(value, limit: float = sys.maxsize) -> tuple[int, int]:
    """(the weight of value, how many items its containers hold): at depth d, it weighs weight + d * items."""
    known = getattr(_render_state, "known", None) or {}
    total = items = 0
    stack = [(value, 1, 0)]
    while stack and total <= limit:
        v, n, depth = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) * n
        elif isinstance(v, int):
            total += _int_weight(v) * n
        elif id(v) in known:
            w, c = known[id(v)]
            total, items = total + (w + c * depth) * n, items + c * n
        elif isinstance(v, _CONTAINERS):
            total, items = total + len(v) * (1 + depth) * n, items + len(v) * n
            for part in (v.keys(), v.values()) if isinstance(v, dict) else (v,):
                if total > limit:
                    break
                if len(part) < 32:  # the bulk paths cost more than they save on a message or a pair
                    stack += zip(part, repeat(n), repeat(depth + 1))
                elif _all_leaves(part):
                    total += _leaves(part) * n
                else:
                    stack += _counted(part, n, depth + 1)
        elif isinstance(v, range):
            digits = max(_int_weight(v.start), _int_weight(v.stop))
            total, items = total + len(v) * (1 + depth + digits) * n, items + len(v) * n
        elif isinstance(v, _namespace_type()):
            stack.append((object.__getattribute__(v, "_Namespace__attrs"), n, depth))
        else:
            total += n
    return total, items


def _all_leaves(items) -> bool:
    types = set(map(type, items))
    return types <= {str} or types <= {int}


def _leaves(items) -> int:
    """The weight of items that are all strings or all ints, counted in C."""
    if isinstance(next(iter(items)), str):
        return sum(map(len, items))
    return sum(map(int.bit_length, items)) // 3 + len(items)


def _counted(items, n: int, depth: int) -> list:
    """(item, n times how often it appears, depth) for each distinct item: [[0]] * 300000 is weighed as one [0]
    taken 300000 times, and the counting runs in C."""
    items = list(items)
    counts = Counter(map(id, items))
    if len(counts) == len(items):
        return list(zip(items, repeat(n), repeat(depth)))
    first = dict(zip(map(id, items), items))
    return [(first[i], c * n, depth) for i, c in counts.items()]


@functools.cache
def _namespace_type():
    from jinja2.utils import Namespace
    return Namespace


def _refuse_weight(value, what: str, times: int = 1) -> int:
    """value (times over) refused when its weight is over the limit; its weight (times over) otherwise."""
    limit = _max_chars()
    weight = _weight(value, limit // times) * times if times > 0 else 0
    if weight > limit:
        raise ChatTemplateError(f"chat template: {what} would have a size over the limit of {limit} (items counted "
                                f"each time they appear)")
    return weight


def _weighed(value):
    """A value about to be turned into text (output, ~): refused when its text could be over the limit."""
    if not isinstance(value, str):
        _refuse_weight(value, f"the text of a {type(value).__name__}")
    return value


def _metered(items, what: str):
    """An iterator's items, refused once their weights add up past the limit: a generator can make far more than
    its input holds (map('center', 99999))."""
    budget = _max_chars()
    for item in items:
        _tick()
        budget -= 1 + _weight(item, budget)
        if budget < 0:
            raise ChatTemplateError(f"chat template: the items of {what} would have a size over the limit of "
                                    f"{_max_chars()}")
        yield item


def _sized(value):
    """A value a template built: refused when longer, or heavier, than the limit; an iterator is metered."""
    if isinstance(value, (str, bytes)):
        _refuse_size(len(value), f"a {type(value).__name__}")
    elif isinstance(value, Iterator) and type(value).__name__ != "LoopContext":
        return _metered(value, f"a {type(value).__name__}")
    else:
        _refuse_weight(value, f"a {type(value).__name__}")
    return value


def _refuse_int(v, what: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > TEMPLATE_INT:
        raise ChatTemplateError(f"chat template: {what} {v} is over the limit of {TEMPLATE_INT}")


def _refuse_format(fmt: str) -> int:
    """Widths and precisions written in a format string ('%0999999999d', '{:>999999999}'); the widest."""
    widest = max((int(digits[:12]) for digits in re.findall(r"\d+", fmt)), default=0)
    _refuse_int(widest, "a number in a format string,")
    return widest


def _checked_binop(op: str, a, b):
    """The operators that can build a huge value in one step: checked before they run."""
    ints = all(isinstance(v, int) and not isinstance(v, float) for v in (a, b))
    if op == "**" and ints and abs(a) > 1 and b > 0 and b * a.bit_length() > TEMPLATE_INT_BITS:
        raise ChatTemplateError(f"chat template: {a} ** {b} is over the limit of {TEMPLATE_INT_BITS} bits")
    if op == "*":
        if ints and a.bit_length() + b.bit_length() > TEMPLATE_INT_BITS:
            raise ChatTemplateError(f"chat template: a product over the limit of {TEMPLATE_INT_BITS} bits")
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, str) and isinstance(n, int):
                _refuse_size(len(seq) * max(n, 0), f"str * {n}")
            elif isinstance(seq, (list, tuple)) and isinstance(n, int):
                _refuse_weight(seq, f"{type(seq).__name__} * {n}", times=n)
    if op == "%" and isinstance(a, str):
        _refuse_percent_format(a, b, "the result of %")
    return _sized(_BINOPS[op](a, b))


def _refuse_percent_format(fmt: str, args, what: str) -> None:
    """fmt % args: a tuple's items are used once each; a mapping or a single value may be used by every field."""
    items = args if isinstance(args, tuple) else (args,)
    for v in items:
        _refuse_int(v, "a width")
    fields = fmt.count("%")
    width = max([_refuse_format(fmt), *(v for v in items if isinstance(v, int) and not isinstance(v, bool))])
    uses = 1 if isinstance(args, tuple) else fields
    _refuse_size(len(fmt) + fields * width + _weight(args, _max_chars()) * uses, what)


def _refuse_str_format(fmt: str, args: tuple, kwargs: dict, what: str) -> None:
    """fmt.format(...): each field weighs as much as the argument it names (one may be named many times)."""
    import _string

    width = _refuse_format(fmt)
    try:
        fields = [(name, spec) for _, name, spec, _ in _string.formatter_parser(fmt) if name is not None]
    except ValueError:
        return  # the call itself fails on it
    auto, weights = 0, {}
    size = len(fmt)
    for name, spec in fields:
        key = re.match(r"[^.\[]*", name).group()
        if key == "":
            key, auto = auto, auto + 1
        elif key.isdigit():
            key = int(key)
        arg = (args[key] if key < len(args) else None) if isinstance(key, int) else kwargs.get(key)
        if id(arg) not in weights:
            weights[id(arg)] = _weight(arg, _max_chars())
        size += weights[id(arg)] + (TEMPLATE_INT if "{" in (spec or "") else width)
        _refuse_size(size, what)


_BINOPS = {"*": lambda a, b: a * b, "**": lambda a, b: a ** b, "%": lambda a, b: a % b, "+": lambda a, b: a + b}


def _predicted_size(name: str, value, args: tuple, kwargs: dict) -> int | None:
    """The size of what a string builder is about to make, for those whose result can be a product of sizes."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if not isinstance(value, str):
        if name == "join" and hasattr(value, "__len__"):  # the join filter: value is the sequence
            sep = arg(0, "d", "")
            return _weight(value, _max_chars()) + len(value) * len(sep) if isinstance(sep, str) else None
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
        return _weight(items, _max_chars()) + len(value) * len(items) if hasattr(items, "__len__") else None
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
    elif name == "format":  # the format filter is value % args, str.format is told apart by its fields
        if "{" in value:
            _refuse_str_format(value, args, kwargs, "the result of format()")
        if "%" in value:
            _refuse_percent_format(value, kwargs or args, "the result of format()")
    elif name == "format_map":
        _refuse_str_format(value, (), arg(0, "mapping") or {}, "the result of format_map()")
    return None


def _refuse_inputs(name: str, values: tuple) -> None:
    limit, total = _max_chars(), 0
    for v in values:
        total += _weight(v, limit - total)
        if total > limit:
            raise ChatTemplateError(f"chat template: the input of {name}() would have a size over the limit of "
                                    f"{limit} (items counted each time they appear)")


def _check_call(name: str, value, args: tuple, kwargs: dict) -> None:
    _tick()
    for v in (*args, *kwargs.values()):
        _refuse_int(v, f"argument of {name}():")
    _refuse_inputs(name, (value, *args, *kwargs.values()))
    if name == "sum" and not isinstance(args[1] if len(args) > 1 else kwargs.get("start", 0), (int, float)):
        raise ChatTemplateError("chat template: sum() adds numbers only (a sum of lists copies the partial sum "
                                "at every step)")
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
    size = len(value) if isinstance(value, str) else _refuse_weight(value, f"the text of a {type(value).__name__}")
    if n is not None:
        n += size
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
                fields = ((), args[0]) if value.__name__ == "format_map" and args and isinstance(args[0], dict) \
                    else (args, kwargs)
                _refuse_str_format(value.__self__, *fields, f"the result of {value.__name__}()")
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
            node.nodes = [wrap(n, "dllm_weighed") for n in node.nodes]
            return wrap(node, "dllm_sized")

        def visit_List(self, node):  # literals that repeat an item: [a, a, a, a]
            self.generic_visit(node)
            return wrap(node, "dllm_sized")

        visit_Dict = visit_List

        def visit_Tuple(self, node):
            self.generic_visit(node)
            return wrap(node, "dllm_sized") if node.ctx == "load" else node

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
    env.filters.update(dllm_loop=_loop, dllm_sized=_sized, dllm_emitted=_emitted, dllm_weighed=_weighed)
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


def _input_weights(messages: list) -> dict[int, tuple[int, int]]:
    """_measure of each message and of their list, by id: the template may weigh them at every step (messages
    |length in a loop), and they cannot change while it runs (the sandbox is immutable; the caller holds them)."""
    known = {id(m): _measure(m) for m in messages}
    weights, items = zip(*(known[id(m)] for m in messages)) if messages else ((), ())
    known[id(messages)] = (len(messages) + sum(weights) + sum(items), len(messages) + sum(items))
    return known


def render(template, messages: list[dict], **variables) -> str:
    """The template's output for these messages; ChatTemplateError (one line) past a limit or on any error."""
    state = _render_state
    state.known = _input_weights(messages)
    limit = TEMPLATE_CHARS + 2 * state.known[id(messages)][0]
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
        state.deadline = state.emitted = state.known = None
