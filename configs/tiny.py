"""Tiny configuration: every code path, runnable in seconds on a laptop CPU (the embedded default).

Shapes are consistent across components as in SD3: the MM-DiT's joint_attention_dim is the T5
width (>= CLIP-L + CLIP-G widths), pooled_projection_dim = the two CLIP projections, in_channels =
the VAE's latent channels. The tiny tokenizers of `perco_jax.text.tiny_tokenizers` have 514 (CLIP) and 140 (T5) tokens.
"""
from perco_jax.configs import common


def get_config():
    config = common.base("tiny", common.mmdit(
        sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=48,
        num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=192,
        pooled_projection_dim=40, out_channels=4, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=()))
    config.vae = common.sd3_vae(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    config.clip_l = common.clip(vocab_size=514, hidden_size=16, intermediate_size=32, projection_dim=16,
                                num_hidden_layers=2, num_attention_heads=2, bos_token_id=512, pad_token_id=513)
    config.clip_g = common.clip(vocab_size=514, hidden_size=24, intermediate_size=48, projection_dim=24,
                                num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu", bos_token_id=512,
                                pad_token_id=0)
    config.t5 = common.t5(vocab_size=140, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=32)
    config.dtype = "float32"
    config.remat = False

    # The codec at toy scale: 32x32 images, a learned patch autoencoder (4x4 pixels -> 4 channels,
    # an 8x8 latent; stage 0 trains it, as SD3's VAE was trained before the MM-DiT), a 4x4 grid of 64
    # codes (0.094 bpp), built-in synthetic data. Flow matching in the parameter-free space-to-depth
    # "latent" (48 channels of raw pixels) is pixel-space flow matching: after 600-2,000 steps it drew
    # 4x4-pixel block noise instead of the shapes. With 2x2 patches of the 4-channel latent, each
    # MM-DiT token is one z_l cell (the MM-DiT's shape above).
    config.image_size = 32
    config.autoencoder = "patch"
    config.patch_autoencoder.update(factor=4, latent_channels=4, width=128, depth=2)
    # Its pixel loss weighted towards detail (flow.detail_weight, as stage 1's below): with the plain
    # loss the autoencoder alone kept colours present at 0.82 on 48 held-out scenes (a ceiling for
    # the codec); at 0.3 / 1 / 3: 0.98 / 0.99 / 0.99, PSNR 29.05 -> 28.4 / 26.3 / 24.4, realism
    # 0.959 -> 0.956 / 0.952 / 0.945 (docs/evaluation.md).
    # Its latent noise (stage0.latent_noise, 0.05 at full size) at 0.3 of the raw latents' scale (their
    # std is about 0.4-0.9): the decoder learns to map a latent somewhat off the encoder's to a clean
    # scene, and the flow sampler's latents are such. With stage 1 below, on 192 held-out scenes
    # (PSNR / colours present / realism at guidance 2): 0.05 / 0.15 / 0.3: 20.81 / 0.919 / 0.946,
    # 20.75 / 0.927 / 0.950, 20.51 / 0.950 / 0.950 (the autoencoder alone: 26.55 / 0.990 / 0.953,
    # 26.28 / 0.990 / 0.954, 25.89 / 0.988 / 0.954).
    config.stage0.update(num_train_steps=2000, batch_size=32, learning_rate=2e-3, warmup_steps=50, ema_decay=0.99,
                         loss_detail=1.0, latent_noise=0.3)
    # The tiny CLIP tokenizers are character-level: 77 CLIP tokens would make the joint sequence 6x
    # the 16 image tokens. The CLIP part is its start and end tokens only (with 8 it saw the first six
    # characters of a caption, "a larg"); the word-level T5 part (every caption word one piece) is
    # long enough for every synthetic caption (at most 19 pieces and the end token). 22 text tokens
    # instead of 8 + 24 make a step 14% fewer FLOPs: 3,000 steps cost what 2,600 did.
    config.text.update(clip_max_length=2, max_sequence_length=20)
    config.codec = common.codec("tiny_4x4_k64", code_dim=8)
    # The hyper-encoder at a quarter of the full-size width, two blocks per stage as there (at width
    # 32 / depth 1 and 3,500 stage-1 steps: 20.41 dB, +2.90 over the thumbnail; 3,000 steps: 20.59,
    # +3.08; at 2,600 steps, with stage 1's detail weighting (0.5) and stochastic steps below, to
    # keep the demo under 10 minutes: 20.60, +3.09, colours present 0.72; with the weighted
    # autoencoder above and 0.2: 19.83, +2.32, colours 0.86). Stage 1 has plateaued (on the plain
    # autoencoder): 5,000 steps, a 4-layer MM-DiT, an 8-channel latent or a higher-noise sigma mean
    # did not do better.
    config.hyper_encoder.update(width=64, depth=2, out_channels=16, num_groups=8)
    # (With the shorter text above, 3,000 steps on the autoencoder of latent noise 0.05: 20.81 dB, colours
    # 0.919, realism 0.946 at guidance 2; 2,600 steps with 8 + 24 text tokens: 20.96 / 0.882 / 0.948;
    # 3,500 of those: 21.32 / 0.897 / 0.948.)
    # Fewer steps, to bring the demo under 10 minutes, lost quality (192 held-out scenes; this config
    # at 3,000: 21.03-21.08 dB, colours 0.909-0.911, realism 0.951-0.952): stage 1 at 2,400 steps,
    # 20.92 / 0.888 / 0.950 (demo 532 s against 654-670); with stage 0 at 1,000 steps too, 20.72 /
    # 0.913 / 0.947 (its autoencoder alone 24.79 dB, realism 0.948, against 25.88 / 0.954).
    config.num_train_steps = 3000
    config.batch_size = 16
    config.learning_rate = 2e-3
    config.warmup_steps = 20
    config.ema_decay = 0.99
    config.log_every_steps = 25
    config.checkpoint_every_steps = 1000  # (a save costs about a second here: 35 of them were 7% of stage 1)
    config.data.update(source="synthetic", image_size=32)
    # 64^2 is below SD3's 256^2 base: no resolution shift in training, none in sampling
    config.sigma_sampling.resolution_shift = False
    config.scheduler_shift = 1.0
    # Small shapes cover a few latent positions of 64: with the plain loss the codec drew them faint.
    # On the plain autoencoder (stage 1 at 3,000 steps, 192 held-out scenes, docs/evaluation.md):
    # flow.detail_weight at 0 / 0.5 / 1 / 2 with stochastic steps: colours present 0.63 / 0.77 / 0.84
    # / 0.84, PSNR 21.34 / 21.15 / 20.48 / 19.56, realism 0.947 / 0.94 / 0.93 / 0.92. On the
    # detail-weighted autoencoder above (2,600 steps): 0 / 0.2 / 0.5: colours 0.76 / 0.88 / 0.91, PSNR
    # 20.82 / 20.37 / 19.75, realism 0.946 / 0.94 / 0.935 (the plain one at 0.5: 0.76 / 21.16 / 0.935).
    config.loss_detail = 0.2
    # Stochastic steps give back the PSNR the weighting costs: with the weightings above the Euler ODE
    # gave 19.42 / 0.87 / 0.928 (PSNR / colours / realism) against 20.37 / 0.88 / 0.94. Guidance 1.5 /
    # 2.5 with them: 20.56 / 0.87 / 0.942, 20.16 / 0.875 / 0.939.
    # A sampler temperature below 1 (its starting noise and fresh draws scaled) draws closer to the
    # model's most likely image, which here is a cleaner one: on the demo's codec, 192 held-out scenes,
    # temperature 1 / 0.8 / 0.6 / 0.4 / 0.2 / 0: PSNR 20.40 / 20.59 / 20.77 / 20.91 / 21.01 / 21.08,
    # colours 0.873 / 0.873 / 0.870 / 0.878 / 0.880 / 0.882, realism 0.942 / 0.945 / 0.947 / 0.948 /
    # 0.949 / 0.949. 0.3 keeps the decoder a sampler (0 draws no noise at all) for most of the gain;
    # the few-step decoder's starting noise too (its 1 step at 1 / 0.5 / 0.3 / 0: PSNR 19.44 / 20.49 /
    # 20.76 / 20.92, realism 0.913 / 0.926 / 0.927 / 0.929).
    # Guidance: on the codec of this config, 192 held-out scenes, guidance 2 / 1.5 / 1.25 / 1 (no
    # guidance): PSNR 20.51 / 20.80 / 20.93 / 21.06, colours 0.950 / 0.932 / 0.928 / 0.912, realism
    # 0.9499 / 0.9509 / 0.9513 / 0.9514: the detail weighting and the noisy-latent decoder give the
    # colours that guidance gave before, and less guidance draws cleaner edges.
    # The decoder runs 16 images at a time (coding_batch_size 4 did before): 32 held-out images at 20
    # steps took 1,361 ms in chunks of 4, 1,419 / 949 / 1,029 ms in chunks of 8 / 16 / 32; 1 step 126
    # -> 67 ms (benchmarks/decode.py).
    config.sample.update(steps=20, guidance=1.25, stochastic=True, temperature=0.3, batch_size=16)
    config.codec.coding_batch_size = 4
    config.entropy_model.update(width=128, depth=3, num_heads=4)
    config.stage2.update(num_train_steps=400, batch_size=32, learning_rate=1e-3, warmup_steps=20, ema_decay=0.99)
    # ---- stage 3 (few-step decoder): distillation of the codec's own decoder. `couplings` pictures
    # drawn once by the 20-step stochastic sampler at temperature 0.3 (coupling_sampler "decoder",
    # about 20 s), then each k of `steps` regressed onto them (reflow_fraction 0: no 2-rectified flow).
    # On the demo's codec (192 held-out scenes, 1 step against the teacher's realism 0.951) the
    # shortcut models (the cheap default elsewhere: no teacher sampling) reached 0.930, as the
    # teacher's own Euler ODE does (0.928): a student that follows the ODE cannot draw the stochastic
    # steps' cleaner shapes. Distilling those: realism 0.940-0.943 at 400 steps over guidance 1.25 /
    # 1.5 / 2, L1 / pseudo-Huber / detail-weighted / pixel losses, 1,536 couplings, learning rate 1e-3,
    # half the steps on 2-rectified flow first, fresh draws or all noise at temperature 0; 0.943 at 800
    # steps, 0.944 at 1,600 steps on 2,048 couplings (3x the time). Guidance 2 (the student's, against
    # the teacher's 1.25) kept the most colours: 0.915 against 0.884 at 1.25, the teacher 0.920.
    # The shortcut models at guidance 3 / 2 had given realism -0.021 / -0.017.
    config.stage3.update(method="reflow", coupling_sampler="decoder", reflow_fraction=0.0, couplings=512,
                         num_train_steps=800, batch_size=16, learning_rate=5e-4, warmup_steps=20, ema_decay=0.99,
                         steps=(1, 2, 4), levels=3, bootstrap_fraction=0.5, guidance=2.0)
    return config
