"""The ``tao`` command: parse argv and dispatch; all work happens in spec, schema and engine.

    tao model list
    tao model <net> -h
    tao model <net> <action> -h                 (the action's spec fields: type, default, bounds/options)
    tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]
    tao automl <net> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]
    tao spec <net> <action>
    tao schema <net> --out DIR
    tao plot RUN_DIR [RUN_DIR ...] [--out DIR]
    tao dataset synthetic --out DIR [--seed S]
    tao dataset browse <net> [--spec SPEC] [--action A] --out DIR [--num N] [KEY=VALUE ...]
    tao dataset validate FILE [--images DIR] [--format F] [--all] [--json OUT]
    tao dataset stats FILE [--plot DIR] [--json OUT]
    tao dataset subset FILE --out DIR -n N [--seed S] [--by-class] [--archive]
    tao dataset convert --from F --to T SRC --out OUT [--label-map F] [--captions F]
    tao weights inspect FILE [--network NET]
    tao weights convert <net> SRC --out FILE [--format NAME] [-e SPEC] [KEY=VALUE ...]
    tao info

Overrides use Hydra's grammar and are passed on as the argv list they arrived as (never joined and re-split).
``-h`` works wherever ``--help`` does.  Help is rendered without Rich markup so ``[KEY=VALUE ...]`` survives.
Shell completion (``tao --install-completion``) completes networks, actions, flags and dotted spec keys after
``tao model``; see :func:`complete_model_args`.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from networks.common.errors import ConfigError, TaoUserError
from networks.common.network import refuse_deploy_action
from tao_cli import __version__, registry
from tao_cli.paths import packaged_spec

# ``-h`` everywhere: sub-commands inherit help_option_names from the root context.
_CONTEXT = {"help_option_names": ["-h", "--help"]}
# rich_markup_mode=None: plain click help, so "[KEY=VALUE ...]" is not eaten as a Rich markup tag.
app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=_CONTEXT,
    help="""TAO-compatible launcher for MAL, Mask2Former and Mask Grounding DINO.

