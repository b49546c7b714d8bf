"""containerd filter syntax: the cases of containerd's filters/filter_test.go and scanner_test.go
that apply to string fields and labels, plus our error contract (InvalidArgument)."""

from __future__ import annotations

import pytest

from kernel.errors import InvalidArgument
from snapshotter.filters import compile_filters, field_value, parse

CORPUS = [
    {"name": "foo", "labels": {"foo": "true"}, "other": "x"},
    {"name": "bar", "labels": {"bar": "true", "more complex label": "true"}},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "labels": {}, "other": "x"},
    {"name": "bazo", "labels": {"ns.containerd.io/gc.root": "yes", "a.b": "dotted"}},
]


def matching(*filters: str) -> list[int]:
    match = compile_filters(list(filters))
    return [i for i, obj in enumerate(CORPUS) if match(obj)]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param([], list(range(len(CORPUS))), id="empty-list-matches-all"),
        pytest.param([""], list(range(len(CORPUS))), id="empty-string-matches-all"),
        pytest.param(["name==foo"], [0, 2], id="equal"),
        pytest.param(["name!=foo"], [1, 3, 4, 5, 6, 7], id="not-equal"),
        pytest.param(["name~=foo"], [0, 2, 4, 5], id="regex-unanchored"),
        pytest.param(["name~=^foo$"], [0, 2], id="regex-anchored"),
        pytest.param(["name~=/^foo$/"], [0, 2], id="regex-slash-quoted"),
        pytest.param(["name~=|^ba[rz]o?$|"], [1, 3, 6, 7], id="regex-pipe-quoted"),
        pytest.param(["labels.foo"], [0, 2], id="label-present"),
        pytest.param(["labels.foo==true"], [0], id="label-equal"),
        pytest.param(["labels.foo!=true"], [1, 2, 3, 4, 5, 6, 7], id="label-not-equal-absent-counts"),
        pytest.param(['labels."more complex label"'], [1, 2], id="quoted-label"),
        pytest.param(['labels."more complex label"==present'], [2], id="quoted-label-equal"),
        pytest.param(['labels."more complex label with \\\\ and \\""'], [4], id="quoted-escapes"),
        pytest.param(['labels."more complex label with \\\\ and \\"".post'], [5], id="quoted-then-dotted"),
        pytest.param(['labels."ns.containerd.io/gc.root"==yes'], [7], id="gc-root-style-label"),
        pytest.param(["labels.a.b==dotted"], [7], id="dotted-path-joins"),
        pytest.param(['labels."a.b"'], [7], id="quoted-dotted-same-key"),
        pytest.param(["name==foo,labels.foo==present"], [2], id="and"),
        pytest.param(["name==foo", "name==bar"], [0, 1, 2, 3], id="or"),
        pytest.param(["name==foo,labels.foo==true", "name==bar"], [0, 1, 3], id="and-or"),
        pytest.param(["other"], [0, 6], id="plain-field-present"),
        pytest.param(["missing"], [], id="unknown-field-absent"),
        pytest.param(["labels"], [], id="map-itself-is-not-a-value"),
        pytest.param(["name==foo, labels.foo"], [0, 2], id="space-after-comma"),
        pytest.param(['name=="f\\x6fo"'], [0, 2], id="hex-escape"),
        pytest.param(["name==/fo\\/o/"], [], id="escaped-slash-in-slash-quotes"),
        pytest.param(["name==foo==bar"], [], id="value-may-contain-operators"),
    ],
)
def test_matching(filters: list[str], expected: list[int]) -> None:
    assert matching(*filters) == expected


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name=foo", "unsupported operator"),
        ("name===foo", "unsupported operator"),
        ("name==", "expected value or quoted"),
        ("name==foo ,x", "unexpected input"),
        ("name==foo,", "expected field or quoted"),
        (" ", "expected field or quoted"),
        (".name", "expected field or quoted"),
        ("labels..foo", "expected field or quoted"),
        ('labels."unterminated', "expected field or quoted"),
        ('name=="bad \\q escape"', "expected value or quoted"),
        ('name=="\\/ is not an escape in double quotes"', "expected value or quoted"),
        ('name==/\\" is not an escape in slashes/', "expected value or quoted"),
        ("labels.ns.io/gc==x", "expected an operator"),
        ("name~=/(/", "compile regexp"),
        ("name\x00==x", "expected an operator"),
        ("name==a\nb", "unexpected input"),
    ],
)
def test_invalid_syntax_is_invalid_argument(text: str, where: str) -> None:
    with pytest.raises(InvalidArgument, match=where):
        compile_filters(["name==ok", text])


def test_error_marks_the_position() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse("name=foo")
    assert "[name >|=|< foo]" in str(caught.value)


def test_regex_is_compiled_once_at_parse_time() -> None:
    match = parse("name~=^f(o+)$")
    assert match({"name": "fooo"}) and not match({"name": "xfoo"})


@pytest.mark.parametrize(
    ("obj", "path", "expected"),
    [
        ({"parent": ""}, ["parent"], ("", True)),
        ({"parent": None}, ["parent"], ("", False)),
        ({"size": 12}, ["size"], ("12", True)),
        ({"name": "x"}, ["name", "sub"], ("", False)),
        ({"labels": {"a.b": "1"}}, ["labels", "a", "b"], ("1", True)),
        ({"labels": {}}, ["labels", "a"], ("", False)),
        ({}, [], ("", False)),
    ],
)
def test_field_value(obj: dict, path: list[str], expected: tuple[str, bool]) -> None:
    assert field_value(obj, path) == expected


def test_empty_parent_is_present_but_not_equal_to_a_name() -> None:
    """containerd's snapshot adaptor reports `parent` present even when it is ""."""
    obj = {"name": "base", "parent": ""}
    assert parse("parent")(obj)
    assert parse('parent==""')(obj)
    assert not parse("parent==base")(obj)
