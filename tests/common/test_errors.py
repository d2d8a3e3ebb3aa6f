"""What a one-line error says of its cause: the exception's type and the first line of its message."""

from transfusion_mot.common.errors import InvalidInput, UserError, describe


def test_describe_keeps_the_type_and_the_first_line_only():
    assert describe(ValueError("bad header\n  at byte 12\nTraceback...")) == "ValueError: bad header"
    assert describe(OSError("")) == "OSError"
    assert describe(RuntimeError("x" * 500), limit=10) == "RuntimeError: " + "x" * 10
    assert describe(KeyError("shards")) == "KeyError: 'shards'"


def test_user_errors_are_the_one_line_kind():
    assert issubclass(InvalidInput, UserError) and issubclass(InvalidInput, ValueError)
