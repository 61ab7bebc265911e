"""The ``tao`` command: parse argv and dispatch; all work happens in spec, schema and engine.

    tao model list
    tao model <net> --help
    tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [OVERRIDE ...]
    tao spec <net> <action>
    tao schema <net> --out DIR
    tao dataset synthetic --out DIR [--seed S]
    tao info

Overrides use Hydra's grammar and are passed on as the argv list they arrived as (never joined and re-split).
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from networks.common.errors import ConfigError, TaoUserError
from tao_cli import __version__, registry
from tao_cli.paths import packaged_spec

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="TAO-compatible launcher: `tao model <net> <action> -e spec.yaml key=value`.",
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(dataset_app, name="dataset")

_out = Console()

MODEL_USAGE = "usage: tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [key=value ...]"


def _fail(exc: BaseException, debug: bool) -> int:
    """Print one line for ``exc`` (a traceback only with --debug) and return the exit code."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, TaoUserError):
        _error_line(f"ERROR: {exc.one_line()}")
        return exc.exit_code
    message = " ".join(str(exc).split())
    _error_line(f"ERROR: {type(exc).__name__}: {message}" + ("" if debug else " (run with --debug for the full traceback)"))
    return 1


def _error_line(text: str) -> None:
    """Write one unwrapped line to stderr (rich would wrap it at the terminal width)."""
    sys.stderr.write(" ".join(text.split("\n")) + "\n")
    sys.stderr.flush()


