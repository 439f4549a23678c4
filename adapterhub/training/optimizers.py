"""Optimizers and learning-rate schedules, as mlx_lm.lora names, configures and builds them.

- `optimizer`: one of mlx-lm's five; `optimizer_config` is mlx-lm's YAML mapping from an optimizer's
  name to keyword arguments of its mlx.optimizers class (`{adamw: {weight_decay: 0.01}}`).
- `lr_schedule`: mlx-lm's `{name, arguments, warmup, warmup_init}`: a schedule of
  mlx.optimizers.schedulers with its positional arguments (the first is the peak rate), after a
  linear warm-up from `warmup_init` over `warmup` steps. mlx-lm's own build_schedule builds it.

Options are checked here before any model loads: mlx-lm would find a bad key only when it builds
the optimizer, after the model loaded.
"""

from __future__ import annotations

import inspect
import math
import numbers

from ..errors import AdapterHubError

OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "muon": "Muon", "sgd": "SGD", "adafactor": "Adafactor"}
SCHEDULES = ("cosine_decay", "linear_schedule", "exponential_decay", "step_decay")
# Schedules whose arguments follow from --learning-rate and the steps after warm-up when the command line
# names only the schedule: decay to zero (cosine, linear) over the rest of the run.
_DEFAULT_ARGUMENTS = {
    "cosine_decay": lambda rate, steps: [rate, steps],
    "linear_schedule": lambda rate, steps: [rate, 0.0, steps],
}
SCHEDULE_HELP = ("NAME or NAME:ARG,ARG,... of mlx.optimizers.schedulers, as mlx-lm's lr_schedule "
                 f"({', '.join(SCHEDULES)}); cosine_decay and linear_schedule alone decay --learning-rate "
                 "to 0 over the steps after --warmup")


def optimizer_class(name: str):
    import mlx.optimizers as optim

    return getattr(optim, OPTIMIZERS[name])


def keyword_arguments(config) -> dict:
    """The chosen optimizer's entry of optimizer_config (mlx-lm ignores the others)."""
    return dict((config.optimizer_config or {}).get(config.optimizer) or {})


def learning_rate(config):
    """The schedule mlx-lm builds from lr_schedule, or the constant --learning-rate."""
    from mlx_lm.tuner.utils import build_schedule

    return build_schedule(config.lr_schedule) if config.lr_schedule else config.learning_rate


def build(config):
    """The optimizer mlx_lm.lora builds for the same options."""
    return optimizer_class(config.optimizer)(learning_rate=learning_rate(config), **keyword_arguments(config))


def normalized_config(optimizer: str, optimizer_config):
    """Only the chosen optimizer's non-empty entry, so unused entries (mlx-lm's YAML lists all five) change no hash.

    Anything malformed is returned as is, for `problems` to name.
    """
    if not isinstance(optimizer_config, dict) or any(k not in OPTIMIZERS for k in optimizer_config):
        return optimizer_config
    chosen = optimizer_config.get(optimizer)
    return {optimizer: chosen} if chosen else {}


