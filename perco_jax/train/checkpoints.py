"""Reading the training loop's orbax checkpoints back: onto any mesh, as abstract targets.

    restore_latest(workdir, abstract_state, shardings) -> TrainState or None
"""
from __future__ import annotations

from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp


def restore_target(state, shardings):
    """ShapeDtypeStructs with shardings for orbax to restore `state` into. optax's MaskedNode (the
    optimiser state of frozen parameters: no arrays) is kept as it is; the shardings tree has a
    leaf where the state has one."""
    return jax.tree_util.tree_map(
        lambda x, s: x if isinstance(x, optax.MaskedNode) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def restore_latest(workdir: str | Path, abstract_state, shardings):
    """The latest TrainState saved by `train` in workdir (None if there is none), restored onto
    `shardings` (the mesh may differ from the one it was saved on)."""
    path = Path(workdir).absolute() / "checkpoints"
    if not path.is_dir():
        return None
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        target = restore_target(abstract_state, shardings)
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    finally:
        mngr.close()
