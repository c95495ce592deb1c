"""Input pipelines: tf.data / TFDS on the host CPU, sharded per process, numpy batches out.

Importing this package does not import TensorFlow; `make_dataset` does, for folder and TFDS data.
"""
from perco_jax.data.coco import coco_builder, coco_dataset
from perco_jax.data.folder import folder_examples, read_captions
from perco_jax.data.pipeline import SOURCES, default_data_config, make_dataset
from perco_jax.data.synthetic import Scene, Shape, render_scene, synthetic_example, synthetic_scene

__all__ = [
    "SOURCES", "Scene", "Shape", "coco_builder", "coco_dataset", "default_data_config", "folder_examples",
    "make_dataset", "read_captions", "render_scene", "synthetic_example", "synthetic_scene",
]
