"""`smolcluster train`: the GPT of gpt_config.yaml in one process (the original's train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

OVERRIDE_HELP = ("KEY=VALUE with a dotted key of the config, e.g. training.batch_size=16 training.epochs=5 "
                 "(several after one --override, or --override repeated). The value is read as the key's type.")


def default_config() -> Path:
    """configs/gpt_config.yaml in the current folder (a checkout), else the one the package ships."""
    local = Path("configs") / "gpt_config.yaml"
    if local.is_file():
        return local
    from smolcluster.resources import resource_path

    return resource_path("configs", "gpt_config.yaml")


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
    def train(
        ctx: typer.Context,
        config: Optional[Path] = typer.Option(None, "--config", help="GPT config (default: configs/gpt_config.yaml, "
                                              "else the one shipped with the package)."),
        override: Optional[List[str]] = typer.Option(None, "--override", help=OVERRIDE_HELP),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where config, logs, metrics, checkpoints and "
                                               "summary.json go (default runs/gpt-<timestamp>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint, "
                                    "with its own config.yaml (overrides still apply)."),
    ) -> None:
        """Train the GPT language model of gpt_config.yaml on WikiText-2 in one process."""
        from smolcluster.common.errors import ConfigError
        from smolcluster.core.training.config import load_gpt_config
        from smolcluster.core.training.train_gpt import CONFIG_NAME, default_run_dir, train_gpt

        overrides = list(override or [])
        for extra in ctx.args:  # the original's `--override a=1 b=2`: the values after the first
            if "=" not in extra or extra.startswith("-"):
                raise ConfigError("command line", extra, "is not an option of smolcluster train",
                                  "see smolcluster train --help; overrides are KEY=VALUE")
            overrides.append(extra)
        if resume:
            if run_dir is None:
                raise ConfigError("command line", "--resume", "needs the run to continue", "add --run-dir RUN_DIR")
            if config is not None:
                raise ConfigError("command line", "--config", "a resumed run keeps its own config (RUN_DIR/config.yaml)",
                                  "drop --config; change single values with --override")
            config = run_dir / CONFIG_NAME
        gpt = load_gpt_config(config or default_config(), overrides)
        summary = train_gpt(gpt, run_dir or default_run_dir(), resume=resume)
        typer.echo(f"{summary['steps']} steps, {summary['tokens_per_s']:,.0f} tokens/s; {summary['eval_split']} perplexity "
                   f"{summary['initial_val_perplexity']:.1f} -> best {summary['best_val_perplexity']:.1f} "
                   f"({summary['data']['note']}; tokenizer {summary['tokenizer']['name']})")
        if summary["stop_reason"] != "finished":
            raise typer.Exit(130)