def _version_callback(value: bool) -> None:
    if value:
        _out.print(f"tao-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """TAO-compatible launcher for MAL, Mask2Former and Mask Grounding DINO."""


def _print_networks() -> None:
    table = Table(title="networks", show_header=True)
    table.add_column("network")
    table.add_column("actions")
    for name in registry.names():
        try:
            net = registry.load(name)
            table.add_row(name, ", ".join(net.ACTIONS))
        except Exception as exc:  # a broken network must not hide the others
            table.add_row(name, f"[red]unavailable: {type(exc).__name__}: {exc}[/red]")
    _out.print(table)


def _print_network_help(name: str) -> None:
    net = registry.load(name)
    _out.print(f"{MODEL_USAGE.replace('<net>', name)}\n\n{net.TITLE} actions:", highlight=False)
    for action, description in net.ACTIONS.items():
        _out.print(f"  {action:<16} {description}", highlight=False)
    _out.print(
        "\noptions:\n"
        "  -e, --experiment_spec_file SPEC  spec YAML (default: the packaged configs/<net>/<action>.yaml)\n"
        "  --dry-run                        print the resolved spec and run plan, write nothing\n"
        "  --debug                          full tracebacks\n"
        f"\n`tao spec {name} <action>` prints the default spec with every field documented.",
        highlight=False,
    )


def parse_model_args(args: list[str]) -> dict:
    """Split ``tao model`` argv into net, action, spec path, flags and the override list (order kept)."""
    spec, dry_run, debug, help_ = None, False, False, False
    positional: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in ("-e", "--experiment_spec_file", "--experiment-spec-file", "--experiment_spec"):
            if i + 1 >= len(args):
                raise ConfigError(tok, "needs a spec file path", "tao model <net> <action> -e spec.yaml")
            spec = args[i + 1]
            i += 2
            continue
        if tok.startswith(("--experiment_spec_file=", "--experiment-spec-file=")):
            spec = tok.split("=", 1)[1]
        elif tok == "--dry-run":
            dry_run = True
        elif tok == "--debug":
            debug = True
        elif tok in ("-h", "--help"):
            help_ = True
        elif len(positional) < 2 and "=" not in tok and not tok.startswith(("~", "+", "-")):
            positional.append(tok)
        elif tok.startswith("-") and "=" not in tok:
            raise ConfigError(tok, "unknown option", "options are -e, --dry-run, --debug, --help")
        else:
            overrides.append(tok)
        i += 1
    return {"positional": positional, "spec": spec, "dry_run": dry_run, "debug": debug,
            "help": help_, "overrides": overrides}


@app.command(
    "model",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="Run an action: tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [key=value ...]; "
         "`tao model list`; `tao model <net> --help`.",
)
def model(ctx: typer.Context) -> None:
    args = list(ctx.args)
    debug = "--debug" in args
    try:
        parsed = parse_model_args(args)
        pos = parsed["positional"]
        if not pos or pos[0] in ("help",) or (parsed["help"] and not pos):
            _out.print(MODEL_USAGE, highlight=False)
            _print_networks()
            raise typer.Exit(0)
        if pos[0] == "list":
            _print_networks()
            raise typer.Exit(0)
        name = pos[0]
        if len(pos) < 2 or parsed["help"]:
            _print_network_help(name)
            raise typer.Exit(0 if parsed["help"] or len(pos) < 2 else 2)
        code = run_model(name, pos[1], parsed["spec"], parsed["overrides"],
                         dry_run=parsed["dry_run"], debug=parsed["debug"], argv=["tao", "model", *args])
    except typer.Exit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        if isinstance(exc, KeyboardInterrupt):
            _error_line("ERROR: interrupted")
            raise typer.Exit(130) from None
        raise typer.Exit(_fail(exc, debug)) from None
    raise typer.Exit(code)


def run_model(name: str, action: str, spec_path: str | None, overrides: list[str], *, dry_run: bool = False,
              debug: bool = False, argv: list[str] | None = None) -> int:
    """Load the network, its spec and run one action; returns the exit code (errors raise)."""
    net = registry.load(name)
    if action not in net.ACTIONS:
        import difflib

        close = difflib.get_close_matches(action, net.ACTIONS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"actions: {', '.join(net.ACTIONS)}"
        raise ConfigError(f"action '{action}'", f"is not an action of {name}", hint)
    from tao_cli import spec as spec_mod
    from tao_cli.engine.run import run_action

    path = Path(spec_path) if spec_path else packaged_spec(name, action)
    cfg = spec_mod.load_spec(net.ExperimentConfig, action, path, overrides, check=net.check)
    return run_action(net, action, cfg, argv=argv or sys.argv, dry_run=dry_run, debug=debug)


@app.command("spec")
def spec_cmd(
    network: str = typer.Argument(..., help="Network name, e.g. mal."),
    action: str = typer.Argument(..., help="Action, e.g. train."),
) -> None:
    """Print the default spec of an action as commented YAML (descriptions, bounds, options)."""
    from tao_cli import schema

    try:
        net = registry.load(network)
        if action not in net.ACTIONS:
            raise ConfigError(f"action '{action}'", f"is not an action of {network}",
                              f"actions: {', '.join(net.ACTIONS)}")
        sys.stdout.write(schema.commented_yaml(net.ExperimentConfig, action, list(net.ACTIONS)))
    except TaoUserError as exc:
        raise typer.Exit(_fail(exc, False)) from None


@app.command("schema")
def schema_cmd(
    network: str = typer.Argument(..., help="Network name."),
    out: Path = typer.Option(..., "--out", help="Directory that receives schemas/ and references/."),
) -> None:
    """Write JSON Schemas, the manifest and spec templates of every action of a network."""
    from tao_cli import schema

    try:
        net = registry.load(network)
        for path in schema.write_schemas(net, out, __version__):
            _out.print(str(path), highlight=False)
    except TaoUserError as exc:
        raise typer.Exit(_fail(exc, False)) from None


@dataset_app.command("synthetic")
def dataset_synthetic(
    out: Path = typer.Option(..., "--out", help="Output directory."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    num_train: int = typer.Option(48, "--num-train", min=1),
    num_val: int = typer.Option(16, "--num-val", min=1),
    image_size: int = typer.Option(128, "--image-size", min=32),
) -> None:
    """Write the small deterministic synthetic dataset (COCO, panoptic, semantic, ODVG; see docs/formats.md)."""
    from networks.common import synthetic

    paths = synthetic.generate(out, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    _out.print(f"synthetic dataset written to {Path(out).resolve()}", highlight=False)
    for split in ("train", "val"):
        split_paths = paths.get(split, {}) if isinstance(paths, dict) else {}
        if isinstance(split_paths, dict) and "dir" in split_paths:
            _out.print(f"  {split}: {Path(split_paths['dir']).resolve()}", highlight=False)
    _out.print("  formats: docs/formats.md", highlight=False)


@app.command("info")
def info() -> None:
    """Print the environment: versions, devices and where caches live."""
    import platform

    import pytorch_lightning as pl
    import torch

    from networks.common import sources

    _out.print(f"tao-cli {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
               f"lightning {pl.__version__}", highlight=False)
    cuda = torch.cuda.is_available()
    _out.print(f"CUDA available: {cuda}  devices: {torch.cuda.device_count() if cuda else 0}", highlight=False)
    _out.print("deformable attention: pure PyTorch (grid_sample), no compiled kernel needed", highlight=False)
    _out.print(f"archive cache: {sources.cache_root()}", highlight=False)
    _out.print(f"networks: {', '.join(registry.names())}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
