"""app.yaml loading: both forms, defaults, and every error with its file, line and field."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.loader import MANIFEST_NAMES, load_app
from nimbus.manifest.model import AppSpec, FunctionSpec, Route

ROOT = Path(__file__).resolve().parent.parent
HERE = f"Python {sys.version_info.major}.{sys.version_info.minor}"
OTHER_MINOR = 8 if sys.version_info.minor != 8 else 9

SEED = """\
runtime: python3.8
handlers:
  - function: hello
    event: http
    method: get
"""
HELLO_PY = "def hello(event, context):\n    return {'statusCode': 200, 'body': 'hi'}\n"
API_PY = "def get_user(event, context):\n    return {}\n\ndef plain(event, context):\n    pass\n"


def make_app(root: Path, manifest: str, files: dict[str, str] | None = None,
             folder: str = "app", name: str = "app.yaml") -> Path:
    app = root / folder
    app.mkdir(parents=True, exist_ok=True)
    (app / name).write_text(textwrap.dedent(manifest))
    for rel, text in (files or {}).items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    return app


def rich(root: Path, functions: str, files: dict[str, str] | None = None, head: str = "") -> Path:
    """A rich manifest: ``head`` lines, then ``functions:`` and the given (dedented) body
    indented by two spaces. The function body starts on line ``len(head lines) + 2``."""
    body = textwrap.indent(textwrap.dedent(functions), "  ")
    return make_app(root, textwrap.dedent(head) + "functions:\n" + body,
                    {"api.py": API_PY, **(files or {})})


def load_error(app: Path, **kw: object) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_app(app, **kw)  # type: ignore[arg-type]
    err = info.value
    assert "\n" not in str(err)  # the CLI prints str(e) as one line
    return err


# --- the seed form ---------------------------------------------------------


def test_seed_form_verbatim(tmp_path):
    app = make_app(tmp_path, SEED, {"hello.py": HELLO_PY}, folder="hello")
    spec = load_app(app)
    assert isinstance(spec, AppSpec)
    assert spec.name == "hello"
    assert spec.source == str((app / "app.yaml").resolve())
    assert list(spec.functions) == ["hello"]
    fn = spec.functions["hello"]
    assert fn == FunctionSpec(name="hello", module="hello", callable="hello", runtime="python3.8",
                              routes=(Route("GET", "/hello"),))
    assert fn.handler == "hello.hello"
    if sys.version_info.minor != 8:
        assert spec.notices == (f"runtime python3.8 (function hello) is served by {HERE}",)


def test_examples_hello_in_the_repo():
    spec = load_app(ROOT / "examples" / "hello")
    fn = spec.functions["hello"]
    assert fn.routes == (Route("GET", "/hello"),)
    assert fn.routes[0].key == "GET /hello"
    assert (fn.module, fn.callable, fn.runtime) == ("hello", "hello", "python3.8")
    assert spec.name == "hello"
    assert any("python3.8" in n and "hello" in n and HERE in n for n in spec.notices)


def test_manifest_file_path_and_app_yml(tmp_path):
    assert MANIFEST_NAMES == ("app.yaml", "app.yml", "template.yaml", "template.yml")
    app = make_app(tmp_path, SEED, {"hello.py": HELLO_PY}, folder="yml", name="app.yml")
    assert load_app(app).functions["hello"].module == "hello"
    assert load_app(app / "app.yml").name == "yml"
    assert load_app(str(app)).name == "yml"


def test_seed_optional_keys_and_method_default(tmp_path):
    app = make_app(tmp_path, """\
        handlers:
          - function: hello
            event: http
            path: /greet/{name}
            handler: api.get_user
          - function: hello
            event: HTTP
            method: post
            path: /greet
          - function: plain
            event: http
            handler: api.plain
        """, {"api.py": API_PY})
    spec = load_app(app)
    hello = spec.functions["hello"]
    # two handlers for one function add triggers to it
    assert hello.routes == (Route("GET", "/greet/{name}"), Route("POST", "/greet"))
    assert (hello.module, hello.callable, hello.runtime) == ("api", "get_user", "python3")
    assert spec.functions["plain"].routes == (Route("GET", "/plain"),)
    assert spec.notices == ()


def test_app_name_from_manifest_folder_or_default(tmp_path):
    named = make_app(tmp_path, "name: my-app\n" + SEED, {"hello.py": HELLO_PY}, folder="x")
    assert load_app(named).name == "my-app"
    folder = make_app(tmp_path, SEED, {"hello.py": HELLO_PY}, folder="My_App 2.0")
    assert load_app(folder).name == "my-app-2-0"
    assert load_app(folder, default_name="Bundle").name == "bundle"
    assert load_app(named, default_name="other").name == "my-app"


# --- the rich form ---------------------------------------------------------


def test_rich_form_every_key(tmp_path):
    app = make_app(tmp_path, """\
        name: myapp
        runtime: python3.11
        functions:
          users:
            handler: api.get_user
            http: [{method: GET, path: /users/{id}}, {method: any, path: /files/{key+}}]
            memory_mb: 256
            timeout_s: 10
            concurrency: 2
            max_instances: 8
            runtime: python3
            env: {GREETING: hi, PORT: 8080, DEBUG: true, RATIO: 0.5}
            requirements: ./requirements.txt
          worker:
            handler: pkg.jobs.run
            http:
              method: POST
              path: /jobs
          batch:
            handler: tasks.main
        """, {"api.py": API_PY, "requirements.txt": "requests\n",
              "pkg/__init__.py": "", "pkg/jobs.py": "async def run(event, context):\n    pass\n",
              "tasks/__init__.py": "class main:\n    pass\n"})
    spec = load_app(app)
    assert spec.name == "myapp"
    assert list(spec.functions) == ["users", "worker", "batch"]
    users = spec.functions["users"]
    assert users == FunctionSpec(
        name="users", module="api", callable="get_user", runtime="python3",
        routes=(Route("GET", "/users/{id}"), Route("ANY", "/files/{key+}")),
        memory_mb=256, timeout_s=10.0, concurrency=2, max_instances=8,
        env=(("DEBUG", "true"), ("GREETING", "hi"), ("PORT", "8080"), ("RATIO", "0.5")),
        requirements="requirements.txt")
    assert isinstance(users.timeout_s, float)
    worker = spec.functions["worker"]
    assert (worker.module, worker.callable, worker.runtime) == ("pkg.jobs", "run", "python3.11")
    assert worker.routes == (Route("POST", "/jobs"),)  # a single mapping is one route
    assert spec.functions["batch"].routes == ()  # no http: invoked directly only
    assert FunctionSpec.from_dict(users.to_dict()) == users


def test_rich_defaults(tmp_path):
    app = rich(tmp_path, """\
        users:
          handler: api.get_user
          http: {path: /users}
        """)
    spec = load_app(app)
    fn = spec.functions["users"]
    assert fn.routes == (Route("GET", "/users"),)  # method defaults to GET
    assert (fn.memory_mb, fn.timeout_s, fn.concurrency, fn.max_instances) == (128, 3.0, 1, 4)
    assert (fn.runtime, fn.env, fn.requirements) == ("python3", (), None)
    assert spec.name == "app"
    assert spec.notices == ()


def test_runtime_notices_are_grouped_and_skip_this_python(tmp_path):
    this = f"python3.{sys.version_info.minor}"
    other = f"python3.{OTHER_MINOR}"
    app = rich(tmp_path, f"""\
        a: {{handler: api.plain, runtime: {other}}}
        b: {{handler: api.plain, runtime: {other}}}
        c: {{handler: api.plain, runtime: {this}}}
        d: {{handler: api.plain}}
        """, head="runtime: python3.99\n")
    spec = load_app(app)
    assert spec.notices == (
        f"runtime {other} (functions a, b) is served by {HERE}",
        f"runtime python3.99 (function d) is served by {HERE}",
    )
    assert spec.functions["c"].runtime == this


@pytest.mark.parametrize("source", [
    "def handler(e, c): pass\n",
    "async def handler(e, c): pass\n",
    "class handler: pass\n",
    "handler = lambda e, c: None\n",
    "a, (b, *handler) = 1, (2, 3)\n",
    "handler: object = print\n",
    "from os import path as handler\n",
    "import os as handler\n",
    "import handler.sub\n",
    "try:\n    from fast import handler\nexcept ImportError:\n    def handler(e, c): pass\n",
    "if True:\n    handler = print\n",
    "from os import *\n",  # star import: cannot tell, so trusted
    "def __getattr__(name):\n    return print\n",  # module __getattr__: same
    "globals()['handler'] = print\n",
    "[(handler := print)]\n",
])
def test_callable_bound_at_top_level(tmp_path, source):
    app = rich(tmp_path, "f: {handler: mod.handler}\n", {"mod.py": source})
    assert load_app(app).functions["f"].callable == "handler"


def test_check_code_false_does_not_parse_the_module(tmp_path):
    app = rich(tmp_path, "f: {handler: mod.missing}\n", {"mod.py": "def (:\n"})
    assert load_app(app, check_code=False).functions["f"].callable == "missing"
    assert load_error(app).file.endswith("mod.py")


# --- errors: files and YAML ------------------------------------------------


def test_missing_path(tmp_path):
    err = load_error(tmp_path / "nope")
    assert err.file == str(tmp_path / "nope")
    assert "no such" in err.message


def test_folder_without_manifest(tmp_path):
    err = load_error(tmp_path)
    assert err.file == str(tmp_path)
    assert "no app.yaml, app.yml or SAM template.yaml or template.yml" in err.message


def test_both_manifest_names(tmp_path):
    app = make_app(tmp_path, SEED, {"hello.py": HELLO_PY})
    (app / "app.yml").write_text(SEED)
    assert "keep one" in load_error(app).message


def test_yaml_syntax_error(tmp_path):
    app = make_app(tmp_path, "runtime: python3.8\nhandlers:\n  - function: hello\n"
                             "    event: [http\n")
    err = load_error(app)
    assert err.file == str(app / "app.yaml")
    assert err.line == 5  # PyYAML marks the end of the document, where the ']' was expected
    assert err.message.startswith("invalid YAML:")
    assert str(err).startswith(f"{app / 'app.yaml'}:5: invalid YAML")


def test_yaml_tab_indentation_error(tmp_path):
    app = make_app(tmp_path, "handlers:\n\t- function: hello\n")
    err = load_error(app)
    assert (err.line, err.field) == (2, None)
    assert err.message.startswith("invalid YAML: found character '\\t'")


def test_duplicate_yaml_key(tmp_path):
    app = rich(tmp_path, "f:\n  handler: api.plain\n  handler: api.get_user\n")
    err = load_error(app)
    assert (err.line, err.field) == (4, "functions.f.handler")
    assert "duplicate key 'handler' (first given on line 3)" in err.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_manifest(tmp_path, text):
    err = load_error(make_app(tmp_path, text))
    assert err.line == 1
    assert "empty" in err.message


def test_top_level_not_a_mapping(tmp_path):
    err = load_error(make_app(tmp_path, "# app\n- function: hello\n"))
    assert err.line == 2
    assert "expected a mapping at the top level, got a list" in err.message


def test_neither_handlers_nor_functions(tmp_path):
    err = load_error(make_app(tmp_path, "name: x\nruntime: python3.11\n"))
    assert err.line == 1
    assert "expected a 'handlers' list (short form) or a 'functions' mapping" in err.message
    assert "found keys: name, runtime" in err.message


def test_misspelt_form_key(tmp_path):
    err = load_error(make_app(tmp_path, "name: x\nfunction:\n  f: {handler: api.plain}\n"))
    assert (err.line, err.field) == (2, "function")
    assert err.message == "unknown key 'function'; did you mean 'functions'?"


def test_both_forms(tmp_path):
    err = load_error(make_app(tmp_path, "handlers: []\nfunctions: {}\n"))
    assert (err.line, err.field) == (2, "functions")
    assert "not both" in err.message


# --- errors: unknown keys --------------------------------------------------


def test_unknown_key_in_function(tmp_path):
    err = load_error(rich(tmp_path, "users:\n  handler: api.get_user\n  timout_s: 5\n"))
    assert (err.line, err.field) == (4, "functions.users.timout_s")
    assert err.message == "unknown key 'timout_s'; did you mean 'timeout_s'?"
    assert str(err) == (f"{err.file}:4: functions.users.timout_s: "
                        "unknown key 'timout_s'; did you mean 'timeout_s'?")


def test_unknown_key_at_top_level(tmp_path):
    err = load_error(rich(tmp_path, "f: {handler: api.plain}\n", head="name: a\nruntme: python3\n"))
    assert (err.line, err.field) == (2, "runtme")
    assert err.message == "unknown key 'runtme'; did you mean 'runtime'?"


def test_unknown_key_in_seed_handler(tmp_path):
    app = make_app(tmp_path, SEED.replace("method: get", "methd: get"), {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (5, "handlers[0].methd")
    assert err.message == "unknown key 'methd'; did you mean 'method'?"


def test_unknown_key_in_route_without_close_match(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  http: {path: /a, cors: true}\n"))
    assert (err.line, err.field) == (4, "functions.f.http.cors")
    assert err.message == "unknown key 'cors'; valid keys: method, path, alias, payload"


def test_unknown_key_in_seed_top_level(tmp_path):
    err = load_error(make_app(tmp_path, "runtim: python3.8\n" + SEED.split("\n", 1)[1]))
    assert (err.line, err.field) == (1, "runtim")
    assert "did you mean 'runtime'?" in err.message


# --- errors: values --------------------------------------------------------


def test_bad_method_seed_form(tmp_path):
    app = make_app(tmp_path, SEED.replace("method: get", "method: fetch"), {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (5, "handlers[0].method")
    assert err.message == "expected one of GET POST PUT PATCH DELETE HEAD OPTIONS ANY, got 'fetch'"
    assert "app.yaml:5: handlers[0].method:" in str(err)


def test_bad_method_rich_form(tmp_path):
    err = load_error(rich(tmp_path, """\
        f:
          handler: api.plain
          http:
            - {method: GET, path: /a}
            - method: FETCH
              path: /b
        """))
    assert (err.line, err.field) == (6, "functions.f.http[1].method")
    assert "GET POST PUT PATCH DELETE HEAD OPTIONS ANY" in err.message and "'FETCH'" in err.message


@pytest.mark.parametrize(("path", "problem"), [
    ("users", "must start with '/'"),
    ("/users/{1d}", "is not a path parameter"),
    ("/users/{id-x}", "is not a path parameter"),
    ("/users/user{id}", "is not a path parameter"),
    ("/files/{proxy+}/meta", "greedy parameter '{proxy+}' is only allowed as the last segment"),
    ("/a//b", "empty segments"),
    ("/a/", "empty segments"),
    ("/a/{id}/{id}", "appears twice"),
    ("'/a b'", "contains whitespace"),
])
def test_bad_path(tmp_path, path, problem):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  http:\n    - path: {path}\n"))
    assert (err.line, err.field) == (5, "functions.f.http[0].path")
    assert err.message.startswith("invalid path ")
    assert problem in err.message


def test_path_not_a_string(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  http: {path: 42}\n"))
    assert (err.line, err.field) == (4, "functions.f.http.path")
    assert err.message == "expected a route path starting with '/', got 42"


def test_greedy_last_segment_is_fine(tmp_path):
    spec = load_app(rich(tmp_path, "f: {handler: api.plain, http: {path: '/{proxy+}'}}\n"))
    assert spec.functions["f"].routes == (Route("GET", "/{proxy+}"),)


@pytest.mark.parametrize(("value", "given"), [
    ("0", "0"), ("-1", "-1"), ("901", "901"), ("ten", "'ten'"), ("true", "true"),
    (".nan", "nan"), ("[1]", "a list"),
])
def test_bad_timeout(tmp_path, value, given):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  timeout_s: {value}\n"))
    assert (err.line, err.field) == (4, "functions.f.timeout_s")
    assert err.message == (
        f"expected a number of seconds greater than 0 and at most 900, got {given}")


def test_timeout_limits_accepted(tmp_path):
    spec = load_app(rich(tmp_path, "a: {handler: api.plain, timeout_s: 900}\n"
                                   "b: {handler: api.plain, timeout_s: 0.25}\n"))
    assert (spec.functions["a"].timeout_s, spec.functions["b"].timeout_s) == (900.0, 0.25)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("memory_mb", "8", "an integer from 16 to 10240 (megabytes), got 8"),
    ("memory_mb", "20000", "an integer from 16 to 10240 (megabytes), got 20000"),
    ("memory_mb", "256.0", "an integer from 16 to 10240 (megabytes), got 256.0"),
    ("memory_mb", "big", "an integer from 16 to 10240 (megabytes), got 'big'"),
    ("concurrency", "0", "an integer from 1 to 1000, got 0"),
    ("concurrency", "1001", "an integer from 1 to 1000, got 1001"),
    ("concurrency", "true", "an integer from 1 to 1000, got true"),
    ("max_instances", "0", "an integer from 1 to 1000, got 0"),
    ("env", "[A]", "a mapping of variable names to values, got a list"),
])
def test_bad_numbers_and_env(tmp_path, key, value, expected):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  {key}: {value}\n"))
    assert (err.line, err.field) == (4, f"functions.f.{key}")
    assert err.message == f"expected {expected}"


@pytest.mark.parametrize("key", ["1BAD", "MY-VAR", "'A B'"])
def test_bad_env_key(tmp_path, key):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  env:\n    OK: 1\n    {key}: x\n"))
    assert err.line == 6
    assert err.field == f"functions.f.env.{key.strip(chr(39))}"
    assert err.message.startswith("expected an environment variable name")


def test_bad_env_value(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  env:\n    A: [1, 2]\n    B:\n"))
    assert (err.line, err.field) == (5, "functions.f.env.A")
    assert err.message == "expected a string, number or boolean, got a list"


def test_requirements_missing(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  requirements: reqs.txt\n"))
    assert (err.line, err.field) == (4, "functions.f.requirements")
    assert "requirements file 'reqs.txt' not found" in err.message


@pytest.mark.parametrize("value", ["/etc/requirements.txt", "../requirements.txt"])
def test_requirements_outside_the_app(tmp_path, value):
    (tmp_path / "requirements.txt").write_text("x\n")
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  requirements: {value}\n"))
    assert (err.line, err.field) == (4, "functions.f.requirements")
    assert "must be a path inside the app folder" in err.message


@pytest.mark.parametrize("runtime", ["nodejs18.x", "java11", "python2.7", "python"])
def test_non_python_runtime_top_level(tmp_path, runtime):
    app = make_app(tmp_path, SEED.replace("python3.8", runtime), {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (1, "runtime")
    assert err.message == (f"runtime '{runtime}' is not supported: only python3.x runtimes "
                           "(e.g. python3.11) and custom runtimes (provided.al2023, provided: "
                           "an executable bootstrap) are supported")


def test_non_python_runtime_per_function(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  runtime: nodejs18.x\n"))
    assert (err.line, err.field) == (4, "functions.f.runtime")
    assert "only python3.x runtimes" in err.message


def test_runtime_not_a_string(tmp_path):
    err = load_error(rich(tmp_path, "f: {handler: api.plain}\n", head="runtime: 3.8\n"))
    assert (err.line, err.field) == (1, "runtime")
    assert err.message == "expected a runtime like 'python3.11', got 3.8"


def test_unsupported_event(tmp_path):
    app = make_app(tmp_path, SEED.replace("event: http", "event: webhook"), {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (4, "handlers[0].event")
    assert err.message == "unsupported event 'webhook'; valid events: http, schedule, queue, topic"


def test_seed_trigger_event_needs_its_key(tmp_path):
    app = make_app(tmp_path, SEED.replace("event: http", "event: schedule"), {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (4, "handlers[0].event")
    assert "event: schedule needs a 'schedule' key" in err.message


def test_missing_required_keys(tmp_path):
    err = load_error(rich(tmp_path, "users:\n  memory_mb: 256\n"))
    assert (err.line, err.field) == (2, "functions.users.handler")
    assert err.message.startswith("required key 'handler' is missing")
    err = load_error(make_app(tmp_path / "b", "handlers:\n  - event: http\n"))
    assert (err.line, err.field) == (2, "handlers[0].function")


def test_empty_function_list(tmp_path):
    err = load_error(make_app(tmp_path, "name: a\nfunctions: {}\n"))
    assert (err.line, err.field) == (2, "functions")
    assert err.message == ("expected a mapping of function names to their settings, "
                           "got an empty mapping")


def test_function_not_a_mapping(tmp_path):
    err = load_error(rich(tmp_path, "users: api.get_user\n"))
    assert (err.line, err.field) == (2, "functions.users")
    assert err.message == "expected a mapping, got 'api.get_user'"


@pytest.mark.parametrize("name", ["1fn", "a.b", "x" * 65])
def test_bad_function_name(tmp_path, name):
    err = load_error(rich(tmp_path, f"ok: {{handler: api.plain}}\n"
                                    f"{name}: {{handler: api.plain}}\n"))
    assert (err.line, err.field) == (3, f"functions.{name}")
    assert err.message.startswith("expected a function name")


def test_bad_app_name(tmp_path):
    err = load_error(rich(tmp_path, "f: {handler: api.plain}\n", head="name: My App\n"))
    assert (err.line, err.field) == (1, "name")
    assert "did you mean 'my-app'?" in err.message


@pytest.mark.parametrize("ref", ["api", "api.", "1api.x", "api.class"])
def test_bad_handler_reference(tmp_path, ref):
    err = load_error(rich(tmp_path, f"f:\n  handler: '{ref}'\n"))
    assert (err.line, err.field) == (3, "functions.f.handler")
    assert err.message == f"expected 'module.callable' (e.g. api.get_user), got '{ref}'"


def test_seed_function_name_not_an_identifier(tmp_path):
    err = load_error(make_app(tmp_path, "handlers:\n  - function: my-fn\n    event: http\n"))
    assert (err.line, err.field) == (2, "handlers[0].function")
    assert "add handler: module.callable" in err.message


def test_seed_function_redeclared_with_another_handler(tmp_path):
    err = load_error(make_app(tmp_path, """\
        handlers:
          - {function: f, event: http, handler: api.plain}
          - {function: f, event: http, method: post, handler: api.get_user}
        """, {"api.py": API_PY}))
    assert (err.line, err.field) == (3, "handlers[1].handler")
    assert "already declared at handlers[0]" in err.message


# --- errors: code ------------------------------------------------------------


def test_missing_module_rich(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: users.get\n"))
    assert (err.line, err.field) == (3, "functions.f.handler")
    assert "handler module 'users' not found" in err.message
    assert "users.py and users/__init__.py" in err.message


def test_missing_dotted_module(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: pkg.mod.get\n"))
    assert "pkg/mod.py and pkg/mod/__init__.py" in err.message


def test_missing_module_seed(tmp_path):
    err = load_error(make_app(tmp_path, SEED))
    assert (err.line, err.field) == (3, "handlers[0].function")
    assert "looked for hello.py and hello/__init__.py" in err.message


def test_missing_callable(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.get_users\n"))
    assert (err.file, err.line, err.field) == (str(tmp_path / "app" / "app.yaml"), 3,
                                               "functions.f.handler")
    assert err.message == "api.py defines no top-level 'get_users'; did you mean 'get_user'?"


def test_callable_only_inside_a_function_does_not_count(tmp_path):
    source = "def outer():\n    def inner(e, c):\n        pass\n    return inner\n"
    err = load_error(rich(tmp_path, "f: {handler: mod.inner}\n", {"mod.py": source}))
    assert err.message == "mod.py defines no top-level 'inner'"


def test_syntax_error_in_handler_module(tmp_path):
    source = "import os\n\ndef hello(event, context)\n    pass\n"
    app = make_app(tmp_path, SEED, {"hello.py": source})
    err = load_error(app)
    assert err.file == str(app / "hello.py")
    assert err.line == 3
    assert err.field == "handlers[0].function"
    assert err.message.startswith("cannot parse handler module:")
    assert f"{app / 'app.yaml'}:3" in err.message


# --- errors: routes ------------------------------------------------------------


def test_duplicate_route_across_functions(tmp_path):
    err = load_error(rich(tmp_path, """\
        a:
          handler: api.plain
          http: [{method: GET, path: /users/{id}}]
        b:
          handler: api.get_user
          http:
            - {method: POST, path: /users/{id}}
            - {method: GET, path: /users/{id}}
        """))
    assert (err.line, err.field) == (9, "functions.b.http[1]")
    assert err.message == ("duplicate route GET /users/{id}: already declared by function 'a' "
                           "at functions.a.http[0] (line 4)")


def test_duplicate_route_in_one_function(tmp_path):
    err = load_error(rich(tmp_path, """\
        a:
          handler: api.plain
          http:
            - {path: /x}
            - {method: get, path: /x}
        """))
    assert (err.line, err.field) == (6, "functions.a.http[1]")
    assert "already declared by this function at functions.a.http[0] (line 5)" in err.message


def test_any_beside_named_methods_on_one_path_loads(tmp_path):
    spec = load_app(rich(tmp_path, """\
        a: {handler: api.plain, http: {method: DELETE, path: /x}}
        b: {handler: api.plain, http: {method: ANY, path: /x}}
        """))
    assert spec.functions["b"].routes == (Route("ANY", "/x"),)


def test_any_twice_on_one_path_conflicts(tmp_path):
    err = load_error(rich(tmp_path, """\
        a: {handler: api.plain, http: {method: ANY, path: /x}}
        b: {handler: api.plain, http: {method: any, path: /x}}
        """))
    assert (err.line, err.field) == (3, "functions.b.http")
    assert err.message == ("duplicate route ANY /x: already declared by function 'a' "
                           "at functions.a.http (line 2)")


def test_same_route_with_other_parameter_names_conflicts(tmp_path):
    err = load_error(rich(tmp_path, """\
        a: {handler: api.plain, http: {path: '/u/{id}'}}
        b: {handler: api.plain, http: {path: '/u/{uid}'}}
        """))
    assert err.line == 3
    assert "route GET /u/{uid} overlaps GET /u/{id}" in err.message


def test_one_path_with_other_parameter_names_conflicts_whatever_the_methods(tmp_path):
    # POST /u/1 would reach neither: the router tries one spelling of the path
    err = load_error(rich(tmp_path, """\
        a: {handler: api.plain, http: {method: GET, path: '/u/{id}'}}
        b: {handler: api.plain, http: {method: POST, path: '/u/{uid}'}}
        """))
    assert err.line == 3
    assert err.message.startswith("route POST /u/{uid} overlaps GET /u/{id} (one path with "
                                  "other parameter names; name them the same)")


def test_duplicate_route_seed(tmp_path):
    err = load_error(make_app(tmp_path, """\
        handlers:
          - {function: hello, event: http}
          - {function: hello, event: http, method: GET}
        """, {"hello.py": HELLO_PY}))
    assert (err.line, err.field) == (3, "handlers[1]")
    assert "duplicate route GET /hello" in err.message


def test_distinct_methods_and_paths_do_not_conflict(tmp_path):
    spec = load_app(rich(tmp_path, """\
        a: {handler: api.plain, http: [{method: GET, path: /x}, {method: HEAD, path: /x}]}
        b: {handler: api.plain, http: [{method: ANY, path: /x/{id}}, {path: /x/{id}/y}]}
        """))
    assert len(spec.functions["a"].routes) == 2 and len(spec.functions["b"].routes) == 2


# --- YAML details ------------------------------------------------------------------


def test_braced_paths_in_flow_mappings_leave_quoted_strings_alone(tmp_path):
    # `{path: /users/{id}}` is not valid YAML, but it is how routes get written.
    spec = load_app(rich(tmp_path, """\
        f: {handler: api.plain, http: {path: /users/{id}/files/{key+}, method: PUT}}
        g: {handler: api.plain, env: {A: "x /a/{b}", B: 'path: /c/{d}'}}  # path: /e/{f}
        """))
    assert spec.functions["f"].routes == (Route("PUT", "/users/{id}/files/{key+}"),)
    assert spec.functions["g"].env == (("A", "x /a/{b}"), ("B", "path: /c/{d}"))


def test_unfixable_flow_path_reports_the_original_yaml_error(tmp_path):
    err = load_error(rich(tmp_path, "f: {handler: api.plain, http: {path: /a/{b c}}}\n"))
    assert err.line == 2
    assert err.message == ("invalid YAML: expected ',' or '}', but got '{' "
                           "(while parsing a flow mapping)")


def test_error_after_a_fixed_flow_path_is_the_one_reported(tmp_path):
    # line 2 is fixed by quoting; the broken flow sequence below is what is left
    err = load_error(rich(tmp_path, "f: {handler: api.plain, http: {path: /a/{b}}}\n"
                                    "g: [\n  x: :\n"))
    assert err.line == 4
    assert err.message == ("invalid YAML: expected the node content, but found ':' "
                           "(while parsing a flow node)")


def test_merge_keys(tmp_path):
    spec = load_app(rich(tmp_path, """\
        a: &base {handler: api.plain, memory_mb: 256}
        b:
          <<: *base
          timeout_s: 5
        """))
    assert (spec.functions["b"].memory_mb, spec.functions["b"].timeout_s) == (256, 5.0)
    err = load_error(rich(tmp_path / "bad", """\
        a: &base {handler: api.plain, memory_mb: 8}
        b:
          <<: *base
        """))
    assert (err.line, err.field) == (2, "functions.a.memory_mb")


def test_first_error_in_the_file_is_reported(tmp_path):
    # pydantic checks memory_mb before timeout_s; the file has timeout_s first.
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  timeout_s: 0\n  memory_mb: 1\n"))
    assert (err.line, err.field) == (4, "functions.f.timeout_s")


def test_integer_env_key(tmp_path):
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  env: {1: a}\n"))
    assert (err.line, err.field) == (4, "functions.f.env.1")
    assert err.message.endswith("got 1")


def test_not_utf8(tmp_path):
    app = make_app(tmp_path, "")
    (app / "app.yaml").write_bytes(b"name: a\n# caf\xe9\n")
    err = load_error(app)
    assert err.line == 2 and "UTF-8" in err.message


def test_control_character(tmp_path):
    err = load_error(make_app(tmp_path, "name: a\nfunctions:\n  f: {handler: \x07}\n"))
    assert err.line == 3
    assert err.message == "invalid YAML: unacceptable character #x0007"


def test_python_tags_are_not_constructed(tmp_path):
    err = load_error(make_app(tmp_path, "functions: !!python/object/apply:os.system [echo]\n"))
    assert err.line == 1
    assert "could not determine a constructor" in err.message


# --- autoscaling keys ----------------------------------------------------------------

SCALING_DEFAULTS = {
    "min_instances": 0, "max_instances": 4, "max_concurrency": None,
    "target_concurrency": 0.7, "stable_window_s": 60.0, "panic_window_s": 6.0,
    "scale_to_zero_after_s": 30.0, "max_queue": 100, "preload": (),
}


def scaling(fn: FunctionSpec) -> dict[str, object]:
    return {key: getattr(fn, key) for key in SCALING_DEFAULTS}


def test_scaling_defaults(tmp_path):
    spec = load_app(rich(tmp_path, "f: {handler: api.plain}\n"))
    assert scaling(spec.functions["f"]) == SCALING_DEFAULTS
    seed = load_app(make_app(tmp_path / "seed", SEED, {"hello.py": HELLO_PY}))
    assert scaling(seed.functions["hello"]) == SCALING_DEFAULTS
    # and the same defaults for code that builds a FunctionSpec itself
    assert scaling(FunctionSpec("f", "api", "plain")) == SCALING_DEFAULTS
    for key in ("target_concurrency", "stable_window_s", "panic_window_s",
                "scale_to_zero_after_s"):
        assert isinstance(getattr(spec.functions["f"], key), float)


def test_scaling_defaults_derived_from_other_keys(tmp_path):
    spec = load_app(rich(tmp_path, """\
        a: {handler: api.plain, concurrency: 3}
        b: {handler: api.plain, concurrency: 10, stable_window_s: 4}
        c: {handler: api.plain, target_concurrency: null, max_concurrency: null}
        """))
    a, b, c = (spec.functions[n] for n in "abc")
    assert a.target_concurrency == 2.1  # concurrency x 0.7, not 2.0999999999999996
    assert (b.target_concurrency, b.stable_window_s) == (7.0, 4.0)
    assert b.panic_window_s == 4.0  # the default 6 s, cut to a shorter stable window
    assert scaling(c) == SCALING_DEFAULTS  # null spells the default
    assert FunctionSpec("f", "m", "c", concurrency=3).target_concurrency == 2.1
    assert FunctionSpec("f", "m", "c", stable_window_s=2.5).panic_window_s == 2.5


def test_scaling_every_key_round_trips(tmp_path):
    spec = load_app(rich(tmp_path, """\
        f:
          handler: api.plain
          concurrency: 8
          min_instances: 2
          max_instances: 10
          max_concurrency: 50
          target_concurrency: 6
          stable_window_s: 30
          panic_window_s: 2.5
          scale_to_zero_after_s: 0
          max_queue: 0
          preload: [jinja2, os.path, _private.mod2, jinja2]
        """))
    fn = spec.functions["f"]
    assert scaling(fn) == {
        "min_instances": 2, "max_instances": 10, "max_concurrency": 50,
        "target_concurrency": 6.0, "stable_window_s": 30.0, "panic_window_s": 2.5,
        "scale_to_zero_after_s": 0.0, "max_queue": 0,
        "preload": ("jinja2", "os.path", "_private.mod2"),  # a repeat is dropped
    }
    assert isinstance(fn.target_concurrency, float) and isinstance(fn.stable_window_s, float)
    record = json.loads(json.dumps(fn.to_dict()))  # as the store keeps it
    assert record["preload"] == ["jinja2", "os.path", "_private.mod2"]
    assert record["min_instances"] == 2 and record["target_concurrency"] == 6.0
    assert FunctionSpec.from_dict(record) == fn
    assert FunctionSpec.from_dict(fn.to_dict()) == fn


def test_scaling_limits_accepted(tmp_path):
    spec = load_app(rich(tmp_path, """\
        a: {handler: api.plain, min_instances: 4, max_instances: 4, max_concurrency: 1}
        b: {handler: api.plain, concurrency: 2, target_concurrency: 2, stable_window_s: 3600,
            panic_window_s: 3600, scale_to_zero_after_s: 86400, preload: []}
        c: {handler: api.plain, target_concurrency: 0.01, stable_window_s: 0.5,
            panic_window_s: 0.5, max_queue: 100000, max_instances: 1000, min_instances: 1000}
        """))
    a, b, c = (spec.functions[n] for n in "abc")
    assert (a.min_instances, a.max_instances, a.max_concurrency) == (4, 4, 1)
    assert (b.target_concurrency, b.stable_window_s, b.panic_window_s) == (2.0, 3600.0, 3600.0)
    assert (b.scale_to_zero_after_s, b.preload) == (86400.0, ())
    assert (c.target_concurrency, c.panic_window_s, c.max_queue) == (0.01, 0.5, 100000)
    assert c.min_instances == c.max_instances == 1000


def test_from_dict_of_a_record_without_the_scaling_keys():
    # What versions before autoscaling wrote to the store.
    old = {"name": "f", "module": "api", "callable": "plain", "runtime": "python3",
           "routes": [{"method": "GET", "path": "/f"}], "memory_mb": 256, "timeout_s": 5.0,
           "concurrency": 3, "max_instances": 6, "env": {"A": "1"}, "requirements": None}
    fn = FunctionSpec.from_dict(old)
    assert (fn.routes, fn.env, fn.max_instances) == ((Route("GET", "/f"),), (("A", "1"),), 6)
    assert scaling(fn) == {**SCALING_DEFAULTS, "max_instances": 6, "target_concurrency": 2.1}
    assert FunctionSpec.from_dict(fn.to_dict()) == fn


def test_from_dict_ignores_keys_a_newer_nimbus_added():
    # A record written by a later nimbus must still load after a rollback.
    record = FunctionSpec("f", "api", "plain", memory_mb=256).to_dict()
    record["a_key_from_the_future"] = {"anything": 1}
    fn = FunctionSpec.from_dict(record)
    assert fn == FunctionSpec("f", "api", "plain", memory_mb=256)


def test_scaling_keys_in_the_seed_form(tmp_path):
    spec = load_app(make_app(tmp_path, """\
        handlers:
          - function: hello
            event: http
            min_instances: 1
            max_instances: 2
            preload: [json]
          - function: hello
            event: http
            method: post
            max_queue: 5
            max_instances: 2
          - {function: other, event: http, handler: api.plain, target_concurrency: 0.5,
             max_concurrency: 3, stable_window_s: 20, panic_window_s: 2,
             scale_to_zero_after_s: 600}
        """, {"hello.py": HELLO_PY, "api.py": API_PY}))
    hello, other = spec.functions["hello"], spec.functions["other"]
    assert hello.routes == (Route("GET", "/hello"), Route("POST", "/hello"))
    assert scaling(hello) == {**SCALING_DEFAULTS, "min_instances": 1, "max_instances": 2,
                              "preload": ("json",), "max_queue": 5}
    assert scaling(other) == {**SCALING_DEFAULTS, "target_concurrency": 0.5,
                              "max_concurrency": 3, "stable_window_s": 20.0,
                              "panic_window_s": 2.0, "scale_to_zero_after_s": 600.0}


def test_seed_scaling_key_given_twice_with_another_value(tmp_path):
    err = load_error(make_app(tmp_path, """\
        handlers:
          - {function: hello, event: http, max_instances: 2}
          - {function: hello, event: http, method: post, max_instances: 3}
        """, {"hello.py": HELLO_PY}))
    assert (err.line, err.field) == (3, "handlers[1].max_instances")
    assert err.message == ("max_instances of function 'hello' is already set to 2 at "
                           "handlers[0].max_instances (line 2); set it once")


def test_seed_scaling_keys_are_checked_across_entries(tmp_path):
    err = load_error(make_app(tmp_path, """\
        handlers:
          - {function: hello, event: http, max_instances: 2}
          - {function: hello, event: http, method: post, min_instances: 3}
        """, {"hello.py": HELLO_PY}))
    assert (err.line, err.field) == (3, "handlers[1].min_instances")
    assert err.message == "min_instances (3) must not exceed max_instances (2)"


def test_seed_target_concurrency_is_bounded_by_concurrency_1(tmp_path):
    err = load_error(make_app(tmp_path, "handlers:\n  - function: hello\n    event: http\n"
                                        "    target_concurrency: 2\n", {"hello.py": HELLO_PY}))
    assert (err.line, err.field) == (4, "handlers[0].target_concurrency")
    assert err.message == ("target_concurrency (2) must not exceed concurrency "
                           "(1; the short form has no 'concurrency' key)")


def test_seed_bad_scaling_value(tmp_path):
    err = load_error(make_app(tmp_path, SEED + "    max_queue: ten\n", {"hello.py": HELLO_PY}))
    assert (err.line, err.field) == (6, "handlers[0].max_queue")
    assert err.message == "expected an integer of at least 0, got 'ten'"


_INT_0 = "an integer of at least 0"
_MIN = "an integer from 0 to max_instances"
_MAX = "an integer from 1 to 1000"
_CAP = "an integer of at least 1, or null for no cap"
_TARGET = "a number greater than 0 and at most concurrency, or null for concurrency x 0.7"
_STABLE = "a number of seconds greater than 0 and at most 3600"
_PANIC = "a number of seconds greater than 0 and at most stable_window_s"
_ZERO = "a number of seconds from 0 to 86400"
_PRELOAD = "a list of module names (e.g. [jinja2, os.path])"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("min_instances", "-1", f"{_MIN}, got -1"),
    ("min_instances", "ten", f"{_MIN}, got 'ten'"),
    ("min_instances", "'1'", f"{_MIN}, got '1'"),
    ("min_instances", "true", f"{_MIN}, got true"),
    ("min_instances", "1.5", f"{_MIN}, got 1.5"),
    ("max_instances", "0", f"{_MAX}, got 0"),
    ("max_instances", "1001", f"{_MAX}, got 1001"),
    ("max_instances", "ten", f"{_MAX}, got 'ten'"),
    ("max_instances", "false", f"{_MAX}, got false"),
    ("max_concurrency", "0", f"{_CAP}, got 0"),
    ("max_concurrency", "ten", f"{_CAP}, got 'ten'"),
    ("max_concurrency", "true", f"{_CAP}, got true"),
    ("max_concurrency", "2.5", f"{_CAP}, got 2.5"),
    ("target_concurrency", "0", f"{_TARGET}, got 0"),
    ("target_concurrency", "-0.5", f"{_TARGET}, got -0.5"),
    ("target_concurrency", "ten", f"{_TARGET}, got 'ten'"),
    ("target_concurrency", "true", f"{_TARGET}, got true"),
    ("target_concurrency", ".nan", f"{_TARGET}, got nan"),
    ("stable_window_s", "0", f"{_STABLE}, got 0"),
    ("stable_window_s", "3601", f"{_STABLE}, got 3601"),
    ("stable_window_s", "ten", f"{_STABLE}, got 'ten'"),
    ("stable_window_s", "true", f"{_STABLE}, got true"),
    ("stable_window_s", ".inf", f"{_STABLE}, got inf"),
    ("panic_window_s", "0", f"{_PANIC}, got 0"),
    ("panic_window_s", "-6", f"{_PANIC}, got -6"),
    ("panic_window_s", "six", f"{_PANIC}, got 'six'"),
    ("panic_window_s", "true", f"{_PANIC}, got true"),
    ("scale_to_zero_after_s", "-1", f"{_ZERO}, got -1"),
    ("scale_to_zero_after_s", "86401", f"{_ZERO}, got 86401"),
    ("scale_to_zero_after_s", "thirty", f"{_ZERO}, got 'thirty'"),
    ("scale_to_zero_after_s", "true", f"{_ZERO}, got true"),
    ("max_queue", "-1", f"{_INT_0}, got -1"),
    ("max_queue", "ten", f"{_INT_0}, got 'ten'"),
    ("max_queue", "true", f"{_INT_0}, got true"),
    ("max_queue", "1.0", f"{_INT_0}, got 1.0"),
    ("max_queue", "null", f"{_INT_0}, got null"),
    ("preload", "jinja2", f"{_PRELOAD}, got 'jinja2'"),
    ("preload", "{jinja2: 1}", f"{_PRELOAD}, got a mapping"),
    ("preload", "3", f"{_PRELOAD}, got 3"),
])
def test_bad_scaling_value(tmp_path, key, value, expected):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  {key}: {value}\n"))
    assert (err.line, err.field) == (4, f"functions.f.{key}")
    assert err.message == f"expected {expected}"


@pytest.mark.parametrize(("entry", "given"), [
    ("'not a module'", "'not a module'"),
    ("3", "3"),
    ("1jinja", "'1jinja'"),
    ("os..path", "'os..path'"),
    ("os.path.", "'os.path.'"),
    (".rel", "'.rel'"),
    ("import", "'import'"),
    ("''", "''"),
    ("null", "null"),
    ("[jinja2]", "a list"),
])
def test_bad_preload_entry(tmp_path, entry, given):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  preload:\n    - jinja2\n"
                                    f"    - {entry}\n"))
    assert (err.line, err.field) == (6, "functions.f.preload[1]")
    assert err.message == f"expected a module name like 'jinja2' or 'os.path', got {given}"


def test_bad_preload_entry_in_a_flow_list(tmp_path):
    err = load_error(rich(tmp_path, "f: {handler: api.plain, preload: [os, 'not a module']}\n"))
    assert (err.line, err.field) == (2, "functions.f.preload[1]")
    assert "got 'not a module'" in err.message


def test_min_instances_above_max_instances(tmp_path):
    err = load_error(rich(tmp_path, """\
        f:
          handler: api.plain
          min_instances: 5
          max_instances: 3
        """))
    assert (err.line, err.field) == (4, "functions.f.min_instances")
    assert err.message == "min_instances (5) must not exceed max_instances (3)"
    err = load_error(rich(tmp_path / "b", "f:\n  handler: api.plain\n  min_instances: 5\n"))
    assert (err.line, err.field) == (4, "functions.f.min_instances")
    assert err.message == "min_instances (5) must not exceed max_instances (4, the default)"


def test_target_concurrency_above_concurrency(tmp_path):
    err = load_error(rich(tmp_path, """\
        f:
          handler: api.plain
          target_concurrency: 4.5
          concurrency: 4
        """))
    assert (err.line, err.field) == (4, "functions.f.target_concurrency")
    assert err.message == "target_concurrency (4.5) must not exceed concurrency (4)"
    err = load_error(rich(tmp_path / "b", "f:\n  handler: api.plain\n  target_concurrency: 2\n"))
    assert (err.line, err.field) == (4, "functions.f.target_concurrency")
    assert err.message == "target_concurrency (2) must not exceed concurrency (1, the default)"


def test_panic_window_longer_than_stable_window(tmp_path):
    err = load_error(rich(tmp_path, """\
        f:
          handler: api.plain
          stable_window_s: 10
          panic_window_s: 12
        """))
    assert (err.line, err.field) == (5, "functions.f.panic_window_s")
    assert err.message == "panic_window_s (12) must not exceed stable_window_s (10)"
    err = load_error(rich(tmp_path / "b", "f:\n  handler: api.plain\n  panic_window_s: 60.5\n"))
    assert (err.line, err.field) == (4, "functions.f.panic_window_s")
    assert err.message == "panic_window_s (60.5) must not exceed stable_window_s (60, the default)"


def test_value_errors_come_before_checks_between_keys(tmp_path):
    # min_instances > the default max_instances, but max_instances itself is invalid
    err = load_error(rich(tmp_path, "f:\n  handler: api.plain\n  min_instances: 5\n"
                                    "  max_instances: ten\n"))
    assert (err.line, err.field) == (5, "functions.f.max_instances")


@pytest.mark.parametrize(("typo", "meant"), [
    ("max_instance", "max_instances"),
    ("min_instance", "min_instances"),
    ("minInstances", "min_instances"),
    ("max_concurency", "max_concurrency"),
    ("target_concurency", "target_concurrency"),
    ("stable_window", "stable_window_s"),
    ("panic_window", "panic_window_s"),
    ("scale_to_zero_after", "scale_to_zero_after_s"),
    ("max_queu", "max_queue"),
    ("preloads", "preload"),
])
def test_unknown_scaling_key_suggests_the_name(tmp_path, typo, meant):
    err = load_error(rich(tmp_path, f"f:\n  handler: api.plain\n  {typo}: 1\n"))
    assert (err.line, err.field) == (4, f"functions.f.{typo}")
    assert err.message == f"unknown key '{typo}'; did you mean '{meant}'?"
    app = make_app(tmp_path / "seed", SEED + f"    {typo}: 1\n", {"hello.py": HELLO_PY})
    err = load_error(app)
    assert (err.line, err.field) == (6, f"handlers[0].{typo}")
    assert err.message == f"unknown key '{typo}'; did you mean '{meant}'?"


# -- async invocations and event triggers (issue 4) -----------------------------

def test_event_keys_load_with_defaults_and_round_trip(tmp_path):
    app = load_app(rich(tmp_path, """\
        worker:
          handler: api.plain
          retries: 0
          retry_delay_s: 2
          destinations:
            on_success: {function: sink}
            on_failure: {queue: failed}
          schedule: [rate(5 minutes), {expression: "0 9 * * MON-FRI", timezone: Europe/Paris,
                                       missed: all, input: {kind: weekly}}]
          topic: signups
        sink:
          handler: api.plain
          queue: {name: failed, batch_size: 3}
        """))
    w, s = app.functions["worker"], app.functions["sink"]
    assert (w.retries, w.retry_delay_s, w.max_event_age_s, w.dead_letter) == (0, 2.0, 21600.0, True)
    assert (w.on_success, w.on_failure) == ("function:sink", "queue:failed")
    assert [(x.expression, x.timezone, x.missed) for x in w.schedules] == [
        ("rate(5 minutes)", "UTC", "once"), ("0 9 * * MON-FRI", "Europe/Paris", "all")]
    assert dict(w.schedules[1].input) == {"kind": "weekly"}
    assert w.topics == ("signups",) and w.queue is None
    assert (s.queue, s.batch_size, s.max_batching_window_s, s.retries) == ("failed", 3, 0.0, 2)
    assert FunctionSpec.from_dict(w.to_dict()) == w


def test_seed_form_triggers(tmp_path):
    app = load_app(make_app(tmp_path, """\
        handlers:
          - {function: hello, event: http, method: get}
          - {function: hello, event: schedule, schedule: rate(1 hour)}
          - {function: hello, event: queue, queue: jobs, retries: 1}
        """, {"hello.py": HELLO_PY}))
    h = app.functions["hello"]
    assert [r.key for r in h.routes] == ["GET /hello"]
    assert h.schedules[0].expression == "rate(1 hour)" and h.queue == "jobs" and h.retries == 1


@pytest.mark.parametrize("body, line, field, phrase", [
    ("f:\n  handler: api.plain\n  schedule: cron(0 12 * * * *)\n", 4, "functions.f.schedule",
     "'?'"),
    ("f:\n  handler: api.plain\n  schedule: every day\n", 4, "functions.f.schedule",
     "rate("),
    ("f:\n  handler: api.plain\n  schedule: {expression: rate(1 hour), timezone: Mars/Base}\n",
     4, "functions.f.schedule.timezone", "unknown time zone 'Mars/Base'"),
    ("f:\n  handler: api.plain\n  retries: -1\n", 4, "functions.f.retries", "0 to 20"),
    ("f:\n  handler: api.plain\n  retry_delay_s: 1000\n", 4, "functions.f.retry_delay_s",
     "at most 900"),
    ("f:\n  handler: api.plain\n  schedule: cron(0 0 1 1 ? 2020)\n", 4, "functions.f.schedule",
     "no tick from now on"),
    ("f:\n  handler: api.plain\n  schedule: {expression: rate(1 hour), input: {1: a}}\n", 4,
     "functions.f.schedule.input", "string keys"),
    ("f:\n  handler: api.plain\n  schedule: {expression: rate(1 hour), input: {a: !!set {x}}}\n",
     4, "functions.f.schedule.input", "JSON values"),
    ("f:\n  handler: api.plain\n  queue: {name: 'a b'}\n", 4, "functions.f.queue.name",
     "queue or topic name"),
    ("f:\n  handler: api.plain\n  destinations: {on_success: {function: ghost}}\n", 4,
     "functions.f.destinations.on_success.function", "'ghost' is not a function of this app"),
    ("f:\n  handler: api.plain\n  destinations: {on_failure: {queue: q9}}\n", 4,
     "functions.f.destinations.on_failure.queue", "not consumed by any function"),
    ("f:\n  handler: api.plain\n  queue: q\ng:\n  handler: api.plain\n  queue: q\n", 7,
     "functions.g.queue", "already consumed by function 'f'"),
])
def test_event_key_errors_name_file_line_and_field(tmp_path, body, line, field, phrase):
    err = load_error(rich(tmp_path, body))
    assert (err.line, err.field) == (line, field), str(err)
    assert phrase in err.message, err.message
