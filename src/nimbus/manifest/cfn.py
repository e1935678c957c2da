"""CloudFormation templates: YAML with intrinsic functions, resolved to values.

Reading keeps the line of every key and value (:mod:`.source`, with the
same bounded loader as app.yaml) and turns the short tags (``!Ref X``,
``!Sub ...``, ``!GetAtt A.B``, ``!If [...]``...) into the long forms
(``{"Ref": "X"}``, ``{"Fn::Sub": ...}``) that CloudFormation documents, so
one resolver handles both spellings.

Resolving evaluates them against the template's ``Parameters`` (defaults,
``AllowedValues``, overrides), ``Conditions``, ``Mappings`` and the pseudo
parameters. A reference to a resource resolves to a stand-in for what
CloudFormation would give: a name for ``Ref``, an ARN-like string for
``!GetAtt X.Arn`` (:func:`Resolver.owner` maps it back to the resource), so
a template that reads an attribute nimbus has no real value for still
loads. ``!ImportValue`` (another stack's output) has no stand-in: it is an
error naming its line. Everything here is pure.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nimbus.errors import ManifestError
from nimbus.manifest.errmap import format_loc, show
from nimbus.manifest.safeyaml import ManifestLoader
from nimbus.manifest.source import Loc, Source, read_source

# Short tag -> long key. ``!Ref`` and ``!Condition`` keep their own names.
TAGS = {
    "Ref": "Ref", "Condition": "Condition", "Sub": "Fn::Sub", "GetAtt": "Fn::GetAtt",
    "If": "Fn::If", "Join": "Fn::Join", "Select": "Fn::Select", "Split": "Fn::Split",
    "FindInMap": "Fn::FindInMap", "Equals": "Fn::Equals", "And": "Fn::And", "Or": "Fn::Or",
    "Not": "Fn::Not", "Base64": "Fn::Base64", "GetAZs": "Fn::GetAZs",
    "ImportValue": "Fn::ImportValue", "Cidr": "Fn::Cidr", "Length": "Fn::Length",
    "ToJsonString": "Fn::ToJsonString", "Transform": "Fn::Transform",
}
INTRINSICS = frozenset(TAGS.values())
PSEUDO = ("AWS::StackName", "AWS::StackId", "AWS::Region", "AWS::AccountId",
          "AWS::Partition", "AWS::URLSuffix", "AWS::NoValue", "AWS::NotificationARNs")
_PARAM_TYPES = ("String", "Number", "CommaDelimitedList", "List<Number>")
_SUB_VAR = re.compile(r"\$\{([^}]*)\}")
# Resources SAM makes for events without an API of their own.
IMPLICIT = frozenset({"ServerlessRestApi", "ServerlessHttpApi"})


class _Drop:
    """``AWS::NoValue``: the key or item holding it is left out."""

    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE: Any = _Drop()


class TemplateLoader(ManifestLoader):
    """The bounded manifest loader, plus CloudFormation's short tags."""


def _construct_tag(long: str) -> Callable[[TemplateLoader, Node], Any]:
    def construct(loader: TemplateLoader, node: Node) -> Any:
        value: Any
        if isinstance(node, ScalarNode):
            value = loader.construct_scalar(node)
            if long == "Fn::GetAtt":  # "A.B.C" is ["A", "B.C"]
                head, _, rest = str(value).partition(".")
                value = [head, rest] if rest else [head]
        elif isinstance(node, SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, MappingNode)
            value = loader.construct_mapping(node, deep=True)
        return {long: value}
    return construct


# YAML 1.1 reads On/Off/Yes/No as booleans, so an event named Off would be
# False; CloudFormation reads only true/false as booleans.
TemplateLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in ManifestLoader.yaml_implicit_resolvers.items()}
TemplateLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                     re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))

for _short, _long in TAGS.items():
    TemplateLoader.add_constructor(f"!{_short}", _construct_tag(_long))


def read_template(file: Path) -> Source:
    """``file`` read with lines kept and short tags turned into long forms."""
    src = read_source(file, TemplateLoader)
    if not isinstance(src.data, dict):
        raise ManifestError("expected a CloudFormation template (a mapping with "
                            "'Resources'), got " + ("nothing" if src.data is None
                                                    else show(src.data)),
                            file=file, line=src.root_line)
    return src


