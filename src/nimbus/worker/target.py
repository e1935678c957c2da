"""A deployable target: one function version and where its code lives on this node."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nimbus.manifest.model import FunctionSpec

REGION = "local"
ACCOUNT = "000000000000"


@dataclass(frozen=True, slots=True)
class Target:
    app: str
    version: int
    spec: FunctionSpec
    digest: str  # sha256 of the code bundle
    requirements_hash: str | None  # key of the requirements venv, if any

    @property
    def function(self) -> str:
        return self.spec.name

    @property
    def key(self) -> tuple[str, int]:
        return (self.spec.name, self.version)

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{self.spec.name}:{self.version}"

    def instance_spec(self, instance_id: str, state_dir: Path) -> dict[str, Any]:
        """What the zygote needs to start an instance of this target."""
        code_dir = code_dir_for(state_dir, self.digest)
        sys_path = []
        if self.requirements_hash:
            sys_path.append(str(site_packages_for(state_dir, self.requirements_hash)))
        tmp_dir = state_dir / "tmp" / instance_id
        spec = self.spec
        env = {
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": str(self.version),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(spec.timeout_s)),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": instance_id,
            "AWS_EXECUTION_ENV": f"nimbus_python3.{sys.version_info.minor}",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "LAMBDA_TASK_ROOT": str(code_dir),
            "LAMBDA_RUNTIME_DIR": str(Path(__file__).resolve().parent.parent / "runtime"),
            "_HANDLER": spec.handler,
            "TMPDIR": str(tmp_dir),
            "NIMBUS_INSTANCE_ID": instance_id,
        }
        env.update(dict(spec.env))  # the user's env wins over the defaults
        return {
            "instance_id": instance_id,
            "function": spec.name,
            "version": self.version,
            "arn": self.arn,
            "module": spec.module,
            "callable": spec.callable,
            "code_dir": str(code_dir),
            "sys_path": sys_path,
            "tmp_dir": str(tmp_dir),
            "env": env,
            "memory_mb": spec.memory_mb,
            "concurrency": spec.concurrency,
        }


def code_dir_for(state_dir: Path, digest: str) -> Path:
    return state_dir / "code" / digest


def venv_dir_for(state_dir: Path, requirements_hash: str) -> Path:
    return state_dir / "venvs" / requirements_hash


def site_packages_for(state_dir: Path, requirements_hash: str) -> Path:
    v = sys.version_info
    return venv_dir_for(state_dir, requirements_hash) / "lib" / f"python{v.major}.{v.minor}" / "site-packages"
