"""The `perco-jax` command: convert, generate, train, plan, export, compress, decompress, evaluate, demo, info."""
from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from perco_jax.convert.pipeline import convert_to_folder

    out = convert_to_folder(diffusers=args.diffusers, single_file=args.single_file, out=args.out,
                            tokenizers=args.tokenizers, extra_in_channels=args.extra_in_channels,
                            progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _generate(args) -> int:
    import numpy as np

    from perco_jax.images import save_image
    from perco_jax.sd3 import SD3Pipeline

    pipe = SD3Pipeline.load(args.checkpoint)
    latents = None
    if args.latents:
        latents = np.load(args.latents)
        if latents.ndim == 3:
            latents = latents[None]
    images = pipe.generate([args.prompt] * (1 if latents is None else latents.shape[0]),
                           negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, latents=latents, height=args.height, width=args.width,
                           max_sequence_length=args.max_sequence_length)
    if args.out.endswith(".npy"):
        np.save(args.out, images[0] if images.shape[0] == 1 else images)
    else:
        save_image(images[0], args.out)
    print(f"wrote {args.out}")
    return 0


def _demo(args) -> int:
    from perco_jax.demo import run_demo

    return run_demo(args.workdir)


def _info(args) -> int:
    from perco_jax import build
    from perco_jax.codec.report import format_bitrate_presets
    from perco_jax.config import load_config
    from perco_jax.convert.transformer import abstract_params
    from perco_jax.models.mmdit import mmdit_from_config
    from perco_jax.train.state import count_params

    config = load_config(args.config, args.override)
    build.validate(config)
    n = count_params(abstract_params(mmdit_from_config(config.mmdit)))
    print(config)
    print(f"MM-DiT parameters: {n:,} ({n * 4 / 2**30:.2f} GiB in float32)")
    print()
    print(format_bitrate_presets(config))
    return 0


def _train(args) -> int:
    from perco_jax import distributed

    # first: jax.distributed must start before anything touches jax devices
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from perco_jax.config import load_config
    from perco_jax.train.loop import train

    config = load_config(args.config, args.override)
    train(config, args.workdir)
    print(f"done: checkpoints and TensorBoard files in {args.workdir}")
    return 0


def _embed_text(args) -> int:
    from perco_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from perco_jax.config import load_config
    from perco_jax.text.store import embed_captions

    config = load_config(args.config, args.override)
    meta = embed_captions(config, args.out, examples=args.examples, batch_size=args.batch, dtype=args.dtype)
    print(f"wrote {meta.with_suffix('.array_record')} (train with --config.text.embeddings={args.out})")
    return 0


def _apply_recipe(args) -> None:
    """Fills the plan's config, overrides, stage, batch, mesh and topology from --recipe (the
    command line's own --stage / --batch / --mesh / --topology win; its -o come after the recipe's)."""
    if args.recipe:
        from perco_jax.train.plan import recipe

        r = recipe(args.recipe)
        args.config, args.override = r["config"], list(r["overrides"]) + list(args.override)
        args.stage = args.stage or r["stage"]
        args.batch = args.batch or r["batch"]
        args.mesh = args.mesh or r["mesh"]
        args.topology = args.topology or r["topology"]
    if not args.mesh:
        raise ValueError("give --mesh (e.g. data=8,fsdp=8,tensor=1) or --recipe")


def _plan(args) -> int:
    _apply_recipe(args)
    if args.compile and args.largest_batch:
        raise ValueError("--largest-batch plans without compiling: leave out --compile")
    if args.compile:
        return _plan_compile(args)
    if (args.topology and not args.recipe) or args.programs or args.num_slices != 1 or args.buffers_only:
        raise ValueError("--topology, --num-slices, --programs and --buffers-only go with --compile")
    from perco_jax.train import plan
    from perco_jax.config import load_config

    mesh = plan.parse_mesh(args.mesh, args.devices)
    memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    config = load_config(args.config, args.override)
    tpu = None
    if args.topology:  # a recipe's: the plan counts the TPU program's code
        from perco_jax.train import aot
        tpu = aot.parse_topology(args.topology).generation
    attention = _plan_attention(args)
    p = plan.make_plan(config, mesh, stage=args.stage, batch=args.batch, frozen=args.frozen, attention=attention,
                       tpu=tpu)
    if not args.largest_batch:
        print(plan.plan_json(p, memory) if args.json else plan.format_plan(p, memory))
        return 0
    if memory is None:
        raise ValueError("--largest-batch needs --device-memory")
    b = plan.largest_batch(config, mesh, memory, most=1 << 16, stage=args.stage, frozen=args.frozen,
                           attention=attention, tpu=tpu)
    devices = mesh["data"] * mesh["fsdp"]
    fit = None if b is None else plan.make_plan(config, mesh, stage=args.stage, batch=b * devices, frozen=args.frozen,
                                                attention=attention, tpu=tpu)
    if args.json:
        import json

        print(json.dumps({**p.to_dict(memory), "largest_batch_headroom": plan.HEADROOM,
                          "largest_per_device_batch": b, "largest_batch": None if b is None else b * devices,
                          "largest_batch_per_device_bytes": None if fit is None else fit.per_device}, indent=2))
        return 0
    print(plan.format_plan(p, memory))
    spare = f"{plan.HEADROOM:.0%} of {plan.human(memory)} to spare"
    print(f"largest batch leaving {spare}: " + (f"{b} a device, {b * devices} in all ({plan.human(fit.per_device)} "
                                                f"a device)" if b else "none: one example a device does not fit"))
    return 0


def _plan_attention(args) -> str:
    """The attention implementation the plan counts: --attention, else the splash kernel for a
    recipe (TPU), cuDNN's for --flash-attention, else XLA's."""
    if args.attention not in (None, "auto"):
        if args.flash_attention and args.attention == "xla":
            raise ValueError("--flash-attention and --attention xla contradict each other")
        return args.attention
    return "splash" if args.recipe else "cudnn" if args.flash_attention else "xla"


def _plan_compile(args) -> int:
    import json

    from perco_jax.train import aot

    aot.compile_environment()  # (before jax picks a backend: the host's stays the CPU)
    from perco_jax.config import load_config
    from perco_jax.train import plan

    if not args.topology:
        raise ValueError("--compile needs --topology, e.g. v5e-256, v5p-128 or v6e-256")
    topology = aot.parse_topology(args.topology, args.num_slices)
    mesh = plan.parse_mesh(args.mesh, topology.chips)
    memory = plan.parse_bytes(args.device_memory) if args.device_memory else topology.hbm_bytes
    config = load_config(args.config, args.override)
    programs = [p.strip() for p in (args.programs or "train,decode").split(",") if p.strip()]
    unknown = set(programs) - {"train", "decode"}
    if unknown:
        raise ValueError(f"--programs {args.programs!r}: choose from train, decode")
    if args.attention == "cudnn":
        raise ValueError("--attention cudnn is a GPU kernel: --compile compiles for TPU (auto, xla or splash)")
    attention = None if args.attention in (None, "auto") else args.attention
    p = plan.make_plan(config, mesh, stage=args.stage, batch=args.batch, frozen=args.frozen,
                       attention=attention or "splash", tpu=topology.generation)
    if not args.json:
        print(f"topology {topology.describe()}")
        print(plan.format_plan(p, memory))
    compiled = []
    if "train" in programs:
        compiled.append(aot.compile_program("train", config, topology, mesh, stage=args.stage, batch=args.batch,
                                            frozen=args.frozen, attention=attention, until_buffers=args.buffers_only))
        if not args.json:
            print(aot.format_program(compiled[-1], memory, p))
    if "decode" in programs:
        samplers = ["teacher"] + (["few_step"] if config.stage3.steps else [])
        for sampler in samplers:
            compiled.append(aot.compile_program("decode", config, topology, sampler=sampler, attention=attention,
                                                until_buffers=args.buffers_only))
            if not args.json:
                print(aot.format_program(compiled[-1], memory))
    if args.json:
        print(json.dumps({"topology": topology.to_dict(), "plan": p.to_dict(memory),
                          "programs": [c.to_dict(memory) for c in compiled]}, indent=2))
    return 0 if all(c.fits(memory) for c in compiled) else 1


def _export(args) -> int:
    from perco_jax.config import load_config
    from perco_jax.train.export import export_codec

    config = load_config(args.config, args.override)
    out = export_codec(config, args.stage1, args.stage2, args.stage3).save(args.out)
    print(f"wrote {out}")
    return 0


def _outputs(inputs: list[str], out: str, suffix: str) -> list:
    """Output paths: `out` itself for one input (unless it is a folder), else out/NAME.suffix."""
    from pathlib import Path

    o = Path(out)
    if len(inputs) == 1 and not o.is_dir() and not out.endswith(("/", "\\")):
        return [o]
    o.mkdir(parents=True, exist_ok=True)
    names = [Path(i).stem for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError("inputs share a file name; compress them into separate folders")
    return [o / f"{n}{suffix}" for n in names]


def _captions(args, codec) -> list[str]:
    """The caption z_g of each input: --caption, else the cache / captioner (issue: none -> error),
    then the text mode (captions.captioner.caption_prompts)."""
    from perco_jax.captions.captioner import caption_prompts
    from perco_jax.captions.text_modes import parse_text_mode

    given, n = args.caption, len(args.inputs)
    if given and len(given) not in (1, n) and parse_text_mode(args.text_mode)[0] != "none":
        raise ValueError(f"give one --caption for all inputs or one per input ({n})")
    prompts = caption_prompts(args.inputs, text_mode=args.text_mode, tokenizers=codec.prompt_encoder.tokenizers,
                              captions=given * n if given and len(given) == 1 else given or None,
                              captioner=args.captioner or None, cache=args.caption_cache,
                              max_new_tokens=args.caption_tokens, trust_remote_code=args.trust_remote_code)
    return [p for p, _ in prompts]


def _write_streams(outs: list, streams: list[bytes], codec) -> int:
    """Writes each stream to its output path and prints their rates (`format_stream_rates`)."""
    from perco_jax.codec.report import format_stream_rates

    for out, stream in zip(outs, streams):
        out.write_bytes(stream)
    print(format_stream_rates(outs, streams, codec.grid, codec.config.codec.codebook_size))
    return 0


def _compress(args) -> int:
    from perco_jax.codec.codec import Codec
    from perco_jax.images import load_image

    outs = _outputs(args.inputs, args.out, ".perco")
    codec = Codec.load(args.checkpoint)
    captions = _captions(args, codec)
    images = [load_image(p) for p in args.inputs]
    streams = codec.compress_batch(images, captions, schedule=args.schedule, groups=args.groups,
                                   max_bytes=args.max_bytes, target_bpp=args.target_bpp,
                                   shorten_captions=args.shorten_captions)
    return _write_streams(outs, streams, codec)


def _truncate(args) -> int:
    from pathlib import Path

    from perco_jax.codec.codec import Codec

    outs = _outputs(args.inputs, args.out, ".perco")
    if any(Path(o).resolve() == Path(i).resolve() for o, i in zip(outs, args.inputs)):
        raise ValueError("truncate writes new files: give an output other than the input")
    codec = Codec.load(args.checkpoint)
    streams = codec.truncate_batch([Path(p).read_bytes() for p in args.inputs], groups=args.groups,
                                   max_bytes=args.max_bytes, target_bpp=args.target_bpp)
    return _write_streams(outs, streams, codec)


def _decompress(args) -> int:
    from pathlib import Path

    from perco_jax.codec.codec import Codec
    from perco_jax.images import save_image

    outs = _outputs(args.inputs, args.out, ".png")
    codec = Codec.load(args.checkpoint)
    streams = [Path(p).read_bytes() for p in args.inputs]
    images = codec.decompress_batch(streams, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                    sampler=args.sampler.replace("-", "_"), stochastic=args.stochastic,
                                    temperature=args.temperature, fill_temperature=args.fill_temperature)
    for out, image in zip(outs, images):
        save_image(image, out)
        print(f"wrote {out} ({image.shape[1]}x{image.shape[0]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from perco_jax.build import FROZEN_PLACEMENTS
    from perco_jax.models.attention import IMPLEMENTATIONS

    p = argparse.ArgumentParser(prog="perco-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a PyTorch SD3 checkpoint into a perco-jax weights folder")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--diffusers", help="a diffusers SD3 pipeline folder, or its transformer/ subfolder")
    src.add_argument("--single-file", help="an original SD3 / SD3.5 single-file .safetensors checkpoint")
    c.add_argument("--out", required=True, help="output weights folder")
    c.add_argument("--tokenizers", help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ (for single files; "
                                        "default: the pipeline folder's own)")
    c.add_argument("--extra-in-channels", type=int, default=0,
                   help="zero-initialised extra MM-DiT input channels (the codec's z_l)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_convert)

    g = sub.add_parser("generate", help="SD3 text-to-image from a converted weights folder")
    g.add_argument("--checkpoint", required=True, help="weights folder written by `perco-jax convert`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=28)
    g.add_argument("--guidance", type=float, default=7.0)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--seed", type=int, default=0)
    src.add_argument("--latents", help=".npy of initial latents, NCHW, as diffusers' `latents=`")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens")
    g.add_argument("--out", required=True, help="FILE.png, or FILE.npy for the float32 HWC image in [0, 1]")
    g.set_defaults(fn=_generate)

    d = sub.add_parser("demo", help="the built-in end-to-end job on the tiny config (no downloads)")
    d.add_argument("--workdir", default="runs/demo")
    d.set_defaults(fn=_demo)

    t = sub.add_parser("train", help="stage 1 (codec) or, with --config.stage=2 --config.stage1_workdir=DIR, "
                                     "stage 2 (entropy model), with --config.stage=3 stage 3 (few-step decoder); "
                                     "resumes from the workdir's latest checkpoint")
    _add_config_flags(t, "preset name or config file (configs/*.py)")
    t.add_argument("--workdir", required=True)
    _add_distributed_flags(t)
    t.set_defaults(fn=_train)

    et = sub.add_parser("embed-text", help="precompute the text embeddings of the training captions "
                                           "(each process writes its shard; train with --config.text.embeddings)")
    _add_config_flags(et, "preset name or config file (its data and text encoders)")
    et.add_argument("--out", required=True, help="output folder")
    et.add_argument("--examples", type=int, help="synthetic data: embed the captions of its first N examples "
                                                 "(default: num_train_steps x batch_size)")
    et.add_argument("--batch", type=int, default=64, help="captions per encoder call (per process)")
    et.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="stored precision (bfloat16 halves the disk; training reads float32)")
    _add_distributed_flags(et)
    et.set_defaults(fn=_embed_text)

    pl = sub.add_parser("plan", help="memory per device of a training run on a mesh, from shapes only "
                                     "(params, gradients, optimiser, EMA, frozen encoders, activations)")
    _add_config_flags(pl)
    pl.add_argument("--mesh", help="mesh shape, e.g. data=8,fsdp=8,tensor=1 (missing axes = 1; "
                                   "one axis may be -1 with --devices or --topology)")
    pl.add_argument("--recipe", help="a pod recipe of perco_jax.configs.recipes (its config, overrides, stage, "
                                     "batch, mesh and topology; docs/training.md lists them)")
    pl.add_argument("--devices", type=int, help="total device count (resolves a -1 mesh axis; checks the mesh)")
    pl.add_argument("--device-memory", help="memory of one device, e.g. 16GB (10^9 bytes) or 80GiB (2^30): "
                                            "says whether the run fits")
    pl.add_argument("--batch", type=int, help="global batch size (default: the config's, for the stage)")
    pl.add_argument("--stage", type=int, choices=(1, 2, 3), help="training stage (default: the config's)")
    pl.add_argument("--frozen", choices=FROZEN_PLACEMENTS, default=None,
                    help="frozen text encoders / VAE / stage-1 codec: sharded by the rules, or a full copy "
                         "on every device (default: the config's frozen_placement)")
    pl.add_argument("--flash-attention", action="store_true",
                    help="fused attention (cuDNN on GPUs): attention logits are not stored (--attention cudnn)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (exact bytes)")
    pl.add_argument("--largest-batch", action="store_true",
                    help="with --device-memory: also the largest batch a device that leaves 20%% of it to spare "
                         "(a multiple of the VAE's autoencoder_chunk, or at most one chunk)")
    pl.add_argument("--compile", action="store_true",
                    help="also compile the run's programs for --topology with XLA's TPU compiler, without a TPU "
                         "(pip install -e '.[tpu]'): the compiler's memory per chip beside the plan, the "
                         "collectives and the verdict; exit 1 when a program does not fit")
    pl.add_argument("--topology", help="with --compile: a Cloud TPU slice, e.g. v5e-256, v6e-256 (N = chips), "
                                       "v5p-128, v4-64 (N = TensorCores, 2 per chip), or a grid such as v5e:16x16")
    pl.add_argument("--num-slices", type=int, default=1, help="with --compile: slices of --topology (multi-slice)")
    pl.add_argument("--programs", help="with --compile: train, decode or train,decode (default both: the "
                                       "training step, and the guided and few-step decoders of decompress_batch)")
    pl.add_argument("--attention", choices=("auto",) + IMPLEMENTATIONS,
                    help="the step's attention: xla stores the logits, cudnn (GPUs) and splash (TPU) are fused "
                         "kernels (auto: splash with --recipe or --compile, cudnn with --flash-attention, "
                         "else xla)")
    pl.add_argument("--buffers-only", action="store_true",
                    help="with --compile: stop each compile after XLA's buffer assignment (2-6 minutes for an "
                         "SD3-size step, not 10-40): arguments + temporaries a chip and the collectives, no code "
                         "size or FLOPs; reads about 0.7-0.8 GiB under a finished compile on large programs")
    pl.set_defaults(fn=_plan)

    e = sub.add_parser("export", help="a trained codec folder from a stage-1 and a stage-2 run")
    _add_config_flags(e, "the runs' preset name or config file")
    e.add_argument("--stage1", required=True, help="stage-1 workdir")
    e.add_argument("--stage2", required=True, help="stage-2 workdir (trained on --stage1)")
    e.add_argument("--stage3", help="stage-3 workdir (few-step decoder trained on --stage1), optional")
    e.add_argument("--out", required=True, help="codec folder to write (what --checkpoint takes)")
    e.set_defaults(fn=_export)

    c = sub.add_parser("compress", help="images -> .perco bitstreams")
    c.add_argument("--checkpoint", required=True, help="codec folder (perco-jax export / demo/checkpoint)")
    c.add_argument("inputs", nargs="+", help="image files (any size: resized to the model's, size kept)")
    c.add_argument("-o", "--out", required=True, help="OUT.perco for one image, or a folder")
    c.add_argument("--caption", action="append", help="the caption z_g (once for all, or once per image)")
    c.add_argument("--captioner", help="a local captioner checkpoint folder (BLIP-2, or Molmo-style with "
                                       "--trust-remote-code) for images without --caption")
    c.add_argument("--caption-cache", help="JSONL caption cache (read, and extended by the captioner)")
    c.add_argument("--caption-tokens", type=int, default=32, help="the captioner's token budget (PerCo: 32)")
    c.add_argument("--trust-remote-code", action="store_true", help="allow a captioner that ships its own code")
    c.add_argument("--text-mode", default="full",
                   help="full (the caption), none (empty prompt, no caption needed) or truncate:N (first N tokens)")
    c.add_argument("--schedule", help="masking schedule spec (qlds:8, checkerboard, implicit_var, uniform, ...; "
                                      "default: the codec's)")
    _add_prefix_flags(c)
    c.add_argument("--shorten-captions", action="store_true",
                   help="with --max-bytes / --target-bpp: where the caption alone does not fit, send its longest "
                        "prefix of whole T5 tokens that does (default: an error)")
    c.set_defaults(fn=_compress)

    tr = sub.add_parser("truncate", help="cut .perco streams to fewer index groups (no image needed; the decoder "
                                         "predicts the groups cut)")
    tr.add_argument("--checkpoint", required=True, help="the codec folder that compressed them")
    tr.add_argument("inputs", nargs="+", help=".perco files")
    tr.add_argument("-o", "--out", required=True, help="OUT.perco for one stream, or a folder")
    _add_prefix_flags(tr)
    tr.set_defaults(fn=_truncate)

    dc = sub.add_parser("decompress", help=".perco bitstreams -> images")
    dc.add_argument("--checkpoint", required=True, help="the codec folder that compressed them")
    dc.add_argument("inputs", nargs="+", help=".perco files")
    dc.add_argument("-o", "--out", required=True, help="OUT.png for one stream, or a folder")
    dc.add_argument("--steps", type=int, help="sampler steps (default: the codec config's); a step count the "
                                              "codec's few-step decoder serves (e.g. 1, 2, 4) uses it")
    dc.add_argument("--sampler", choices=("auto", "teacher", "few-step"), default="auto",
                    help="auto: the few-step decoder for the step counts it serves, else the guided sampler")
    dc.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the config's)")
    dc.add_argument("--seed", type=int, default=0, help="the sampler's noise seed")
    dc.add_argument("--stochastic", action=argparse.BooleanOptionalAction, default=None,
                    help="the guided sampler's steps re-noise with fresh noise (--no-stochastic: the Euler ODE; "
                         "default: the config's sample.stochastic)")
    dc.add_argument("--temperature", type=float, help="the samplers' noise scale (guided and few-step; 1: as "
                                                      "trained; lower: closer to the most likely image; default: "
                                                      "the config's)")
    dc.add_argument("--fill-temperature", type=float, default=0.0,
                    help="a prefix stream's index groups not sent are the entropy model's predictions: the most "
                         "likely (0, the default) or drawn at this temperature")
    dc.set_defaults(fn=_decompress)

    from perco_jax.eval.command import add_parser as add_evaluate
    add_evaluate(sub)

    i = sub.add_parser("info", help="print a config and its model sizes")
    _add_config_flags(i)
    i.set_defaults(fn=_info)
    return p


def _add_prefix_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", type=int, metavar="K", help="send only the first K index groups of the masking "
                                                          "schedule (0: the caption alone; default: all)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-bytes", type=int, metavar="N", help="per image, the most index groups whose stream "
                                                                  "takes at most N bytes")
    budget.add_argument("--target-bpp", type=float, metavar="X", help="per image, the most index groups whose "
                                                                     "stream takes at most X bits per pixel")


def _add_config_flags(p: argparse.ArgumentParser, help: str = "preset name or config file") -> None:
    p.add_argument("--config", default="tiny", help=help)
    p.add_argument("--override", "-o", action="append", default=[], help="key=value config override")


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="multi-process runs: process 0's HOST:PORT (default: detected from "
                                         "SLURM / Open MPI / TPU pod / JAX_COORDINATOR_ADDRESS, else one process)")
    p.add_argument("--num-processes", type=int, help="multi-process runs: the number of processes")
    p.add_argument("--process-id", type=int, help="multi-process runs: this process's id, 0..N-1")


def _config_dot_overrides(argv: list[str]) -> list[str]:
    """Accept Flax-style `--config.x.y=v` as `-o x.y=v`."""
    out = []
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            out += ["-o", a[len("--config."):]]
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _config_dot_overrides(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    from perco_jax.checkpoint import CheckpointError
    from perco_jax.convert.common import ConversionError

    try:
        return args.fn(args)
    except (ConversionError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"perco-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
