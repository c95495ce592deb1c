"""Pod recipes: a preset, a stage, a TPU slice, a mesh, a global batch and the overrides that make the
run fit with at least 20% of each chip's HBM to spare, found with XLA's TPU compiler
(`perco-jax plan --recipe NAME --compile`; `benchmarks/compile.py` compiles them all). The compiler's
figures and how each recipe was chosen are in docs/training.md.

    perco-jax plan --recipe sd3_medium-stage1-v5e-256 --compile
    perco-jax train --config sd3_medium -o text.embeddings=emb ...   # the recipe's overrides, batch, mesh

Every recipe reads the text embeddings `perco-jax embed-text` precomputed (`text.embeddings`: the
frozen CLIP-L / CLIP-G / T5-XXL are not on the chips; give the folder embed-text wrote) and keeps
`remat` on. The MM-DiT's and the VAE's attention are the splash kernel (automatic on TPU).
"""

EMBEDDINGS = ["text.embeddings=embeddings"]
AT_1024 = ["image_size=1024", "data.image_size=1024"]
# the frozen VAE encodes a chip's batch this many images at a time (its full-resolution maps were
# the step's peak: `autoencoder_chunk` in configs/common.py)
VAE_512 = ["autoencoder_chunk=16"]
VAE_512_8 = ["autoencoder_chunk=8"]  # (v6e's 104 and v5e's 40 a chip)
VAE_1024 = ["autoencoder_chunk=1"]
# at 1024^2 on v5e and v5p the hyper-encoder's ResnetBlocks are rematerialised: XLA:TPU otherwise
# keeps float32, halo-tiled copies of their GroupNorm / SiLU outputs (v5e at 4 a chip: 11.70 -> 9.92
# GiB; v5p at 40: 67.89 -> 67.08). On v6e at 14 a chip it cost 1.1 GiB more (docs/training.md). Every
# batch a chip keeps 20% with the generated code of all the blocks (extrapolated from finished 2- and
# 6-block compiles: SD3-medium 1.3-1.8 GiB, SD3.5-large 2.3-3.8 GiB): SD3-medium on v5e kept 14-16% at
# 48 a chip, hence 40.
HE_REMAT = ["hyper_encoder.remat=True"]


def _mesh(chips: int, fsdp: int) -> str:
    return f"data={chips // fsdp},fsdp={fsdp},tensor=1"


RECIPES = {
    # SD3-medium (2B MM-DiT) at 512^2: FSDP over 16 chips, data parallel over the rest
    "sd3_medium-stage1-v5e-256": dict(config="sd3_medium", stage=1, topology="v5e-256", mesh=_mesh(256, 16),
                                      batch=256 * 40, overrides=EMBEDDINGS + VAE_512_8),
    "sd3_medium-stage3-v5e-256": dict(config="sd3_medium", stage=3, topology="v5e-256", mesh=_mesh(256, 16),
                                      batch=256 * 40, overrides=EMBEDDINGS + VAE_512_8),
    "sd3_medium-stage1-v5p-128": dict(config="sd3_medium", stage=1, topology="v5p-128", mesh=_mesh(64, 16),
                                      batch=64 * 352, overrides=EMBEDDINGS + VAE_512),
    "sd3_medium-stage3-v5p-128": dict(config="sd3_medium", stage=3, topology="v5p-128", mesh=_mesh(64, 16),
                                      batch=64 * 352, overrides=EMBEDDINGS + VAE_512),
    "sd3_medium-stage1-v6e-256": dict(config="sd3_medium", stage=1, topology="v6e-256", mesh=_mesh(256, 16),
                                      batch=256 * 104, overrides=EMBEDDINGS + VAE_512_8),
    "sd3_medium-stage3-v6e-256": dict(config="sd3_medium", stage=3, topology="v6e-256", mesh=_mesh(256, 16),
                                      batch=256 * 104, overrides=EMBEDDINGS + VAE_512_8),
    # SD3.5-large (8B MM-DiT) at 1024^2: FSDP over 64 chips. Checked at all 38 blocks in XLA's buffer
    # assignment (the code generation of 38 blocks outgrows this project's 24 GiB machine; docs/training.md)
    "sd35_large-stage1-v5e-256": dict(config="sd35_large", stage=1, topology="v5e-256", mesh=_mesh(256, 64),
                                      batch=256 * 4, overrides=EMBEDDINGS + AT_1024 + VAE_1024 + HE_REMAT),
    "sd35_large-stage1-v5p-128": dict(config="sd35_large", stage=1, topology="v5p-128", mesh=_mesh(64, 64),
                                      batch=64 * 40, overrides=EMBEDDINGS + AT_1024 + VAE_1024 + HE_REMAT),
    "sd35_large-stage1-v6e-256": dict(config="sd35_large", stage=1, topology="v6e-256", mesh=_mesh(256, 64),
                                      batch=256 * 12, overrides=EMBEDDINGS + AT_1024 + VAE_1024),
}
