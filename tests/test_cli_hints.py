"""Hints the command line gives for a user's slip, checked without starting any job."""

import pytest

from ant_ray.cli import main as cli_main


def _error_lines(argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as stopped:  # argparse exits 2 before any command runs
        cli_main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_an_unquoted_set_value_gets_a_quoting_hint(capsys):
    # `--set search.merge.fidelities=[250, 500]` unquoted: the shell splits the value at the space
    lines = _error_lines(["search", "search_spaces/quickstart.yaml", "--set", "search.merge.fidelities=[250,",
                          "500]"], capsys)
    assert lines[-2] == "ant-ray: error: unrecognized arguments: 500]"
    assert lines[-1] == ("hint: a --set value with spaces needs quotes in a shell, "
                         "e.g. --set 'search.merge.fidelities=[250, 500]'")
    lines = _error_lines(["validate", "x.yaml", "--set=search.ant.space.ant.k={type:", "int,", "low:", "2}"], capsys)
    assert lines[-1].endswith("e.g. --set 'search.ant.space.ant.k={type: int, low: 2}'")


def test_other_unrecognized_arguments_get_no_hint(capsys):
    lines = _error_lines(["validate", "x.yaml", "--set", "ant.k=3", "--bogus"], capsys)
    assert lines[-1] == "ant-ray: error: unrecognized arguments: --bogus"
    lines = _error_lines(["validate", "x.yaml", "extra"], capsys)
    assert lines[-1] == "ant-ray: error: unrecognized arguments: extra"
