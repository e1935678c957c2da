"""The baseline for bench/warm.py: the seed handler in a bare Starlette app.

The same ``hello(event, context)`` the example app serves, called directly
in the request (no instance process, no event encoding beyond a minimal
dict): what a hand-written ASGI service doing the same work would cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "hello"))
from hello import hello  # noqa: E402


async def endpoint(request: Request) -> Response:
    event = {"rawPath": request.url.path, "headers": dict(request.headers)}
    result = hello(event, None)
    return Response(result["body"], result["statusCode"], media_type="text/plain")


app = Starlette(routes=[Route("/hello", endpoint)])
