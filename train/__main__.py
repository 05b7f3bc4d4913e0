"""valign's training command line.

    python -m valign.train                                   the embedded default: the offline CPU demo
    python -m valign.train demo [--output DIR] [--resume] [--backbones tiny]   (without --resume: replaces one)
    python -m valign.train curve [--output DIR] [--steps 28 112 224 448 896] [--backbones tiny]
    python -m valign.train ablations [--output DIR] [--arms ARM ...] [--seeds 0 1 2] [--backbones tiny] \\
        [--last-stage-steps N]
    python -m valign.train recipe paper --output runs/paper \\
        [--init CHECKPOINT | --vision google/siglip-so400m-patch14-224 --text Qwen/Qwen2.5-0.5B-Instruct] \\
        [--data-root DIR] [--resume | --overwrite] [--push-to-hub USER/REPO [--space USER/SPACE]] [--max-steps N]
    python -m valign.train stage train/recipes/paper/stage1.yaml --init runs/paper/stage-0 --output runs/paper/stage-1

An --output that already holds a run is refused unless --resume continues it (only the very run that wrote it: same
stage config, data files and starting checkpoint) or --overwrite deletes it.

Several processes: prefix any of these with `torchrun --nproc_per_node N -m valign.train ...` (or
`accelerate launch -m valign.train ...`); the Trainer sets up DDP from the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..hub.card import write_model_card
from .ablations import ARMS, SEEDS
from .assembly import assemble_init
from .config import StageConfig
from .curve import CURVE_STEPS
from .demo import BACKBONES
from .distributed import is_main_process
from .fingerprint import refuse_to_replace
from .run import RECIPES, run_recipe, run_stage


def step_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value}: a number of optimizer steps, 1 or more")
    return int(value)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m valign.train", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command")

    demo = commands.add_parser("demo", help="the offline CPU demo (the default)")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"))
    demo.add_argument("--resume", action="store_true", help="keep finished stages, continue an interrupted one")
    demo.add_argument(
        "--backbones",
        choices=BACKBONES,
        default="packaged",
        help="packaged: DINOv2-small + SmolLM2-135M-Instruct from PyPI (default); tiny: random, a quick check",
    )

    ablations = commands.add_parser("ablations", help="the paper's ablations, miniature, on the demo")
    ablations.add_argument("--output", type=Path, default=Path("outputs/ablations"))
    ablations.add_argument("--arms", nargs="+", choices=list(ARMS), help="a subset of the arms (default: all)")
    ablations.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds per arm (default: 0 1 2)")
    ablations.add_argument("--backbones", choices=BACKBONES, default="packaged")
    ablations.add_argument(
        "--last-stage-steps", type=step_count, help="every arm's last-stage budget (default: the recipe's)"
    )

    curve = commands.add_parser("curve", help="the demo's VQA accuracy against training time")
    curve.add_argument("--output", type=Path, default=Path("outputs/curve"))
    curve.add_argument("--steps", nargs="+", type=step_count, default=list(CURVE_STEPS), help="last-stage budgets")
    curve.add_argument("--backbones", choices=BACKBONES, default="packaged")

    recipe = commands.add_parser("recipe", help="run every stage of a recipe folder")
    shipped = ", ".join(sorted(folder.name for folder in RECIPES.iterdir() if folder.is_dir()))
    recipe.add_argument("recipe", help=f"a folder of stage*.yaml files, or a shipped recipe's name: {shipped}")
    stage = commands.add_parser("stage", help="run one stage file")
    stage.add_argument("config", type=Path)
    for command in (recipe, stage):
        command.add_argument("--output", type=Path, required=True)
        command.add_argument("--init", type=Path, help="a valign checkpoint to start from")
        command.add_argument("--data-root", type=Path, help="folder that relative data sources are resolved in")
        choice = command.add_mutually_exclusive_group()
        choice.add_argument("--resume", action="store_true", help="continue the run in --output")
        choice.add_argument("--overwrite", action="store_true", help="delete the run in --output and start afresh")
        command.add_argument("--max-steps", type=int, help="override every stage's max_steps (smoke runs)")
    recipe.add_argument("--vision", default="google/siglip-so400m-patch14-224")
    recipe.add_argument("--text", default="Qwen/Qwen2.5-0.5B-Instruct")
    recipe.add_argument("--gguf-file", help="load the language model from this GGUF file inside --text")
    recipe.add_argument("--push-to-hub", metavar="REPO", help="push stage N to branch stage-N, the last to main")
    recipe.add_argument("--space", metavar="USER/SPACE", help="Space serving the app (named in cards)")
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import DemoSizes, run_demo

        sizes = DemoSizes(backbones=getattr(args, "backbones", "packaged"))
        run_demo(getattr(args, "output", Path("outputs/demo")), sizes, resume=getattr(args, "resume", False))
        return
    if args.command == "ablations":
        from .ablations import run_ablations

        run_ablations(args.output, args.arms, tuple(args.seeds), args.backbones, args.last_stage_steps)
        return
    if args.command == "curve":
        from .curve import run_curve
        from .demo import DemoSizes

        run_curve(args.output, tuple(args.steps), DemoSizes(backbones=args.backbones))
        return
    overrides = {"*": {"max_steps": args.max_steps}}
    if args.command == "stage":
        if args.init is None:
            raise SystemExit("stage needs --init CHECKPOINT (the previous stage's output folder)")
        config = StageConfig.from_yaml(args.config, **overrides["*"])
        run_stage(config, args.init, args.output, args.data_root, args.resume, overwrite=args.overwrite)
        if is_main_process():
            write_model_card(args.output)  # the stage, its configuration and data come from its stage record
        return
    run_recipe(
        args.recipe,
        args.init or recipe_init(args),
        args.output,
        args.data_root,
        args.resume,
        args.push_to_hub,
        base_models=[args.vision, args.text],
        overrides=overrides,
        overwrite=args.overwrite,
        space=args.space,
    )


def recipe_init(args: argparse.Namespace) -> Path:
    """The recipe's starting checkpoint, assembled from its backbones into OUTPUT/init. A resume keeps the one
    there (stage 0's fingerprint names its files); a fresh run refuses to replace it unless --overwrite."""
    folder = args.output / "init"
    if args.resume and (folder / "config.json").is_file():
        return folder
    if not args.overwrite:
        refuse_to_replace([folder])
    return assemble_init(args.vision, args.text, args.gguf_file, folder)


if __name__ == "__main__":
    main()
