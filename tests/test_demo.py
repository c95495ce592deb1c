"""`make demo` end to end on a small budget: every stage (0-3) trains, the codec is exported and
evaluated on held-out scenes, and the pictures and tables a user reads are written."""
import pytest

from perco_jax.demo import run_demo
from perco_jax.images import load_image

SMALL = ["stage0.num_train_steps=20", "num_train_steps=20", "stage2.num_train_steps=10", "log_every_steps=10",
         "checkpoint_every_steps=1000", "sample.steps=2", "stage3.num_train_steps=10",
         "stage3.couplings=32"]


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_what_a_user_reads(tmp_path, capsys):
    assert run_demo(str(tmp_path), SMALL, heldout=8) == 0
    out = capsys.readouterr().out
    for part in ("[1/6] SD3 port", "[2/6] stage 0", "[3/6] stage 1", "[4/6] stage 2", "[6/6] stage 3",
                 "[5/6] codec exported", "student (reflow)", "thumbnail", "autoencoder alone (the ceiling)",
                 "originals", "PSNR gain over the thumbnail", "qlds:8", "demo OK"):
        assert part in out, part
    picture = load_image(tmp_path / "reconstructions.png")
    assert picture.shape == (8 * 128, 3 * 128, 3)  # 8 scenes x (original | thumbnail | reconstruction), x4
    few = load_image(tmp_path / "few_step.png")
    assert few.shape == (8 * 128, 4 * 128, 3)  # original | teacher | few-step 1 step | plain 1 step
    assert (tmp_path / "checkpoint" / "perco.json").is_file()
    assert len(list((tmp_path / "eval" / "streams").glob("*.perco"))) == 8
    # a second run reuses every finished stage, and measures afresh, here with another sampler temperature
    assert run_demo(str(tmp_path), SMALL + ["sample.temperature=1.0"], heldout=8) == 0
    assert "T 1)" in capsys.readouterr().out
