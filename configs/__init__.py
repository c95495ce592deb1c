"""Run configurations (ml_collections ConfigDicts), installed as `perco_jax.configs`.

Each module has `get_config()`. Use a file with absl's config_flags (`--config=configs/sd3_medium.py`)
or by name through `perco_jax.config.load_config("sd3_medium")`.
"""
