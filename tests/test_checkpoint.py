"""perco-jax weights folders (perco_jax/checkpoint.py): components saved together, read alone."""
import jax.numpy as jnp
import numpy as np
import pytest

from perco_jax.checkpoint import CheckpointError, load_weights, save_weights


def test_a_subset_of_components_is_read_alone(tmp_path):
    big = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "sub": {"b": np.ones(5, np.float16)}}
    small = {"k": jnp.full((2, 2), 3.0), "i": np.arange(4, dtype=np.int32)}
    folder = save_weights(tmp_path / "weights", {"transformer": ({"layers": 2}, big), "vae": ({"ch": 4}, small)},
                          metadata={"note": "test"})
    configs, params = load_weights(folder, ["vae"])
    assert configs == {"vae": {"ch": 4}} and list(params) == ["vae"]
    for key, want in small.items():
        got = params["vae"][key]
        assert isinstance(got, np.ndarray) and got.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, np.asarray(want))
    _, every = load_weights(folder)
    np.testing.assert_array_equal(np.asarray(every["transformer"]["sub"]["b"]), big["sub"]["b"])
    _, only = load_weights(folder, ["transformer"])
    assert only["transformer"]["sub"]["b"].dtype == np.float16
    np.testing.assert_array_equal(only["transformer"]["w"], big["w"])
    with pytest.raises(CheckpointError, match=r"no component\(s\) \['t5'\]"):
        load_weights(folder, ["t5"])
