"""Decoding options -> (schedule, policy). The one place where the CLI, the Python API, the server and eval turn
what a user asked for into a decoding plan, so that the same options decode the same way everywhere.

Schedule choice: `block_length` or `steps` given -> LLaDA's block schedule; `window` given -> Elastic-Cache's
sliding window; neither -> the cache's own default: elastic slides a window of 16 with threshold 0.9; none is
LLaDA's baseline (blocks of 32, one token per step); prefix and dual are Fast-dLLM (blocks of 32, threshold 0.9).

Gamma: the one given, else the engine's calibrated gamma for the drift metric (manifest.json's `calibration`
block, written by `dllm-trt calibrate`), else DEFAULT_GAMMA (resolve_gamma).

Entry points hand their options to decode_options (a request's fields, the command line's flags) and show an
OptionError their own way; the rules themselves live only here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .policies import Policy, make_policy
from .schedule import BlockSchedule, WindowSchedule

CACHES = ("none", "prefix", "dual", "elastic")
DEFAULT_GEN_LENGTH = 256
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_WINDOW = 16
DEFAULT_THRESHOLD = 0.9
DEFAULT_GAMMA = 0.9
GAMMA_RANGE = (-1.0, 2.0)   # similarities are in [-1, 1]; above 1 always refreshes
CALIBRATED = "calibrated"   # gamma="calibrated": the engine's calibrated gamma, an error when it has none


class OptionError(ValueError):
    """A bad decoding option. `field` is the option's name; entry points show it their own way (--gen-length,
    max_tokens, ...)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class PromptTooLong(ValueError):
    pass


