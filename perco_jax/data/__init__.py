"""Input pipelines: tf.data / TFDS on the host CPU, sharded per process, numpy batches out."""
