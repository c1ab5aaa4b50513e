"""Command lines: their names in --help, an unknown flag named as such, required options shown as required, and
errors that say what to do. The parsers run in-process."""

import pytest

from tools import rehearse
from train import __main__ as train_main
from train import export
from unialign_core import convert
from unialign_core.cli import ArgumentParser


def run(main, argv, capsys):
    """(exit status, stdout, stderr) of main(argv), whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_help_names_the_module(capsys):
    code, out, _ = run(convert.main, ["--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m unialign_core.convert ")
    assert "convert.py" not in out and "model_index.json" in out


@pytest.mark.parametrize(
    "main, argv, prog",
    [
        (convert.main, ["--bogus"], "python -m unialign_core.convert"),
        (convert.main, ["in", "--bogus"], "python -m unialign_core.convert"),
        (train_main.main, ["export", "RUN", "--bogus"], "python -m train export"),
        (export.main, ["--bogus"], "python -m train export"),
        (train_main.main, ["--bogus"], "python -m train"),
        (rehearse.main, ["--bogus"], "python -m tools.rehearse"),
    ],
)
def test_an_unknown_flag_is_named_even_with_required_arguments_missing(main, argv, prog, capsys):
    code, _, err = run(main, argv, capsys)
    assert code == 2
    assert f"{prog}: error: unrecognized arguments: --bogus" in err, err


def test_missing_arguments_alone_are_still_reported_as_missing(capsys):
    code, _, err = run(convert.main, ["in"], capsys)
    assert code == 2 and "the following arguments are required: output" in err and "unrecognized" not in err
    code, _, err = run(export.main, ["RUN"], capsys)
    assert code == 2 and "one of the arguments --out --lora is required" in err and "unrecognized" not in err


def test_the_first_pass_leaves_the_parser_as_it_was(capsys):
    parser = ArgumentParser(prog="p")
    parser.add_argument("source")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--a")
    group.add_argument("--b")
    assert parser.unknown_options(["--c", "x", "--a", "1", "-"]) == ["--c"]
    assert parser._actions[1].required and group.required
    assert vars(parser.parse_args(["x", "--b", "2"])) == {"source": "x", "a": None, "b": "2"}
    code, _, err = run(parser.parse_args, ["--c"], capsys)
    assert code == 2 and "unrecognized arguments: --c" in err


def test_rehearse_help_shows_its_description_once_and_out_as_required(capsys):
    code, out, _ = run(rehearse.main, ["--help"], capsys)
    assert code == 0
    assert out.count("Full-size rehearsal: random weights at the released sizes") == 1
    usage = out.split("\n\n")[0]
    assert "--out OUT" in usage and "[--out" not in usage
    assert "--child" not in out  # the steps' own processes use a hidden command line
    code, _, err = run(rehearse.main, [], capsys)
    assert code == 2 and "required: --out" in err


def test_rehearse_reuse_of_an_empty_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rehearse, "write_files", lambda *a, **k: pytest.fail("it started writing files"))
    for folder in (tmp_path / "empty", tmp_path / "half"):
        (folder / "files").mkdir(parents=True) if folder.name == "half" else folder.mkdir()
        code, _, err = run(rehearse.main, ["--reuse", "--out", str(folder)], capsys)
        assert code == 2, err
        assert "--reuse: nothing to reuse" in err and str(folder / "files" / "paths.json") in err
        assert "--keep" in err and "leave out --reuse" in err
        assert sorted(p.name for p in folder.iterdir()) == (["files"] if folder.name == "half" else [])


def test_rehearse_child_command_line_is_parsed_apart(monkeypatch):
    seen = []
    monkeypatch.setattr(rehearse, "child_main", lambda *a: seen.append(a) or 0)
    step = sorted(rehearse.CHILD_STEPS)[0]
    assert rehearse.main(["--child", step, "--root", "R", "--device", "cpu", "--result", "X"]) == 0
    assert seen == [(step, "R", "cpu", "X")]


def test_convert_of_a_missing_folder_says_what_a_model_folder_holds(tmp_path, capsys):
    code, _, err = run(convert.main, [str(tmp_path / "nonexistent"), str(tmp_path / "out.safetensors")], capsys)
    assert code == 2 and "model not found" in err
    for part in ("model_index.json", "transformer/", "tokenizer/", "scheduler/", ".safetensors"):
        assert part in err, part