@dataclass
class DecodeOptions:
    cache: str = "elastic"
    gen_length: int | None = None       # None: the model's default (else DEFAULT_GEN_LENGTH), or less when that
                                        # does not fit the model
    block_length: int | None = None
    steps: int | None = None            # block schedule: total steps (None: threshold-driven, or one token/step)
    window: int | None = None
    threshold: float | None = None
    tokens_per_step: int = 1            # window schedule without a threshold
    early_stop: bool | None = None      # None: on for the window, off for blocks
    gamma: float | str | None = None    # None: the engine's calibrated gamma, else DEFAULT_GAMMA (resolve_gamma)
    track_num: int = 1
    drift_metric: str = "heads"
    refresh_alignment: str = "rerun"

    @property
    def uses_blocks(self) -> bool:
        if self.block_length is not None or self.steps is not None:
            return True
        return self.window is None and self.cache != "elastic"

    def validate(self) -> "DecodeOptions":
        if self.cache not in CACHES:
            raise OptionError("cache", f"must be one of {', '.join(CACHES)}; got {self.cache!r}")
        for name in ("gen_length", "block_length", "steps", "window", "tokens_per_step", "track_num"):
            value = getattr(self, name)
            if value is None and name not in ("tokens_per_step", "track_num"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise OptionError(name, f"must be an integer, got {value!r}")
            if value < 1:
                raise OptionError(name, f"must be at least 1, got {value}")
        if self.threshold is not None:
            _check_range("threshold", self.threshold, 0.0, 1.0)
        if self.gamma is not None and self.gamma != CALIBRATED:
            check_gamma(self.gamma)
        if self.early_stop is not None and not isinstance(self.early_stop, bool):
            raise OptionError("early_stop", f"must be true or false, got {self.early_stop!r}")
        if self.drift_metric not in ("heads", "keys"):
            raise OptionError("drift_metric", f"must be 'heads' or 'keys', got {self.drift_metric!r}")
        if self.refresh_alignment not in ("rerun", "next"):
            raise OptionError("refresh_alignment", f"must be 'rerun' or 'next', got {self.refresh_alignment!r}")
        if self.window is not None and (self.block_length is not None or self.steps is not None):
            raise OptionError("window", "cannot be combined with the block schedule (block_length / steps)")
        if self.cache in ("prefix", "dual") and not self.uses_blocks:
            raise OptionError("window", f"does not apply to the {self.cache} cache, which follows Fast-dLLM's "
                                        f"blocks (use block_length)")
        return self

    def fit_gen_length(self, prompt_len: int, max_positions: int, default: int | None = None) -> int:
        """The generation length for this prompt: the one asked for (PromptTooLong when it does not fit), or the
        default (the model's own, e.g. generation_config.json's max_new_tokens, else DEFAULT_GEN_LENGTH), shortened
        to what fits (a multiple of the block length for the block schedule)."""
        room = max_positions - prompt_len
        if self.gen_length is not None:
            if self.gen_length > room:
                raise PromptTooLong(f"prompt ({prompt_len} tokens) + gen length ({self.gen_length}) exceeds the "
                                    f"{max_positions} positions available; {max(room, 0)} or fewer fit")
            return self.gen_length
        n = min(default_gen_length(default), room)
        block = self.block_length or DEFAULT_BLOCK_LENGTH
        if self.uses_blocks and n > block:
            n -= n % block
        if n < 1:
            raise PromptTooLong(f"prompt ({prompt_len} tokens) leaves no room in the {max_positions} positions "
                                f"available")
        return n


def decode_options(given: dict) -> DecodeOptions:
    """Options as a request or the command line gives them, validated (OptionError): DecodeOptions' field names,
    `max_tokens` (OpenAI's name) for gen_length, and None for an option's default."""
    given = dict(given)
    if "max_tokens" in given:
        if given.get("gen_length") is not None:
            raise OptionError("max_tokens", "and gen_length are the same option: give one")
        given["gen_length"] = given.pop("max_tokens")
    unknown = sorted(set(given) - set(option_names()))
    if unknown:
        raise OptionError(unknown[0], "is not a decoding option")
    return DecodeOptions(**{name: value for name, value in given.items() if value is not None}).validate()


def default_gen_length(declared: int | None) -> int:
    """The generation length when none is asked for: the model's own (generation_config.json's max_new_tokens),
    else DEFAULT_GEN_LENGTH."""
    return declared or DEFAULT_GEN_LENGTH


def check_gamma(gamma) -> None:
    """OptionError unless `gamma` is a number in GAMMA_RANGE (the word "calibrated" is resolve_gamma's to check)."""
    _check_range("gamma", gamma, *GAMMA_RANGE, hint=" (similarities are in [-1, 1]; above 1 always refreshes)")


def _check_range(name: str, value, lo: float, hi: float, hint: str = "") -> None:
    if not _is_number(value) or not lo <= value <= hi:
        raise OptionError(name, f"must be in [{lo:g}, {hi:g}]{hint}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_gamma(opts: DecodeOptions, calibration: dict | None) -> tuple[float, str]:
    """(gamma, where it came from: "given", "calibrated" or "default"). `calibration` is the engine's calibration
    block ({} or None when it has none)."""
    if opts.gamma is not None and opts.gamma != CALIBRATED:
        return float(opts.gamma), "given"
    calibrated = (calibration or {}).get("gamma", {}).get(opts.drift_metric)
    if calibrated is not None:
        return float(calibrated), "calibrated"
    if opts.gamma == CALIBRATED:
        raise OptionError("gamma", f"'calibrated': the engine has no calibrated gamma for drift metric "
                                   f"{opts.drift_metric!r} (dllm-trt calibrate ENGINES --data FILE.jsonl)")
    return DEFAULT_GAMMA, "default"


def build(opts: DecodeOptions, gen_length: int, calibration: dict | None = None):
    """(schedule, policy) for one generation of `gen_length` positions; an unset gamma is the engine's calibrated
    one (`calibration`: the engine's calibration block). Raises OptionError."""
    opts.validate()
    gamma, _ = resolve_gamma(opts, calibration)
    schedule = _schedule(opts, gen_length)
    policy: Policy = make_policy(opts.cache, gamma, opts.track_num, opts.drift_metric, opts.refresh_alignment)
    return schedule, policy


def check_schedule(opts: DecodeOptions) -> None:
    """The errors of the schedule for a given gen_length (e.g. blocks that do not divide it), found without a model,
    for entry points that refuse before opening or exporting one. Raises OptionError."""
    if opts.validate().gen_length is not None:
        _schedule(opts, opts.gen_length)


def _schedule(opts: DecodeOptions, gen_length: int) -> BlockSchedule | WindowSchedule:
    if opts.uses_blocks:
        block = opts.block_length or min(DEFAULT_BLOCK_LENGTH, gen_length)
        if gen_length % block:
            raise OptionError("gen_length", f"({gen_length}) must be a multiple of the block length ({block})")
        steps, threshold = opts.steps, opts.threshold
        if steps is None and threshold is None:
            if opts.cache == "none":
                steps = gen_length  # LLaDA's baseline: one token per step
            else:
                threshold = DEFAULT_THRESHOLD  # Fast-dLLM's caches come with its confidence threshold
        n_blocks = gen_length // block
        if steps is not None and steps % n_blocks:
            raise OptionError("steps", f"({steps}) must be a multiple of the number of blocks ({n_blocks})")
        return BlockSchedule(gen_length, block, steps, threshold if steps is None else None, bool(opts.early_stop))
    threshold = opts.threshold
    if threshold is None and opts.tokens_per_step == 1:
        threshold = DEFAULT_THRESHOLD
    return WindowSchedule(gen_length, opts.window or DEFAULT_WINDOW, threshold, opts.tokens_per_step,
                          True if opts.early_stop is None else opts.early_stop)


def option_names() -> list[str]:
    return [f.name for f in fields(DecodeOptions)]
