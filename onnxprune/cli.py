"""The `onnxprune` command: a Click group of thin commands (each lives in onnxprune/commands/)."""

from __future__ import annotations

import sys

import click

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="onnxprune")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Structured pruning of exported ONNX models."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from onnxprune.commands import analyze, eval_cmd, finetune, prune, quantize_cmd, sensitivity, sweep

    cli.add_command(prune.prune)
    cli.add_command(analyze.analyze)
    cli.add_command(eval_cmd.eval_command)
    cli.add_command(quantize_cmd.quantize_command)
    cli.add_command(sensitivity.sensitivity_command)
    cli.add_command(sweep.sweep_command)
    cli.add_command(finetune.finetune_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the group, turning OnnxPruneError into one line on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="onnxprune", standalone_mode=False)
    except OnnxPruneError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if debug:
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for details", err=True)
        return 3
    return 0


_register()

if __name__ == "__main__":
    sys.exit(main())
