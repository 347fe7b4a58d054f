"""`lmforge <command>`: the whole pipeline (`run`) and each stage on its own.

Options are generated from the config dataclasses, so `--help` always lists every key with the
comment written next to it in `lmforge/config/`. Any recipe value can be overridden: `lmforge run`
takes `--section.key VALUE`; a stage command takes `--key VALUE` for its own section and
`--section.key VALUE` for the others. Unknown keys are errors naming the closest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from lmforge import audit, commands, pipeline, plan
from lmforge.config import (
    OLD_SECTIONS,
    PRETRAIN_ONLY,
    SECTIONS,
    ConfigError,
    field_help,
    load_recipe,
    unknown_key_error,
)
from lmforge.stages import BY_COMMAND, BY_NAME, RUN_ORDER, output_dir

DEFAULT_RECIPE = "recipes/tiny-cpu.yaml"


def _section_keys(section: str) -> list[str]:
    """The keys a section takes on the command line; a sub-section's as `lora.r`."""
    cls = SECTIONS.get(section) or OLD_SECTIONS[section]
    return [f"{f.name}.{k}" if k else f.name for f in _fields(cls) for k in _sub(cls, f)]


def _key_type(section: str, name: str):
    """The type of `section.name`; a sub-section's key is `lora.r`."""
    tp = SECTIONS.get(section) or OLD_SECTIONS[section]
    for part in name.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "sources"]


