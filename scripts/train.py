"""Cluster entry point: `python scripts/train.py --config=configs/sd3_medium.py --workdir=W [--config.x=y]`.

Thin absl wrapper (ml_collections config_flags) around `perco_jax.train.loop.train`, as in Flax's
examples. On multi-host jobs, jax.distributed is initialised from the environment first.
"""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and the saved config.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if _multi_host_environment():  # before any other jax call: it fixes the backend
        jax.distributed.initialize()
    from perco_jax.train.loop import train

    logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    train(FLAGS.config, FLAGS.workdir)


def _multi_host_environment() -> bool:
    import os

    return any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"))


if __name__ == "__main__":
    app.run(main)