def _bad_number(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_bad_number(v) for v in value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


def problems(config) -> list[str]:
    """Why the optimizer and schedule options cannot train (empty when they can)."""
    if config.optimizer not in OPTIMIZERS:
        return [f"--optimizer {config.optimizer} is not one of mlx-lm's ({', '.join(OPTIMIZERS)})"]
    found = _optimizer_config_problems(config)
    if config.lr_schedule is not None:
        found += _schedule_problems(config.lr_schedule, config.iters)
    return found


def _optimizer_config_problems(config) -> list[str]:
    mapping = config.optimizer_config
    if not isinstance(mapping, dict):
        return [f"optimizer_config must map optimizer names to their options, as in mlx-lm's config (got {mapping!r})"]
    unknown = sorted(set(mapping) - set(OPTIMIZERS))
    if unknown:
        return [f"optimizer_config names {', '.join(map(repr, unknown))}, not one of mlx-lm's optimizers ({', '.join(OPTIMIZERS)})"]
    options = mapping.get(config.optimizer) or {}
    if not isinstance(options, dict):
        return [f"optimizer_config.{config.optimizer} must be a mapping of keyword arguments, got {options!r}"]
    cls = optimizer_class(config.optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "learning_rate"}
    unaccepted = sorted(set(options) - accepted)
    if unaccepted:
        return [f"optimizer_config.{config.optimizer} has {', '.join(unaccepted)}, which mlx.optimizers.{cls.__name__} "
                f"does not take ({', '.join(sorted(accepted))}; the rate comes from --learning-rate or lr_schedule)"]
    bad = [k for k, v in options.items() if _bad_number(v)]
    if bad:
        return [f"optimizer_config.{config.optimizer}.{bad[0]} must be a finite number, got {options[bad[0]]!r}"]
    try:
        cls(learning_rate=config.learning_rate, **options)
    except Exception as e:  # a wrong type or value for a key the class takes: its own words
        return [f"optimizer_config.{config.optimizer} is not one mlx.optimizers.{cls.__name__} accepts ({type(e).__name__}: {e})"]
    return []


def _schedule_problems(schedule, iters: int) -> list[str]:
    """mlx-lm builds the schedule only after the model loaded: build it here, and sample it, to fail first."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule

    if not isinstance(schedule, dict) or not isinstance(schedule.get("arguments"), list) or not schedule["arguments"]:
        return [f"lr_schedule must be a mapping with name and arguments, as in mlx-lm's config (got {schedule!r})"]
    warmup, warmup_init = schedule.get("warmup", 0), schedule.get("warmup_init", 0.0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        return [f"lr_schedule warmup must be a whole number of steps, 0 or more (got {warmup!r})"]
    if isinstance(warmup_init, bool) or not isinstance(warmup_init, numbers.Real) or _bad_number(warmup_init) or warmup_init < 0:
        return [f"lr_schedule warmup_init must be a finite rate, 0 or more (got {warmup_init!r})"]
    try:
        fn = build_schedule(schedule)
        rates = [float(fn(mx.array(step))) for step in sorted({0, 1, warmup, warmup + 1, iters // 2, iters})]
    except Exception as e:  # any mistake in the mapping: a name mlx has no schedule for, wrong arguments
        return [f"lr_schedule {schedule!r} is not one mlx-lm can build ({type(e).__name__}: {e})"]
    if not all(math.isfinite(r) and r >= 0 for r in rates):
        return [f"lr_schedule {schedule!r} gives learning rates {rates}: they must be finite and not negative"]
    return []


def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def schedule_from_options(current: dict | None, text: str | None, warmup: int | None, warmup_init: float | None,
                          rate: float, iters: int) -> dict | None:
    """lr_schedule from the command line (--lr-schedule, --warmup, --warmup-init) over the one from --config.

    A schedule named on the command line replaces the file's name and arguments; --warmup and
    --warmup-init replace those keys alone, wherever the schedule came from.
    """
    if (text is None and warmup is None and warmup_init is None) or (current is not None and not isinstance(current, dict)):
        return current  # nothing to change, or a malformed file's schedule, which the checks name
    if text is None and current is None:
        raise AdapterHubError("--warmup and --warmup-init warm up into a schedule, and none is given",
                              hint="add --lr-schedule cosine_decay (or lr_schedule in the --config file)")
    schedule = dict(current or {})
    if warmup is not None:
        schedule["warmup"] = warmup
    if warmup_init is not None:
        schedule["warmup_init"] = warmup_init
    if text is not None:
        name, _, arguments = text.partition(":")
        name = name.strip()
        if arguments.strip():
            try:
                values = [_number(a) for a in arguments.split(",")]
            except ValueError:
                raise AdapterHubError(f"--lr-schedule {text}: the arguments must be numbers, as in NAME:1e-5,1000",
                                      hint=SCHEDULE_HELP) from None
        elif name in _DEFAULT_ARGUMENTS:
            values = _DEFAULT_ARGUMENTS[name](rate, max(iters - schedule.get("warmup", 0), 1))
        else:
            raise AdapterHubError(f"--lr-schedule {name} needs its arguments (e.g. {name}:1e-5,...)", hint=SCHEDULE_HELP)
        schedule.update(name=name, arguments=values)
    return {"name": schedule.get("name"), "arguments": schedule.get("arguments"),
            **{k: schedule[k] for k in ("warmup", "warmup_init") if k in schedule}}
