"""Command-line helpers: one-line argparse errors, value types, and the policy that a user mistake is one line
(exit 2) while any other exception keeps its traceback."""

import argparse

import pytest

from transfusion_mot.common.cli import Parser, fraction, non_negative_int, positive_int, run_command
from transfusion_mot.common.errors import ConfigError, InputNotFound, UserError


def test_types_say_what_they_expected():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and fraction("0.25") == 0.25
    for func, text, match in ((positive_int, "0", "positive integer, got 0"), (positive_int, "x", "got 'x'"),
                              (non_negative_int, "-1", "integer >= 0"), (fraction, "1", r"\[0, 1\)")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            func(text)


def test_parser_errors_are_one_line(capsys):
    parser = Parser(prog="tool")
    parser.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "-2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tool: error:" in err and "(see tool --help)" in err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    for error in (UserError("bad prompt"), ConfigError("unknown key"), InputNotFound("no such run")):
        def fail(error=error):
            raise error

        assert run_command("tmot x", fail) == 2
        assert capsys.readouterr().err == f"tmot x: error: {error}\n"
    assert run_command("tmot x", lambda: 0) == 0

    def bug():
        raise ValueError("an internal bug")

    with pytest.raises(ValueError, match="an internal bug"):  # not turned into a one-line "user error"
        run_command("tmot x", bug)

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("tmot x", interrupted) == 130 and "interrupted" in capsys.readouterr().err
