"""nimbus: a self-hosted serverless platform for Python.

Write ``def handler(event, context)`` (the AWS Lambda signature), describe it
in ``app.yaml``, run ``nimbus up`` or ``nimbus deploy``; nimbus serves it over
HTTP from instances forked out of a preloaded zygote.
"""

__version__ = "0.1.0"