\b
  tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]
  tao model list                networks and their actions
  tao model <net> -h            actions of one network
  tao model <net> <action> -h   the action's spec fields: type, default, bounds/options
  tao automl <net> -e SPEC      hyper-parameter search of the train spec (docs/automl.md)
  tao spec <net> <action>       the default spec as commented YAML""",
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=_CONTEXT,
                          help="Dataset tools.")
app.add_typer(dataset_app, name="dataset")
weights_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=_CONTEXT,
                          help="Weights you already have: recognise them, convert them (docs/weights.md).")
app.add_typer(weights_app, name="weights")

_out = Console()

MODEL_USAGE = "usage: tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]"
_SPEC_FLAGS = ("-e", "--experiment_spec_file", "--experiment-spec-file", "--experiment_spec")
# (flag, help) offered by completion after `tao model`; the spec flag's value is left to the shell (files).
_MODEL_FLAGS = (
    ("-e", "spec YAML"),
    ("--experiment_spec_file", "spec YAML"),
    ("--dry-run", "print the resolved spec and run plan, write nothing"),
    ("--debug", "full tracebacks"),
    ("--help", "help"),
)


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
            table.add_row(name, ", ".join(net.actions))
        except Exception as exc:  # a broken network must not hide the others
            table.add_row(name, f"[red]unavailable: {type(exc).__name__}: {exc}[/red]")
    _out.print(table)


def _say(text: str = "") -> None:
    """Plain stdout: no Rich markup (brackets stay) and no wrapping at the terminal width."""
    sys.stdout.write(text + "\n")


def _options_text(name: str, action: str) -> str:
    return (
        "options:\n"
        f"  -e, --experiment_spec_file SPEC  spec YAML (default: the packaged configs/{name}/{action}.yaml)\n"
        "  --dry-run                        print the resolved spec and run plan, write nothing\n"
        "  --debug                          full tracebacks\n"
        "  -h, --help                       show this help and exit"
    )


def _print_network_help(name: str) -> None:
    net = registry.load(name)
    _say(f"{MODEL_USAGE.replace('<net>', name)}\n\n{net.title} actions:")
    for action, description in net.actions.items():
        _say(f"  {action:<16} {description}")
    _say(f"\n{_options_text(name, '<action>')}\n")
    _say(f"`tao model {name} <action> -h` lists the action's spec fields (type, default, bounds/options);\n"
         f"`tao spec {name} <action>` prints the default spec as commented YAML.")


def _check_action(net, name: str, action: str) -> None:
    """ConfigError (with a close match) unless ``action`` is one of the network's actions."""
    if action not in net.actions:
        import difflib

        close = difflib.get_close_matches(action, net.actions, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"actions: {', '.join(net.actions)}"
        raise ConfigError(f"action '{action}'", f"is not an action of {name}", hint)


def _cell(text: str, width: int) -> str:
    """``text`` padded to ``width``; longer text is kept whole (the line stays one line)."""
    return text.ljust(width) + "  "


def _print_action_help(name: str, action: str) -> None:
    """Usage, options and one line per spec field (key, type, default, bounds/options, description) of an action;
    the fields and metadata are the ones ``tao spec`` prints (schema.field_summaries)."""
    from tao_cli import schema

    net = registry.load(name)
    _check_action(net, name, action)
    rows = schema.field_summaries(net.config_class, action, list(net.actions))
    _say(f"usage: tao model {name} {action} [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]\n")
    _say(f"{net.actions[action]}\n")
    _say(f"{_options_text(name, action)}\n")
    _say(f"spec fields: set any with KEY=VALUE (Hydra grammar: a.b=1, 'a.l=[0, 1]', ~a.b resets to the default).\n"
         f"??? (required) must be set; `tao spec {name} {action}` prints the same fields as commented YAML.")
    header = ("KEY", "TYPE", "DEFAULT", "BOUNDS/OPTIONS")
    # Column widths fit most values; a long default (a list) overflows its column instead of wrapping.
    widths = [max(len(header[0]), *(len(r.key) for r in rows)),
              min(14, max(len(header[1]), *(len(r.type) for r in rows))),
              min(22, max(len(header[2]), *(len(r.default) for r in rows))),
              min(22, max(len(header[3]), *(len(r.limits) for r in rows)))]
    _say("  " + "".join(_cell(h, w) for h, w in zip(header, widths, strict=True)) + "DESCRIPTION")
    for r in rows:
        default = r.default + (" (required)" if r.required else "")
        cells = (r.key, r.type, default, r.limits)
        _say(("  " + "".join(_cell(c, w) for c, w in zip(cells, widths, strict=True)) + r.description).rstrip())


def parse_model_args(args: list[str]) -> dict:
    """Split ``tao model`` argv into net, action, spec path, flags and the override list (order kept)."""
    spec, dry_run, debug, help_ = None, False, False, False
    positional: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in _SPEC_FLAGS:
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


def _spec_fields(name: str, action: str) -> list:
    from tao_cli import schema

    net = registry.load(name)
    return schema.field_summaries(net.config_class, action, list(net.actions))


def complete_model_args(args: list[str], incomplete: str) -> list[tuple[str, str]]:
    """Shell completions ``(value, help)`` for ``tao model <args> <incomplete>``.

    The first positional word completes to network names and ``list``; the second to the network's actions;
    later words to the dotted spec keys of that action as ``key=`` (``~key`` and ``+key=`` keep their prefix),
    to a field's values after ``key=`` where it has options or is a boolean, and to the flags when the word
    starts with ``-``.  After ``-e`` nothing is offered, so the shell completes a file name.  Imports only the
    named network's package (its config), never torch.  Errors (an unknown network) give no completions.
    """
    if args and args[-1] in _SPEC_FLAGS:
        return []
    try:
        pos = parse_model_args(args)["positional"]
    except ConfigError:
        return []
    if incomplete.startswith("-"):
        return [(flag, text) for flag, text in _MODEL_FLAGS if flag.startswith(incomplete)]
    try:
        if not pos:
            candidates = [(n, "") for n in registry.names()] + [("list", "networks and their actions")]
        elif len(pos) == 1:
            if pos[0] == "list":
                return []
            candidates = list(registry.load(pos[0]).actions.items())
        else:
            candidates = _complete_spec_word(_spec_fields(pos[0], pos[1]), args, incomplete)
    except Exception:  # noqa: BLE001 - a completion must never print a traceback into the shell
        return []
    return [(value, text) for value, text in candidates if value.startswith(incomplete)]


def _complete_spec_word(fields: list, args: list[str], incomplete: str) -> list[tuple[str, str]]:
    by_key = {f.key: f for f in fields}
    if "=" in incomplete:  # zsh/fish keep "key=partial" as one word
        key, _, _ = incomplete.partition("=")
        field = by_key.get(key.lstrip("+"))
        return [(f"{key}={o}", "") for o in field.options] if field else []
    # bash splits words at "=": "key", "=", "partial" (click drops a lone "=" being completed)
    last = args[-2] if len(args) >= 2 and args[-1] == "=" else (args[-1] if args else "")
    if (args and args[-1] == "=") or last in by_key:
        field = by_key.get(last.lstrip("+"))
        return [(o, "") for o in field.options] if field else []
    prefix = incomplete[:1] if incomplete[:1] in ("~", "+") else ""
    suffix = "" if prefix == "~" else "="
    return [(f"{prefix}{f.key}{suffix}", f.description) for f in fields]


class _ModelCommand(typer.core.TyperCommand):
    """``tao model``: raw argv parsed by :func:`parse_model_args`; every word completed by
    :func:`complete_model_args` (the command declares no click parameters to complete)."""

    def shell_complete(self, ctx, incomplete):  # noqa: D102 - see the class docstring
        # typer (pinned) vendors click; its CompletionItem is the type the completion machinery expects.
        return [typer.core.CompletionItem(value, help=text or None)
                for value, text in complete_model_args(list(ctx.args), incomplete)]


@app.command(
    "model",
    cls=_ModelCommand,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    short_help="Run an action: tao model <net> <action> [-e SPEC] [KEY=VALUE ...] (tao model -h).",
    help="Run an action: tao model <net> <action> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]; "
         "`tao model list`; `tao model <net> -h`; `tao model <net> <action> -h`.",
)
def model(ctx: typer.Context) -> None:
    args = list(ctx.args)
    debug = "--debug" in args
    try:
        parsed = parse_model_args(args)
        pos = parsed["positional"]
        if not pos or pos[0] in ("help",) or (parsed["help"] and not pos):
            _say(MODEL_USAGE)
            _say("\n`tao model <net> -h`: actions of a network; `tao model <net> <action> -h`: the action's spec "
                 "fields.")
            _print_networks()
            raise typer.Exit(0)
        if pos[0] == "list":
            _print_networks()
            raise typer.Exit(0)
        name = pos[0]
        if len(pos) < 2:
            _print_network_help(name)
            raise typer.Exit(0)
        if parsed["help"]:
            _print_action_help(name, pos[1])
            raise typer.Exit(0)
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
    _check_action(net, name, action)
    from tao_cli import spec as spec_mod
    from tao_cli.engine.run import run_action

    refuse_deploy_action(net, action)  # before the spec: its mandatory fields are not the problem
    path = Path(spec_path) if spec_path else packaged_spec(name, action)
    cfg = spec_mod.load_spec(net.config_class, action, path, overrides)  # net.check runs once, in make_plan
    if action == "train":
        from tao_cli.automl import policy_is_auto, run_automl

        if policy_is_auto(cfg):  # TAO's automl_policy: the train action becomes the AutoML study
            return run_automl(net, path, overrides, dry_run=dry_run, via_policy=True)
    return run_action(net, action, cfg, argv=argv or sys.argv, dry_run=dry_run, debug=debug,
                      overrides=overrides)


AUTOML_USAGE = "usage: tao automl <net> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]"


@app.command(
    "automl",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    short_help="Hyper-parameter search of a train spec on Optuna: tao automl <net> -e SPEC [KEY=VALUE ...].",
    help="Hyper-parameter search: tao automl <net> [-e SPEC] [--dry-run] [--debug] [KEY=VALUE ...]. Each trial "
         "is a train run in <results_dir>/automl/trial_<NNN>; the spec's automl section sets the algorithm, "
         "trials and search space (docs/automl.md). Rerun the same command to resume or add workers.",
)
def automl_cmd(ctx: typer.Context) -> None:
    args = list(ctx.args)

    def work() -> None:
        parsed = parse_model_args(args)
        pos = parsed["positional"]
        if parsed["help"] or not pos:
            _say(AUTOML_USAGE)
            _say("\nRuns the study of the spec's automl section (`tao spec <net> train` shows its fields); "
                 "--dry-run prints the plan and the search space. See docs/automl.md.")
            raise typer.Exit(0)
        if len(pos) > 1:
            raise ConfigError(pos[1], "unexpected argument", AUTOML_USAGE)
        raise typer.Exit(run_automl_cmd(pos[0], parsed["spec"], parsed["overrides"], dry_run=parsed["dry_run"]))

    _guarded(work, "--debug" in args)


def run_automl_cmd(name: str, spec_path: str | None, overrides: list[str], *, dry_run: bool = False) -> int:
    """``tao automl <name>``: load the network and run (or plan) its study; returns the exit code."""
    from tao_cli.automl import run_automl

    net = registry.load(name)
    path = Path(spec_path) if spec_path else packaged_spec(name, "train")
    return run_automl(net, path, overrides, dry_run=dry_run)


@app.command("spec")
def spec_cmd(
    network: str = typer.Argument(..., help="Network name, e.g. mal."),
    action: str = typer.Argument(..., help="Action, e.g. train."),
) -> None:
    """Print the default spec of an action as commented YAML (descriptions, bounds, options)."""
    from tao_cli import schema

    try:
        net = registry.load(network)
        _check_action(net, network, action)
        sys.stdout.write(schema.commented_yaml(net.config_class, action, list(net.actions),
                                               notes=schema.field_notes(net)))
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


def _guarded(work, debug: bool) -> None:
    """Run ``work()``; any error becomes one stderr line and its exit code (2 for bad input, 1 otherwise)."""
    try:
        work()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _error_line("ERROR: interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - errors become exit codes here, as in `tao model`
        raise typer.Exit(_fail(exc, debug)) from None


@app.command("plot")
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR",
                                          help="Run directories (e.g. results/train) to plot; several overlay."),
    out: Path | None = typer.Option(None, "--out", help="Directory for the figures (default: chosen by plot_runs)."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Plot the curves of one or more runs (loss, metrics) and print the written files."""
    def work() -> None:
        from tao_cli.plot import plot_runs

        for path in plot_runs(list(run_dirs), out):
            _say(str(path))

    _guarded(work, debug)


@dataset_app.command("browse")
def dataset_browse(
    network: str = typer.Argument(..., help="Network name, e.g. mal."),
    overrides: list[str] | None = typer.Argument(None, metavar="KEY=VALUE",
                                                 help="Spec overrides (Hydra grammar), as for tao model."),
    spec: Path | None = typer.Option(None, "--spec", "-e",
                                     help="Spec YAML (default: the packaged configs/<net>/<action>.yaml)."),
    action: str = typer.Option("train", "--action", help="Whose dataset to browse: train, evaluate, inference."),
    out: Path = typer.Option(..., "--out", help="Directory for the rendered samples."),
    num: int = typer.Option(8, "--num", min=1, help="Number of samples to render."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Render a few samples as the network's data pipeline sees them (images with boxes/masks/labels)."""
    def work() -> None:
        net = registry.load(network)
        _check_action(net, network, action)
        from tao_cli.browse import browse

        spec_path = spec if spec is not None else packaged_spec(network, action)
        for path in browse(network, spec_path, action, out, num, list(overrides or [])):
            _say(str(path))

    _guarded(work, debug)


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


@dataset_app.command("stats")
def dataset_stats_cmd(
    file: Path = typer.Argument(..., help="COCO instance or panoptic JSON."),
    plot: Path | None = typer.Option(None, "--plot", help="Directory for PNG histograms (classes, boxes per image)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the statistics as JSON to this file."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Images, instances per class, COCO size bins, crowd, empty images, boxes per image."""
    def work() -> None:
        from tao_cli.dataset_stats import dataset_stats, print_stats

        stats, written = dataset_stats(file, plot_dir=plot, json_out=json_out)
        print_stats(stats, file, _out)
        for path in written:
            _say(str(path))

    _guarded(work, debug)


@dataset_app.command("subset")
def dataset_subset_cmd(
    file: Path = typer.Argument(..., help="COCO instance or panoptic JSON, or ODVG JSON lines."),
    out: Path = typer.Option(..., "--out", help="Output directory (the subset file keeps the input's name)."),
    num: int = typer.Option(..., "-n", "--num", min=1, help="Number of images (ODVG: lines)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same files."),
    by_class: bool = typer.Option(False, "--by-class", help="Represent every class when -n allows."),
    images: Path | None = typer.Option(None, "--images", help="Image directory or archive (default: FILE's folder/images)."),
    archive: bool = typer.Option(False, "--archive", help="Write the images as OUT/images.tar.gz."),
    panoptic_dir: Path | None = typer.Option(None, "--panoptic-dir",
                                             help="Panoptic PNG directory or archive (default: FILE's folder/panoptic)."),
    label_map: Path | None = typer.Option(None, "--label-map",
                                          help="ODVG label map to copy (default: <FILE stem>_labelmap.json if present)."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """A consistent, deterministic subset: images copied, ids re-indexed (layout: docs/datasets.md)."""
    def work() -> None:
        from networks.common.dataset_subset import subset

        result = subset(file, out, num, seed=seed, by_class=by_class, images=images, archive=archive,
                        panoptic_dir=panoptic_dir, label_map=label_map)
        _say(f"{result['format']} subset: {result['images']} images, {result['annotations']} annotations")
        for path in result["files"]:
            _say(str(path))

    _guarded(work, debug)


@dataset_app.command("convert")
def dataset_convert(
    src: Path = typer.Argument(..., metavar="SRC", help="Source annotation file (COCO JSON or ODVG JSON lines)."),
    from_format: str = typer.Option(..., "--from", help="Source format: coco, coco_panoptic, odvg."),
    to_format: str = typer.Option(..., "--to", help="Target format: odvg, odvg_grounding, coco, semantic."),
    out: Path = typer.Option(..., "--out", help="Output file (odvg, odvg_grounding, coco) or directory (semantic)."),
    label_map: Path | None = typer.Option(None, "--label-map",
                                          help="ODVG label map: written by coco→odvg (default <out>_labelmap.json), "
                                               "read by odvg→coco."),
    captions: Path | None = typer.Option(None, "--captions",
                                         help="COCO captions file for coco→odvg_grounding (else the images' caption)."),
    categories: Path | None = typer.Option(None, "--categories",
                                           help="odvg→coco: COCO file whose categories give the ids (default: the "
                                                "label-map keys 0..C-1)."),
    images: Path | None = typer.Option(None, "--images", help="Image folder: sizes for odvg→coco, img paths for "
                                                             "semantic.jsonl."),
    panoptic_dir: Path | None = typer.Option(None, "--panoptic-dir",
                                             help="Panoptic PNG folder (default: SRC without .json)."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Convert annotations exactly: coco→odvg, coco→odvg_grounding, odvg→coco, coco_panoptic→semantic."""
    def work() -> None:
        from tao_cli.dataset_convert import convert, summary_lines

        result = convert(src, from_format, to_format, out, label_map=label_map, captions=captions,
                         categories=categories, images=images, panoptic_dir=panoptic_dir)
        for line in summary_lines(result):
            _out.print(line, highlight=False, markup=False)

    _guarded(work, debug)


@dataset_app.command("validate")
def dataset_validate(
    file: Path = typer.Argument(..., metavar="FILE",
                                help="COCO / COCO-panoptic JSON, ODVG .jsonl, or a semantic mask directory."),
    images: Path | None = typer.Option(None, "--images", help="Image directory: check files exist and decode."),
    fmt: str | None = typer.Option(None, "--format", help="coco, coco_panoptic, odvg or semantic (default: detected)."),
    masks: Path | None = typer.Option(None, "--masks", help="Panoptic PNG directory (default: beside the JSON)."),
    label_map: Path | None = typer.Option(None, "--label-map", help="ODVG label map: labels must exist in it."),
    all_images: bool = typer.Option(False, "--all", help="Decode every image/PNG, not a sample of 20."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report as JSON here."),
    max_lines: int = typer.Option(50, "--max-lines", min=0, help="Problems printed one per line; then counts."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Check every record of a dataset file; exit 2 when anything would make training or a metric wrong."""
    def work() -> None:
        from tao_cli.dataset_validate import validate

        code = validate(file, fmt=fmt, images=images, masks=masks, label_map=label_map, all_images=all_images,
                        json_out=json_out, max_lines=max_lines, console=_out)
        raise typer.Exit(code)

    _guarded(work, debug)


@weights_app.command("inspect")
def weights_inspect(
    file: Path = typer.Argument(..., metavar="FILE", help="Weights file or Hugging Face model directory."),
    network: str | None = typer.Option(None, "--network", help="Only try this network's formats."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Name the format of a weights file (network, format, part), its parameter count and key groups."""
    code = 0

    def work() -> None:
        nonlocal code
        from tao_cli.weights_cmd import inspect_text

        text, code = inspect_text(file, network)
        _say(text)

    _guarded(work, debug)
    if code:
        raise typer.Exit(code)


@weights_app.command("convert")
def weights_convert(
    network: str = typer.Argument(..., help="Network name, e.g. mal."),
    src: Path = typer.Argument(..., metavar="SRC", help="Weights file or Hugging Face model directory."),
    overrides: list[str] | None = typer.Argument(None, metavar="KEY=VALUE",
                                                 help="Spec overrides (Hydra grammar), with -e."),
    out: Path = typer.Option(..., "--out", help="Our checkpoint to write: .safetensors or .pth."),
    fmt: str | None = typer.Option(None, "--format", help="Format name, when auto-detection is ambiguous."),
    spec: Path | None = typer.Option(None, "-e", "--experiment_spec_file",
                                     help="Spec whose model section sizes the model (and checks the result)."),
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks."),
) -> None:
    """Convert weights of a known format into our checkpoint, offline, and print the load report."""
    def work() -> None:
        from tao_cli.weights_cmd import convert

        if overrides and spec is None:
            raise ConfigError("KEY=VALUE", "overrides need a spec", "pass -e SPEC with them")
        for line in convert(network, src, out, fmt_name=fmt, spec=spec, overrides=list(overrides or [])):
            _say(line)

    _guarded(work, debug)


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
    """Console-script entry point (also ``python -m tao_cli``: the same prog name, so _TAO_COMPLETE works)."""
    app(prog_name="tao")


if __name__ == "__main__":
    main()
