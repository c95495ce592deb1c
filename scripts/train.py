"""Cluster entry point: `python scripts/train.py --config=configs/sd3_medium.py --workdir=W [--config.x=y]`.

Thin absl wrapper (ml_collections config_flags) around `perco_jax.train.loop.train`, as in Flax's
examples. Multi-process jobs start jax.distributed first (`perco_jax.distributed.initialize`): from
--coordinator_address/--num_processes/--process_id, else from the cluster's environment (SLURM,
Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS); a plain run stays one process.
"""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and the saved config.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: process 0's HOST:PORT (default: detected "
                    "from SLURM / Open MPI / TPU pod / JAX_COORDINATOR_ADDRESS, else one process).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from perco_jax import distributed

    try:  # before any other jax call: it fixes the backend
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    from perco_jax.config import complete
    from perco_jax.train.loop import train

    logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    train(complete(FLAGS.config), FLAGS.workdir)  # (a config file may predate fields)


if __name__ == "__main__":
    app.run(main)
