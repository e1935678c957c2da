"""``nimbus export sam APP_DIR --out DIR``: the app as a SAM template."""

from __future__ import annotations

from pathlib import Path

import click

from nimbus.cli.main import cli, fail
from nimbus.errors import UserInputError


@cli.group()
def export() -> None:
    """Write the app in another platform's format."""


@export.command("sam")
@click.argument("app_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write template.yaml and the app's code into.")
@click.option("--force", is_flag=True, help="Write into a folder that is not empty.")
def sam(app_dir: Path, out_dir: Path, force: bool) -> None:
    """A SAM template.yaml (and the code beside it) that 'sam deploy' deploys to AWS.

    What Lambda has no place for is kept in each function's Metadata.nimbus
    block and listed as a warning.
    """
    from nimbus.manifest.export_sam import export_sam
    from nimbus.manifest.loader import load_app

    app = load_app(app_dir)  # a ManifestError exits 2 with file, line and field
    try:
        written = export_sam(app, app_dir, out_dir, force=force)
    except UserInputError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"{out_dir}: {exc.strerror or exc}", 1)
    click.echo(f"wrote {written.template} ({len(app.functions)} function(s)) and "
               f"{written.files} file(s) of code beside it")
    for line in written.warnings:
        click.echo(f"nimbus: warning: {line}", err=True)
    click.echo(f"deploy it with: cd {written.template.parent} && sam build && sam deploy --guided")
