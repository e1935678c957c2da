"""CloudFormation templates: short and long intrinsic functions, parameters,
conditions and mappings resolved, errors at the template's lines."""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.cfn import Resolver, read_template


def resolver(tmp_path: Path, text: str, **overrides: str) -> Resolver:
    file = tmp_path / "template.yaml"
    file.write_text(textwrap.dedent(text))
    return Resolver(read_template(file), "shop", "eu-test-1", "123456789012", overrides)


def value(tmp_path: Path, body: str, head: str = "", **overrides: str) -> Any:
    """The resolved value of ``V:`` in ``body`` (one YAML line or block)."""
    r = resolver(tmp_path, head + "Resources:\n  Q: {Type: AWS::SQS::Queue}\n"
                 "  T: {Type: AWS::SNS::Topic, Properties: {TopicName: news}}\n"
                 "  D: {Type: AWS::DynamoDB::Table}\nOut:\n  V: " + body + "\n", **overrides)
    return r.resolve(r.src.data["Out"], ("Out",))["V"]


def error(tmp_path: Path, body: str, head: str = "", **overrides: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        value(tmp_path, body, head, **overrides)
    return info.value


PARAMS = """\
Parameters:
  Stage: {Type: String, Default: dev, AllowedValues: [dev, prod]}
  Size: {Type: Number, Default: 3}
  Zones: {Type: CommaDelimitedList, Default: "a,b,c"}
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  NotProd: {"Fn::Not": [{Condition: IsProd}]}
  Both: !And [!Condition IsProd, !Equals [1, 1]]
  Either: !Or [!Condition IsProd, !Equals [x, x]]
Mappings:
  Sizes: {dev: {mem: 128}, prod: {mem: 1024}}
"""


@pytest.mark.parametrize(("body", "expected"), [
    ("!Ref Stage", "dev"),
    ("{Ref: Stage}", "dev"),
    ("!Ref Size", 3),
    ("!Ref Zones", ["a", "b", "c"]),
    ("!Ref AWS::StackName", "shop"),
    ("!Ref AWS::Region", "eu-test-1"),
    ("!Ref AWS::AccountId", "123456789012"),
    ("!Ref AWS::Partition", "aws"),
    ("!Ref AWS::URLSuffix", "amazonaws.com"),
    ("!Ref T", "arn:aws:sns:eu-test-1:123456789012:T"),  # names: sam.py's
    ("!Ref Q", "https://sqs.eu-test-1.amazonaws.com/123456789012/Q"),
    ("!Sub '${Stage}-${AWS::Region}'", "dev-eu-test-1"),
    ("{'Fn::Sub': '${Stage}'}", "dev"),
    ("!Sub ['${A}/${Stage}/${!Literal}', {A: !Ref Size}]", "3/dev/${Literal}"),
    ("!Sub '${Q.Arn}'", "arn:aws:sqs:eu-test-1:123456789012:Q"),
    ("!GetAtt Q.Arn", "arn:aws:sqs:eu-test-1:123456789012:Q"),
    ("!GetAtt [Q, QueueName]", "Q"),
    ("{'Fn::GetAtt': [T, TopicName]}", "T"),
    ("!GetAtt D.Arn", "arn:aws:dynamodb:eu-test-1:123456789012:table/D"),
    ("!GetAtt D.StreamArn", "arn:aws:dynamodb:eu-test-1:123456789012:table/D/StreamArn"),
    ("!If [IsProd, big, small]", "small"),
    ("!If [NotProd, yes, no]", "yes"),
    ("!If [Both, 1, 2]", 2),
    ("!If [Either, 1, 2]", 1),
    ("!Join ['-', [a, !Ref Stage, 3]]", "a-dev-3"),
    ("!Select [1, !Ref Zones]", "b"),
    ("!Select ['0', [x, y]]", "x"),
    ("!Split [',', 'p,q']", ["p", "q"]),
    ("!FindInMap [Sizes, !Ref Stage, mem]", 128),
    ("!Equals [!Ref Size, '3']", True),
    ("!Not [!Equals [a, b]]", True),
    ("!Base64 hi", base64.b64encode(b"hi").decode()),
    ("!GetAZs ''", ["eu-test-1a", "eu-test-1b", "eu-test-1c"]),
    ("[a, !If [IsProd, b, !Ref AWS::NoValue], c]", ["a", "c"]),
    ("{k: !If [IsProd, v, !Ref AWS::NoValue], j: 1}", {"j": 1}),
    ("!Ref ServerlessRestApi", "ServerlessRestApi"),
    ("Off", "Off"),  # YAML 1.1 would read a boolean; CloudFormation a string
])
def test_intrinsics(tmp_path: Path, body: str, expected: Any) -> None:
    assert value(tmp_path, body, PARAMS) == expected


def test_overrides_replace_defaults(tmp_path: Path) -> None:
    assert value(tmp_path, "!If [IsProd, big, small]", PARAMS, Stage="prod") == "big"
    assert value(tmp_path, "!FindInMap [Sizes, !Ref Stage, mem]", PARAMS, Stage="prod") == 1024
    assert value(tmp_path, "!Ref Size", PARAMS, Size="12") == 12


@pytest.mark.parametrize(("body", "overrides", "line", "words"), [
    ("!ImportValue shared-vpc", {}, 17, "reads another stack's output"),
    ("!Ref Nope", {}, 17, "no parameter or resource"),
    ("!GetAtt Nope.Arn", {}, 17, "no resource 'Nope'"),
    ("!Ref AWS::Nope", {}, 17, "unknown pseudo parameter"),
    ("!If [Missing, a, b]", {}, 17, "unknown condition 'Missing'"),
    ("!Select [5, [a]]", {}, 17, "not within the 1 values"),
    ("!FindInMap [Sizes, test, mem]", {}, 17, "no Sizes.test.mem"),
    ("!Ref Stage", {"Stage": "qa"}, 2, "'qa' is not one of the AllowedValues (dev, prod)"),
    ("!Ref Size", {"Size": "big"}, 3, "is a Number"),
    ("!Ref Stage", {"Other": "x"}, 1, "not a parameter of this template"),
])
def test_errors_name_the_line(tmp_path: Path, body: str, overrides: dict[str, str],
                              line: int, words: str) -> None:
    err = error(tmp_path, body, PARAMS, **overrides)
    assert words in err.message, err.message
    assert err.line == line and err.file.endswith("template.yaml")


def test_a_parameter_without_a_default_needs_an_override(tmp_path: Path) -> None:
    head = "Parameters:\n  Bucket: {Type: String}\n"
    err = error(tmp_path, "!Ref Bucket", head)
    assert err.line == 2 and "--parameter-overrides Bucket=VALUE" in err.message
    assert value(tmp_path, "!Ref Bucket", head, Bucket="b1") == "b1"


def test_an_unknown_tag_is_a_yaml_error_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        resolver(tmp_path, "Resources:\n  A:\n    Type: !Nope x\n")
    assert info.value.line == 3 and "!Nope" in info.value.message


def test_a_condition_that_depends_on_itself_is_refused(tmp_path: Path) -> None:
    head = "Conditions:\n  A: !Not [!Condition A]\n"
    err = error(tmp_path, "!If [A, 1, 2]", head)
    assert "depends on itself" in err.message and err.line == 2
