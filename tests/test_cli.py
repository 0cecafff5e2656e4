from pipeline import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["scroe"]) == 2
    assert "unknown command 'scroe'" in capsys.readouterr().err


def test_user_errors_print_a_message_not_a_traceback(tmp_path, capsys):
    assert cli.main(["ingest", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mosaiq ingest: input" in err and "nope" in err and "Traceback" not in err