@dataclass
class ResourceNames:
    """How a resource's ``Ref`` and ``!GetAtt X.Arn`` read, given its name."""

    ref: str
    arn: str


@dataclass
class Resolver:
    """Evaluates intrinsic functions of ``src`` (a template read by
    :func:`read_template`). ``overrides``: parameter values given at deploy;
    ``names``: a resource's physical name from its logical id (None: the
    logical id), consulted lazily so a name may itself use intrinsics."""

    src: Source
    stack_name: str
    region: str
    account: str
    overrides: dict[str, str] = field(default_factory=dict)
    names: Callable[[str], str | None] = lambda _logical: None
    _params: dict[str, Any] | None = None
    _conditions: dict[str, bool] = field(default_factory=dict)
    _evaluating: set[str] = field(default_factory=set)
    _owners: dict[str, str] = field(default_factory=dict)

    # -- errors and sections ------------------------------------------------

    def error(self, loc: Loc, message: str, *, key: bool = True) -> ManifestError:
        return ManifestError(message, file=self.src.file, line=self.src.line(loc, key=key),
                             field=format_loc(loc))

    def section(self, name: str) -> dict[str, Any]:
        value = self.src.data.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error((name,), f"expected a mapping, got {show(value)}")
        return value

    @property
    def resources(self) -> dict[str, Any]:
        return self.section("Resources")

    def resource_type(self, logical: str) -> str | None:
        res = self.resources.get(logical)
        return res.get("Type") if isinstance(res, dict) else None

    def owner(self, value: Any) -> str | None:
        """The logical id whose ``Ref`` or ``!GetAtt`` gave ``value``, if any."""
        return self._owners.get(value) if isinstance(value, str) else None

    # -- parameters -----------------------------------------------------------

    @property
    def parameters(self) -> dict[str, Any]:
        if self._params is None:
            self._params = self._read_parameters()
        return self._params

    def _read_parameters(self) -> dict[str, Any]:
        declared = self.section("Parameters")
        for name in self.overrides:
            if name not in declared:
                known = ", ".join(map(str, declared)) or "none"
                raise ManifestError(f"--parameter-overrides names {name!r}, which is not a "
                                    f"parameter of this template (parameters: {known})",
                                    file=self.src.file, line=self.src.line(("Parameters",),
                                                                           key=True))
        out: dict[str, Any] = {}
        for name, spec in declared.items():
            loc: Loc = ("Parameters", name)
            if not isinstance(spec, dict):
                raise self.error(loc, f"expected a mapping with a Type, got {show(spec)}")
            ptype = spec.get("Type", "String")
            if not isinstance(ptype, str):
                raise self.error(loc + ("Type",), f"expected a parameter type, got {show(ptype)}")
            if name in self.overrides:
                raw: Any = self.overrides[name]
                where = "its override"
            elif "Default" in spec:
                raw, where = spec["Default"], "its Default"
            else:
                raise self.error(loc, f"parameter {name} has no Default; give it with "
                                 f"--parameter-overrides {name}=VALUE")
            text = _param_text(raw)
            if text is None:
                raise self.error(loc + ("Default",), f"expected a scalar value, got {show(raw)}")
            allowed = spec.get("AllowedValues")
            if isinstance(allowed, list) and text not in [_param_text(a) for a in allowed]:
                raise self.error(loc + ("AllowedValues",), f"parameter {name}: {where} "
                                 f"{text!r} is not one of the AllowedValues "
                                 f"({', '.join(str(_param_text(a)) for a in allowed)})")
            pattern = spec.get("AllowedPattern")
            if isinstance(pattern, str):
                try:
                    ok = re.fullmatch(pattern, text) is not None
                except re.error:
                    ok = True  # a Java-only pattern: CloudFormation's to check
                if not ok:
                    raise self.error(loc + ("AllowedPattern",), f"parameter {name}: {where} "
                                     f"{text!r} does not match AllowedPattern {pattern!r}")
            out[name] = self._typed(name, ptype, text, loc, spec)
        return out

    def _typed(self, name: str, ptype: str, text: str, loc: Loc,
               spec: dict[str, Any] | None = None) -> Any:
        if ptype == "Number":
            number = _number(text)
            if number is None:
                raise self.error(loc, f"parameter {name} is a Number, got {text!r}")
            for key, low in (("MinValue", True), ("MaxValue", False)):
                bound = _number(_text((spec or {}).get(key))) \
                    if (spec or {}).get(key) is not None else None
                if bound is not None and (number < bound if low else number > bound):
                    raise self.error(loc + (key,), f"parameter {name}: {text!r} is "
                                     f"{'below' if low else 'above'} its {key} {bound}")
            return number
        if ptype == "CommaDelimitedList":
            return [p.strip() for p in text.split(",")] if text else []
        if ptype == "List<Number>":
            items = [_number(p.strip()) for p in text.split(",")] if text else []
            if any(i is None for i in items):
                raise self.error(loc, f"parameter {name} is a List<Number>, got {text!r}")
            return items
        if ptype == "String" or ptype.startswith(("AWS::", "List<")):
            return text  # AWS-specific types: CloudFormation checks them, we keep the text
        raise self.error(loc + ("Type",), f"unknown parameter type {ptype!r}; expected one of "
                         f"{', '.join(_PARAM_TYPES)} or an AWS-specific type")

    # -- conditions -----------------------------------------------------------

    def condition(self, name: Any, loc: Loc) -> bool:
        conditions = self.section("Conditions")
        if not isinstance(name, str) or name not in conditions:
            known = ", ".join(map(str, conditions)) or "none"
            raise self.error(loc, f"unknown condition {show(name)} (conditions: {known})")
        if name in self._conditions:
            return self._conditions[name]
        if name in self._evaluating:
            raise self.error(("Conditions", name), f"condition {name} depends on itself")
        self._evaluating.add(name)
        try:
            value = self.resolve(conditions[name], ("Conditions", name))
        finally:
            self._evaluating.discard(name)
        if not isinstance(value, bool):
            raise self.error(("Conditions", name), f"condition {name} must be a condition "
                             f"function (Fn::Equals, Fn::And, ...), got {show(value)}")
        self._conditions[name] = value
        return value

    # -- resolving --------------------------------------------------------------

    def resolve(self, value: Any, loc: Loc) -> Any:
        """``value`` (found at ``loc``) with every intrinsic function evaluated and
        ``AWS::NoValue`` dropped; the result of a top-level NoValue is :data:`NO_VALUE`."""
        if isinstance(value, dict):
            if len(value) == 1:
                (key, arg), = value.items()
                if key in INTRINSICS:
                    return self._intrinsic(key, arg, loc + (key,) if loc else loc)
            out: dict[Any, Any] = {}
            for k, v in value.items():
                r = self.resolve(v, loc + (k,))
                if r is not NO_VALUE:
                    out[k] = r
            return out
        if isinstance(value, list):
            items = [self.resolve(v, loc + (i,)) for i, v in enumerate(value)]
            return [i for i in items if i is not NO_VALUE]
        return value

    def _intrinsic(self, fn: str, arg: Any, loc: Loc) -> Any:
        handler = getattr(self, "_fn_" + fn.replace("Fn::", "").lower(), None)
        if handler is None:
            raise self.error(loc, f"{fn} is not supported by nimbus")
        return handler(arg, loc)

    def _fn_ref(self, arg: Any, loc: Loc) -> Any:
        name = self.resolve(arg, loc)
        if not isinstance(name, str):
            raise self.error(loc, f"Ref takes a name, got {show(name)}")
        if name.startswith("AWS::"):
            return self.pseudo(name, loc)
        if name in self.parameters:
            return self.parameters[name]
        if name in self.resources:
            return self.names_of(name).ref
        if name in IMPLICIT:
            return name
        raise self.error(loc, f"Ref {name}: no parameter or resource of that name")

    def pseudo(self, name: str, loc: Loc) -> Any:
        values: dict[str, Any] = {
            "AWS::StackName": self.stack_name,
            "AWS::StackId": f"arn:aws:cloudformation:{self.region}:{self.account}:"
                            f"stack/{self.stack_name}/nimbus",
            "AWS::Region": self.region, "AWS::AccountId": self.account,
            "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com",
            "AWS::NoValue": NO_VALUE, "AWS::NotificationARNs": [],
        }
        if name not in values:
            raise self.error(loc, f"unknown pseudo parameter {name!r} (known: "
                             f"{', '.join(PSEUDO)})")
        return values[name]

    def names_of(self, logical: str) -> ResourceNames:
        """``Ref`` and ARN stand-ins of resource ``logical``."""
        if logical in self._evaluating:
            raise self.error(("Resources", logical), f"resource {logical}'s name refers to "
                             "itself")
        self._evaluating.add(logical)
        try:
            name = self.names(logical) or logical
        finally:
            self._evaluating.discard(logical)
        rtype = self.resource_type(logical) or ""
        parts = rtype.split("::")
        service = parts[1].lower() if len(parts) > 1 else "unknown"
        if service == "serverless":
            service = {"Function": "lambda", "Api": "apigateway", "HttpApi": "apigateway",
                       "LayerVersion": "lambda", "SimpleTable": "dynamodb",
                       "StateMachine": "states"}.get(parts[-1], "serverless")
        where = f"{self.region}:{self.account}"
        if rtype == "AWS::SQS::Queue":
            names = ResourceNames(f"https://sqs.{self.region}.amazonaws.com/{self.account}/{name}",
                                  f"arn:aws:sqs:{where}:{name}")
        elif rtype == "AWS::SNS::Topic":
            arn = f"arn:aws:sns:{where}:{name}"
            names = ResourceNames(arn, arn)
        elif service == "lambda" and parts[-1] == "Function":
            names = ResourceNames(name, f"arn:aws:lambda:{where}:function:{name}")
        elif service == "lambda":
            arn = f"arn:aws:lambda:{where}:layer:{name}:1"
            names = ResourceNames(arn, arn)
        elif service in ("dynamodb", "kinesis"):
            resource = "table" if service == "dynamodb" else "stream"
            names = ResourceNames(name, f"arn:aws:{service}:{where}:{resource}/{name}")
        elif service == "s3":
            names = ResourceNames(name, f"arn:aws:s3:::{name}")
        else:
            names = ResourceNames(name, f"arn:aws:{service}:{where}:{name}")
        self._owners.setdefault(names.ref, logical)
        self._owners.setdefault(names.arn, logical)
        return names

    def _fn_getatt(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(a, str) for a in arg)):
            raise self.error(loc, "Fn::GetAtt takes [LogicalId, Attribute] or "
                             f"'LogicalId.Attribute', got {show(arg)}")
        logical, attr = arg
        if logical in IMPLICIT and logical not in self.resources:
            return f"{logical}.{attr}"
        if logical not in self.resources:
            raise self.error(loc, f"GetAtt {logical}.{attr}: no resource {logical!r} in "
                             "this template")
        names = self.names_of(logical)
        if attr == "Arn":
            return names.arn
        if attr in ("QueueName", "TopicName", "Name"):
            value = names.ref.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        elif attr == "QueueUrl":
            value = names.ref
        else:  # no real value: a recognisable stand-in
            value = f"{names.arn}/{attr}"
        self._owners.setdefault(value, logical)
        return value

    def _fn_sub(self, arg: Any, loc: Loc) -> Any:
        variables: dict[str, Any] = {}
        if isinstance(arg, list):
            if len(arg) != 2 or not isinstance(arg[1], dict):
                raise self.error(loc, "Fn::Sub takes a string or [string, {variables}]")
            text = self.resolve(arg[0], loc + (0,))
            variables = self.resolve(arg[1], loc + (1,))
            if not isinstance(variables, dict):
                raise self.error(loc, "Fn::Sub takes a string or [string, {variables}]")
        else:
            text = self.resolve(arg, loc)
        if not isinstance(text, str):
            raise self.error(loc, f"Fn::Sub takes a string, got {show(text)}")

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            name = name.strip()
            if name in variables:
                value = variables[name]
            elif "." in name and not name.startswith("AWS::"):
                value = self._fn_getatt(name.split(".", 1), loc)
            else:
                value = self._fn_ref(name, loc)
            if isinstance(value, list):
                raise self.error(loc, f"Fn::Sub: ${{{name}}} is a list, not a string")
            return _text(value)
        return _SUB_VAR.sub(one, text)

    def _fn_if(self, arg: Any, loc: Loc) -> Any:
        if not isinstance(arg, list) or len(arg) != 3:
            raise self.error(loc, "Fn::If takes [condition, value if true, value if false]")
        chosen = 1 if self.condition(arg[0], loc) else 2
        return self.resolve(arg[chosen], loc + (chosen,))

    def _fn_join(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if (not isinstance(arg, list) or len(arg) != 2 or not isinstance(arg[0], str)
                or not isinstance(arg[1], list)):
            raise self.error(loc, "Fn::Join takes [delimiter, [values]]")
        bad = next((v for v in arg[1] if isinstance(v, (list, dict))), None)
        if bad is not None:
            raise self.error(loc, f"Fn::Join joins strings, and one of its values is "
                             f"{show(bad)}")
        return arg[0].join(_text(v) for v in arg[1])

    def _fn_select(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if not isinstance(arg, list) or len(arg) != 2 or not isinstance(arg[1], list):
            raise self.error(loc, "Fn::Select takes [index, [values]]")
        index = _number(_text(arg[0]))
        if not isinstance(index, int) or not 0 <= index < len(arg[1]):
            raise self.error(loc, f"Fn::Select: index {show(arg[0])} is not within the "
                             f"{len(arg[1])} values")
        return arg[1][index]

    def _fn_split(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if (not isinstance(arg, list) or len(arg) != 2 or not isinstance(arg[0], str)
                or not isinstance(arg[1], str) or not arg[0]):
            raise self.error(loc, "Fn::Split takes [delimiter, string]")
        return arg[1].split(arg[0])

    def _fn_findinmap(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if not isinstance(arg, list) or len(arg) not in (3, 4):
            raise self.error(loc, "Fn::FindInMap takes [MapName, TopLevelKey, SecondLevelKey]")
        mapping, top, second = (_text(a) for a in arg[:3])
        maps = self.section("Mappings")
        try:
            return maps[mapping][top][second]
        except (KeyError, TypeError):
            if len(arg) == 4 and isinstance(arg[3], dict) and "DefaultValue" in arg[3]:
                return arg[3]["DefaultValue"]
            raise self.error(loc, f"Fn::FindInMap: Mappings has no {mapping}.{top}.{second}") \
                from None

    def _fn_equals(self, arg: Any, loc: Loc) -> Any:
        arg = self.resolve(arg, loc)
        if not isinstance(arg, list) or len(arg) != 2:
            raise self.error(loc, "Fn::Equals takes [value, value]")
        return _text(arg[0]) == _text(arg[1]) if not isinstance(arg[0], list) else \
            arg[0] == arg[1]

    def _conditions_of(self, fn: str, arg: Any, loc: Loc) -> list[bool]:
        if not isinstance(arg, list) or not arg:
            raise self.error(loc, f"{fn} takes a list of conditions")
        out = []
        for i, item in enumerate(arg):
            value = self.resolve(item, loc + (i,))
            if not isinstance(value, bool):
                raise self.error(loc, f"{fn}: item {i} is not a condition: {show(value)}")
            out.append(value)
        return out

    def _fn_and(self, arg: Any, loc: Loc) -> Any:
        return all(self._conditions_of("Fn::And", arg, loc))

    def _fn_or(self, arg: Any, loc: Loc) -> Any:
        return any(self._conditions_of("Fn::Or", arg, loc))

    def _fn_not(self, arg: Any, loc: Loc) -> Any:
        values = self._conditions_of("Fn::Not", arg, loc)
        if len(values) != 1:
            raise self.error(loc, "Fn::Not takes a list of one condition")
        return not values[0]

    def _fn_condition(self, arg: Any, loc: Loc) -> Any:
        return self.condition(arg, loc)

    def _fn_base64(self, arg: Any, loc: Loc) -> Any:
        text = self.resolve(arg, loc)
        if not isinstance(text, str):
            raise self.error(loc, f"Fn::Base64 takes a string, got {show(text)}")
        return base64.b64encode(text.encode()).decode()

    def _fn_getazs(self, arg: Any, loc: Loc) -> Any:
        return [f"{self.region}{z}" for z in "abc"]

    def _fn_importvalue(self, arg: Any, loc: Loc) -> Any:
        raise self.error(loc, "Fn::ImportValue reads another stack's output, which nimbus does "
                         "not have; use a Parameter (with --parameter-overrides) instead")

    def _fn_transform(self, arg: Any, loc: Loc) -> Any:
        raise self.error(loc, "Fn::Transform (macros) is not supported by nimbus")


def _param_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, int | float | str) for v in value):
        return ",".join(map(str, value))
    return None


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


__all__ = ["NO_VALUE", "Resolver", "TemplateLoader", "read_template"]