def _sub(cls, f: dataclasses.Field) -> list[str]:
    """The keys of field `f` if it is a sub-section (sft.lora), else [""]."""
    tp = typing.get_type_hints(cls)[f.name]
    return [g.name for g in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else [""]


def _add_section_options(p: argparse.ArgumentParser, section: str, prefix: str = "") -> None:
    _add_options(p, SECTIONS[section], section, prefix, own=not prefix)


def _add_options(p, cls, dest: str, prefix: str, own: bool = False) -> None:
    """One option per field of `cls`: --{prefix}NAME, stored as `{dest}.NAME`; a sub-section
    (sft.lora) gets its own group, --{prefix}lora.KEY."""
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(
        f"{dest} options" + (" (the recipe's `" + dest + ":` section)" if own else "")
    )
    for f in _fields(cls):
        if dest != "pretrain" and f.name in PRETRAIN_ONLY:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _add_options(p, tp, f"{dest}.{f.name}", f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        metavar = {int: "N", float: "X", bool: "BOOL", str: "STR"}.get(tp, "LIST")
        names = [f"--{prefix}{f.name}"]
        if f.name in PRETRAIN_ONLY and "_" in f.name:  # as the docs spell them: --init-from
            names.append(f"--{prefix}{f.name.replace('_', '-')}")
        group.add_argument(
            *names,
            dest=f"{dest}.{f.name}",
            metavar=metavar,
            # a switch alone means true: `--overwrite` as well as `--overwrite true`
            **({"nargs": "?", "const": "true"} if tp is bool else {}),
            default=argparse.SUPPRESS,
            # argparse expands % in help: a literal one ("5% of words") must be doubled
            help=f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%"),
        )


def _split_overrides(rest: list[str], own_section: str | None) -> dict[str, str]:
    """`--a.b V` / `--a.b=V` / `--key V` (own section) pairs -> {"section.key": "V"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if "." not in key:
            if own_section is None:
                raise ConfigError(f"option --{key} must name its section, like --pretrain.{key}")
            key = f"{own_section}.{key}"
        section, _, name = key.partition(".")
        if section not in SECTIONS and section not in OLD_SECTIONS:  # lora: the old spelling
            raise unknown_key_error(section, list(SECTIONS), "the recipe's sections")
        valid = _section_keys(section)
        if name not in valid:
            raise unknown_key_error(name, valid, f"section {section!r}")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value = rest[i + 1]
                i += 1
            elif _key_type(section, name) is bool:
                value = "true"  # a switch alone: --pretrain.overwrite
            else:
                raise ConfigError(f"option --{key} needs a value")
        i += 1
        out[key] = value
    return out


def _add_input_options(p: argparse.ArgumentParser, st) -> None:
    """--model-dir, --data-dir, --tokenizer-dir: where a stage command reads its inputs, by
    default what the stage it follows wrote in the run directory."""
    if st.model_from:
        src = BY_NAME[st.model_from]
        default = f"OUT/{src.name}/model" + (
            f", or OUT/{src.name}/adapter after a LoRA {src.name.upper()}" if src.adapts else ""
        )
        what = {"sft": "model to fine-tune", "distill": "model to distill (the teacher)"}.get(
            st.name, f"model to {st.name}" if st.family == "compress" else "model to start from"
        )
        adapter = ", or a LoRA adapter" if st.family == "align" else ""
        p.add_argument(
            "--model-dir",
            help=f"{what}: ours or any supported HF directory{adapter} (default: {default})",
        )
    if st.data:
        use = " for calibration, training and validation perplexity" if st.family else ""
        p.add_argument("--data-dir", help=f"prepared shards{use} (default: OUT/data)")
    if st.name == "data":  # lmforge prepare
        p.add_argument(
            "--tokenizer-dir",
            help="tokenizer directory: ours, or a model's (a Hugging Face tokenizer.json "
            "directory, e.g. the model --init-from continues) (default: OUT/tokenizer)",
        )
    if st.name == "pretrain":
        p.add_argument(
            "--tokenizer-dir",
            help="tokenizer directory (default: OUT/tokenizer; with --init-from, the model's)",
        )


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="lmforge",
        description="Build a language model end to end: tokenizer, data shards, pretraining, "
        "instruction tuning (full or LoRA), reward model and preference alignment (DPO, PPO, "
        "GRPO), compression (quantization, GPTQ, distillation, pruning, GGUF), evaluation, chat "
        "and an OpenAI-compatible server.",
        epilog="Quick start: lmforge run recipes/tiny-cpu.yaml --out runs/tiny  (then: lmforge generate runs/tiny/pretrain/model)",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        allow_abbrev=False,
        help="run a whole recipe: tokenizer -> prepare -> pretrain -> sft -> reward -> dpo -> "
        "samples -> eval -> REPORT.md",
        description="Run every stage of a recipe in one run directory. Finished stages with the same config "
        "are skipped and an interrupted stage resumes, so rerunning the command continues the run. "
        "Override any recipe value with --section.key VALUE (e.g. --pretrain.max_steps 20).",
        epilog="recipe keys: " + "; ".join(f"{s}: {', '.join(_section_keys(s))}" for s in SECTIONS),
    )
    p.add_argument(
        "recipe", nargs="?", default=DEFAULT_RECIPE, help=f"YAML recipe (default: {DEFAULT_RECIPE})"
    )
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument(
        "--force",
        default="",
        metavar="STAGES",
        help="comma-separated stages to redo even if up to date (" + ",".join(RUN_ORDER) + ")",
    )

    for st in BY_COMMAND.values():
        p = sub.add_parser(
            st.command,
            allow_abbrev=False,
            help=st.help,
            description=st.help[0].upper() + st.help[1:] + ". Values come from "
            "the recipe, then from --key VALUE for this stage's section, or --section.key VALUE for any other.",
        )
        p.add_argument(
            "--config",
            default=DEFAULT_RECIPE,
            metavar="RECIPE",
            help=f"YAML recipe (default: {DEFAULT_RECIPE})",
        )
        p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
        _add_input_options(p, st)
        _add_section_options(p, st.section)
        if st.name == "pretrain":
            _add_section_options(p, "model", prefix="model.")
        if st.dist:
            _add_section_options(p, "dist", prefix="dist.")

    commands.add_parsers(sub)
    audit.add_parser(sub)
    plan.add_parser(sub)

    p = sub.add_parser("report", help="(re)write REPORT.md for a run directory")
    p.add_argument("run_dir", help="run directory")

    return top


def _out_dir(args, recipe_path: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / Path(recipe_path).stem


def _cmd_run(args, rest) -> int:
    recipe = load_recipe(args.recipe, _split_overrides(rest, None))
    out = _out_dir(args, args.recipe)
    force = tuple(s for s in args.force.split(",") if s)
    bad = [s for s in force if s not in RUN_ORDER]
    if bad:
        raise ConfigError(f"--force: unknown stage(s) {bad}; stages are {', '.join(RUN_ORDER)}")
    try:
        res = pipeline.run(recipe, out, force=force)
    except pipeline.Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    print(f"done in {res['wall_seconds'] / 60:.1f} min: {out / 'REPORT.md'}")
    return 0


def _cmd_clean(recipe, out: Path) -> int:
    from lmforge.data import clean

    if not recipe.clean.steps:
        raise ConfigError(
            "clean.steps is empty: name the steps, e.g. --steps normalize,language,quality,pii,"
            "exact_dedup,near_dedup (or set clean.steps in the recipe)"
        )
    h = pipeline.stage_hashes(recipe)["clean"]
    s = pipeline.run_stage(
        "clean",
        out,
        h,
        lambda d: clean.summary(clean.run(recipe.clean, recipe.data, recipe.base_dir, d)),
    )
    print(
        f"clean: {s['docs_out']:,} of {s['docs_in']:,} documents kept "
        f"({s['bytes_out'] / 1e6:,.1f} of {s['bytes_in'] / 1e6:,.1f} MB); removed per step: "
        + ", ".join(f"{k} {v:,}" for k, v in s["removed"].items())
        + (f"; {s['n_problems']:,} unreadable lines skipped" if s["n_problems"] else "")
        + f"; report: {out / 'clean' / 'report.md'}"
    )
    return 0


def _stage_recipe(args, rest):
    """(stage, recipe, run directory) of a stage command: the recipe file, then its options."""
    st = BY_COMMAND[args.command]
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    overrides.update(_split_overrides(rest, st.section))
    return st, load_recipe(args.config, overrides), _out_dir(args, args.config)


def _cmd_stage(args, rest) -> int:
    st, recipe, out = _stage_recipe(args, rest)
    if args.command == "clean":
        return _cmd_clean(recipe, out)
    if args.command == "tokenizer":
        from lmforge.tokenizer_train import run

        data = pipeline.data_config(recipe, out)
        stats = run(recipe.tokenizer, data, recipe.base_dir, out / "tokenizer")
        print(f"tokenizer written to {out / 'tokenizer'}: {stats}")
    elif args.command == "prepare":
        from lmforge.data.prepare import run

        data = pipeline.data_config(recipe, out)
        manifest = run(data, args.tokenizer_dir or out / "tokenizer", recipe.base_dir, out / "data")
        from lmforge.data.prepare import realised_mixture

        total = sum(s["tokens"] for s in manifest["train_shards"])
        print(f"shards written to {out / 'data'} ({total:,} training tokens)")
        for r in realised_mixture(manifest):
            print(
                f"  {r['name']:<20} {r['tokens']:>12,} tokens  {r['share']:6.1%} of training  "
                f"{r['epochs']:.2f} epochs of {r['unique']:,} unique"
            )
    elif st.family == "align":
        return _cmd_align(st, recipe, out, args.model_dir)
    elif st.family == "compress":
        return _cmd_compress(st, recipe, out, args.model_dir, args.data_dir)
    elif args.command == "sft":
        from lmforge.align.sft import run

        s = run(
            recipe.sft,
            recipe.sft.lora,
            args.model_dir or output_dir(out, st.model_from),
            out / "sft",
            recipe.base_dir,
            recipe.dist,
        )
        if s.get("rank"):  # another rank of a torchrun job: rank 0 reports
            return 130 if s["interrupted"] else 0
        if s["interrupted"]:
            print(
                f"interrupted at step {s['step']}; checkpoint saved under {out / 'sft' / 'checkpoints'}. "
                "Run the same command to resume.",
                file=sys.stderr,
            )
            return 130
        where = output_dir(out, "sft", recipe.sft.lora.r)
        print(
            f"{where.name} written to {where} "
            f"(held-out reply loss {s['val_loss']:.3f}, {s['trainable_params']:,} trainable "
            f"parameters of {s['params']:,})"
        )
    else:
        from lmforge.train.pretrain import run

        # continued pretraining (init_from) takes the model's own tokenizer unless one is named
        default_tok = None if recipe.pretrain.init_from else out / "tokenizer"
        s = run(
            recipe.pretrain,
            recipe.model,
            args.data_dir or out / "data",
            args.tokenizer_dir or default_tok,
            out / "pretrain",
            recipe.dist,
        )
        if s.get("rank"):  # another rank of a torchrun job: rank 0 reports
            return 130 if s["interrupted"] else 0
        if s["interrupted"]:
            print(
                f"interrupted at step {s['step']}; checkpoint saved under {out / 'pretrain' / 'checkpoints'}. "
                "Run the same command to resume.",
                file=sys.stderr,
            )
            return 130
        print(f"model written to {out / 'pretrain' / 'model'}")
    return 0


def _cmd_compress(st, recipe, out: Path, model_dir: str | None, data_dir: str | None) -> int:
    """quantize, distill, prune: each driver returns a summary with `interrupted`, `step` and
    a one-line `headline`."""
    import importlib

    name = st.name
    driver = importlib.import_module(f"lmforge.compress.{name}")
    dist_kw = {"dist_cfg": recipe.dist} if st.dist else {}
    s = driver.run(
        getattr(recipe, st.section),
        model_dir=model_dir or output_dir(out, st.model_from),
        data_dir=data_dir or out / "data",
        out_dir=out / name,
        **dist_kw,
    )
    if s.get("rank"):  # another rank of a torchrun job: rank 0 reports
        return 130 if s["interrupted"] else 0
    if s.get("interrupted"):
        print(
            f"interrupted at step {s['step']}; checkpoint saved under {out / name}. "
            "Run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    print(f"{name}: {s['headline']}")
    return 0


def _cmd_align(st, recipe, out: Path, model_dir: str | None) -> int:
    """reward, dpo, ppo, grpo: each driver returns a summary with `interrupted` and a
    one-line `headline` of its result."""
    import importlib

    name = st.name
    driver = importlib.import_module(f"lmforge.align.{name}")
    cfg = getattr(recipe, st.section)
    model_dir = model_dir or output_dir(out, st.model_from)  # OUT/sft/adapter after LoRA SFT
    if name == "ppo" and cfg.reward == "model" and not cfg.reward_model:
        cfg.reward_model = str(output_dir(out, "reward", lora_r=0))
    extra = (cfg.lora,) if st.adapts else ()
    dist_kw = {"dist_cfg": recipe.dist} if st.dist else {}
    s = driver.run(
        cfg, *extra, model_dir=model_dir, out_dir=out / name, base_dir=recipe.base_dir, **dist_kw
    )
    if s.get("rank"):  # another rank of a torchrun job: rank 0 reports
        return 130 if s["interrupted"] else 0
    if s["interrupted"]:
        print(
            f"interrupted at step {s['step']}; checkpoint saved under {out / name / 'checkpoints'}. "
            "Run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    print(f"{name}: {s['headline']}")
    return 0


def _pull_overrides(argv: list[str], keep: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Separate `--key VALUE` overrides from the options argparse knows, before it sees them:
    otherwise an override's value could be taken for a positional argument."""
    known, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and name not in keep:
            rest.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                rest.append(argv[i + 1])
                i += 1
        else:
            known.append(arg)
        i += 1
    return known, rest


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        known, rest = _pull_overrides(argv[1:], ("--out", "--force", "--help"))
        args = parser.parse_args(["run", *known])
    else:
        args, rest = parser.parse_known_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "run":
            return _cmd_run(args, rest)
        if rest:
            cmds = (
                "generate",
                "report",
                "chat",
                "export",
                "import",
                "eval",
                "fetch",
                "embed",
                "rag",
                "agent",
                "moderate",
                "injection",
                "plan",
            )
            if args.command in cmds:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command in BY_COMMAND:
            return _cmd_stage(args, rest)
        if args.command == "generate":
            return commands.cmd_generate(args)
        if args.command == "chat":
            return commands.cmd_chat(args)
        if args.command == "export":
            return commands.cmd_export(args)
        if args.command == "import":
            return commands.cmd_import(args)
        if args.command == "eval":
            return commands.cmd_eval(args)
        if args.command == "serve":
            return commands.cmd_serve(args, rest)
        if args.command == "fetch":
            return commands.cmd_fetch(args)
        if args.command == "embed":
            return commands.cmd_embed(args)
        if args.command == "rag":
            return commands.cmd_rag(args)
        if args.command == "agent":
            return commands.cmd_agent(args)
        if args.command == "scan-sft":
            return audit.cmd_scan_sft(args)
        if args.command == "moderate":
            return commands.cmd_moderate(args)
        if args.command == "injection":
            return commands.cmd_injection(args)
        if args.command == "plan":
            return plan.cmd_plan(args)
        if args.command == "report":
            from lmforge.report import write_report

            print(write_report(args.run_dir))
            return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
