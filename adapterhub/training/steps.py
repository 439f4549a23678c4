"""One training step, compiled: the loss, the gradients, their combination across ranks, the update.

The step is mlx-lm's (value_and_grad of its loss, gradient accumulation, one compiled graph).
What differs under mlx.launch: mlx-lm averages each rank's gradient of its own mean loss, so a
token on a rank that drew shorter rows weighs more. Here each rank's gradient counts by its share
of the global batch's tokens, so N ranks compute the gradient of the same mean loss one process
would on the whole batch, and the same adapter comes out, up to the order of floating-point sums.
Still one all-reduce per step, as in mlx-lm: the token counts travel in the gradients' buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial


@dataclass
class Batches:
    """mlx-lm's iterate_batches on a private numpy random state, so evaluation cannot shift the order.

    Every rank draws the same permutation (the same seed, the same state), and iterate_batches gives
    each its slice of every global batch: the data position is global, and resuming replays it.
    """

    iterator: object
    state: tuple | None = None

    def __next__(self):
        import numpy as np

        outer = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        try:
            return next(self.iterator)
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outer)


@cache
def _checkpointed(cls: type) -> type:
    """A subclass of a layer class whose forward is recomputed in the backward pass instead of stored."""
    import mlx.core as mx

    def __call__(self, *args, **kwargs):
        def forward(parameters, *args, **kwargs):
            self.update(parameters)
            return cls.__call__(self, *args, **kwargs)

        # The trainable parameters go in as inputs, so their gradients flow through the recomputation.
        return mx.checkpoint(forward)(self.trainable_parameters(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__doc__": f"{cls.__name__} with gradient checkpointing."})


def checkpoint_gradients(model) -> None:
    """--grad-checkpoint: each decoder layer keeps only its input for the backward pass, as mlx-lm's option does.

    mlx-lm patches the layer class itself, for every model of that class in the process, once per call;
    here only this model's layers change class, so a later model (a test, an evaluation) is untouched.
    Call it before LoReFT wraps the layers: its edits depend on the batch's prompts, set only during
    the forward, and must stay outside the recomputed part.
    """
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))


def compile_step(model, optimizer, loss_fn, config, world, retract=None):
    """The compiled step and the state it updates.

    `step(batch, previous, do_update, stop)` returns (loss, tokens, stop, gradient accumulated so far):
    the global batch's mean loss and token count, and the sum of the ranks' `stop` flags, so every rank
    learns in the same step that one of them must stop.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    accumulation = config.grad_accumulation_steps

    def weighted(value, tokens, grad, stop):
        """Each rank's gradient weighted by its tokens, and its loss, tokens and stop flag, to be summed across ranks."""
        tokens = tokens.astype(mx.float32)
        return tree_map(lambda g: g * tokens.astype(g.dtype), grad), mx.stack([value.astype(mx.float32) * tokens, tokens, stop])

    def global_values(totals):
        """The global batch's mean loss and token count, and how many ranks asked to stop, from summed totals."""
        return totals[0] / totals[1], totals[1], totals[2]

    def one_update(grad, totals):
        """Gradients and totals in one all-reduce, as mlx-lm's step has one: its all_reduce_size groups them into
        one buffer when they share a dtype. average_gradients divides both sums by the ranks: their ratio stays."""
        summed = nn.average_gradients({"grad": grad, "totals": totals}, group=world.group)
        totals = summed["totals"]
        return tree_map(lambda g: g / totals[1].astype(g.dtype), summed["grad"]), totals * world.size

    def accumulated_share(grad, totals):
        """With accumulation, each micro-batch's mean loss counts alike (as in one process): this rank's share of
        it needs the micro-batch's global token count now, before the gradients are summed at the update."""
        totals = mx.distributed.all_sum(totals, group=world.group)
        return tree_map(lambda g: g * (world.size / totals[1]).astype(g.dtype), grad), totals

    # mlx-lm's compiled step, for every kind. LoReFT's retraction (R back onto orthonormal rows) is part of
    # the update: array ops in the same compiled graph, so a step never waits on the host or the CPU stream.
    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, previous, do_update, stop):
        (value, tokens), grad = loss_value_and_grad(model, *batch)
        if world.distributed:
            grad, totals = weighted(value, tokens, grad, stop)
            if accumulation == 1:
                grad, totals = one_update(grad, totals)
            else:
                grad, totals = accumulated_share(grad, totals)
            value, tokens, stop = global_values(totals)
        if previous is not None:
            grad = tree_map(lambda x, y: x + y, grad, previous)
        if do_update:
            if world.distributed and accumulation > 1:
                grad = nn.average_gradients(grad, group=world.group)
            if accumulation > 1:
                grad = tree_map(lambda x: x / accumulation, grad)
            optimizer.update(model, grad)
            if retract:
                retract(model)
            grad = None
        return value, tokens, stop, grad

    return state, step
