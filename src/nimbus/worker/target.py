"""A deployable target: one function version and where its code lives on this node."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nimbus.manifest.model import FunctionSpec, is_provided
from nimbus.region import region
from nimbus.runtime.sandbox import TASK_ROOT

if TYPE_CHECKING:
    from nimbus.worker.containment import Containment

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
        """The function's unqualified ARN: what an instance's context shows as
        ``invoked_function_arn`` (on Lambda, a call that names a version or an
        alias shows that qualifier; an instance here serves every caller)."""
        return f"arn:aws:lambda:{region()}:{ACCOUNT}:function:{self.spec.name}"

    def instance_spec(self, instance_id: str, state_dir: Path,
                      containment: Containment) -> dict[str, Any]:
        """What the zygote needs to start an instance of this target."""
        spec = self.spec
        sys_path = []
        path = "/usr/local/bin:/usr/bin:/bin"
        if self.requirements_hash:
            venv = containment.venv_dir(self.requirements_hash)  # as the instance sees it
            sys_path.append(str(site_packages_in(venv)))
            path = f"{venv / 'bin'}:{path}"
        if containment.full:  # the instance's own mount namespace shows these
            app_root, tmp_dir = Path(TASK_ROOT), Path("/tmp")
        else:
            app_root, tmp_dir = code_dir_for(state_dir, self.digest), containment.tmp_dir(
                instance_id)
        # The import root: the app folder, or the function's own code folder
        # in it (SAM's CodeUri). Layers follow it and the requirements, as
        # Lambda puts /opt/python after /var/task.
        code_dir = app_root / spec.code_dir if spec.code_dir else app_root
        for layer in spec.layers:
            sys_path += layer_paths(app_root / layer)
        # Lambda's environment and the function's own: nothing of the platform's.
        env = {
            "PATH": path,
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "HOME": str(tmp_dir),
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": str(self.version),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(spec.timeout_s)),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": instance_id,
            "AWS_EXECUTION_ENV": f"nimbus_python3.{sys.version_info.minor}",
            "AWS_REGION": region(),
            "AWS_DEFAULT_REGION": region(),
            "LAMBDA_TASK_ROOT": str(code_dir),
            "LAMBDA_RUNTIME_DIR": str(Path(__file__).resolve().parent.parent / "runtime"),
            "_HANDLER": spec.handler,
            "TMPDIR": str(tmp_dir),
        }
        if is_provided(spec.runtime):
            del env["AWS_EXECUTION_ENV"]  # as on Lambda: custom runtimes have none
        if spec.log_format is not None:
            env["AWS_LAMBDA_LOG_FORMAT"] = spec.log_format
        if spec.log_level is not None:
            env["AWS_LAMBDA_LOG_LEVEL"] = spec.log_level
        env.update(dict(spec.env))  # the user's env wins over the defaults
        out = {
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
            "contain": containment.instance_fields(spec, self.digest),
        }
        if is_provided(spec.runtime):
            # The instance runs this executable and serves it the Runtime API.
            out["bootstrap"] = str(code_dir / "bootstrap")
        return out


def layer_paths(layer: Path) -> list[str]:
    """Where a layer's modules are, as Lambda reads /opt: ``python`` and its site-packages."""
    v = sys.version_info
    python = layer / "python"
    return [str(python), str(python / "lib" / f"python{v.major}.{v.minor}" / "site-packages")]


def code_dir_for(state_dir: Path, digest: str) -> Path:
    return state_dir / "code" / digest


def venv_dir_for(state_dir: Path, requirements_hash: str) -> Path:
    return state_dir / "venvs" / requirements_hash


def site_packages_for(state_dir: Path, requirements_hash: str) -> Path:
    return site_packages_in(venv_dir_for(state_dir, requirements_hash))


def site_packages_in(venv: Path) -> Path:
    v = sys.version_info
    return venv / "lib" / f"python{v.major}.{v.minor}" / "site-packages"
