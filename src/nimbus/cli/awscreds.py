"""``nimbus aws-credentials``: the environment that points boto3 (and the
AWS CLI) at this nimbus's Lambda Invoke API.

The key pair is derived here from the control token
(:func:`nimbus.control.sigv4.credentials_for`), exactly as the server
derives it: nothing else ever prints the secret. The region is the one the
running nimbus serves (asked of ``/v1/health``), or ``us-east-1`` when its
name is not one botocore accepts.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from nimbus.cli.main import _client, cli, connection_options

DEFAULT_REGION = "us-east-1"
# what botocore accepts as a region name
_BOTO_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


def environment(control_url: str, token: str, region: str | None) -> dict[str, str]:
    """The variables, in the order they are printed."""
    from nimbus.control.sigv4 import credentials_for

    key_id, secret = credentials_for(token)
    if not region or not _BOTO_REGION.fullmatch(region):
        region = DEFAULT_REGION
    return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": region, "AWS_ENDPOINT_URL_LAMBDA": control_url}


@cli.command(name="aws-credentials")
@connection_options
def aws_credentials(state_dir: Path | None, url: str | None, token: str | None) -> None:
    """Print `export` lines for boto3 and the AWS CLI: keys, region and the
    Lambda endpoint of this nimbus. Use: eval "$(nimbus aws-credentials)"."""
    client = _client(state_dir, url, token, timeout_s=10.0)
    health = client.request("GET", "/v1/health")
    region = health.get("region") if isinstance(health, dict) else None
    env = environment(client.conn.url, client.conn.token, region if isinstance(region, str)
                      else None)
    for key, value in env.items():
        click.echo(f"export {key}={shlex.quote(value)}")
