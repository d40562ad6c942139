"""The command line's failures: one `error:` line naming the problem and exit code 1; tracebacks only with --debug."""

import argparse
import re

import pytest
import torch
import transformers
from PIL import Image

from florence_vl_hf import __version__, cli
from florence_vl_hf.cli import DEMO_QUESTION, main


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize(
    "argv, problem",
    [(["--image", "{tmp}/missing.png"], "--image {tmp}/missing.png cannot be read as an image: .*No such file"),
     (["--image", "{tmp}"], "--image {tmp} cannot be read as an image: .*Is a directory"),
     (["--image", "{tmp}/text.png"], "--image {tmp}/text.png cannot be read as an image: cannot identify"),
     (["--image", "{tmp}/cut.png"], "--image {tmp}/cut.png cannot be read as an image"),
     (["--question", "  "], "--question is empty"),
     (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0")],
)  # fmt: skip
def test_demo_tiny_refuses_bad_input_in_one_error_line(capsys, tmp_path, argv, problem):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    code, out, err = run(capsys, ["demo-tiny", *argv])
    assert code == 1 and out == ""
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(problem.format(tmp=tmp_path), err[0]), err[0]


def test_demo_tiny_asks_a_user_s_image_the_default_question_without_grading(capsys, tmp_path):
    path = tmp_path / "mine.png"
    Image.new("RGB", (64, 48), (10, 10, 220)).save(path)
    code, out, err = run(capsys, ["demo-tiny", "--image", str(path), "--max-new-tokens", "3"])
    answers = [line for line in out.splitlines() if "->" in line]
    assert code == 0 and not [line for line in err if line.startswith("error")]
    assert len(answers) == 1 and answers[0].strip().startswith(DEMO_QUESTION)
    assert "expected" not in out and "(right)" not in out


def test_version_names_the_package_transformers_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"florence-vl {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"
    )


def test_a_bug_is_one_line_without_debug_and_a_traceback_with_it(capsys, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_demo_tiny", broken)
    code, _, err = run(capsys, ["demo-tiny"])
    assert code == 1
    assert err == ["error: unexpected ZeroDivisionError: division by zero (a bug; --debug shows the traceback)"]
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "demo-tiny"])


def test_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_demo_tiny", interrupted)
    assert run(capsys, ["demo-tiny"])[::2] == (130, ["interrupted"])


def test_every_subcommand_s_help_renders_its_percent_signs(capsys):
    subcommands = next(action for action in cli.build_parser()._actions if action.dest == "command").choices
    for name, parser in subcommands.items():
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, name
    assert "3% warm-up" in subcommands["train"].format_help()


@pytest.mark.parametrize(
    "argv, message",
    [(["demo", "--output-dir", "{tmp}/full"], "--output-dir {tmp}/full is not empty (use --overwrite to replace it)"),
     (["demo", "--output-dir", "{tmp}/new", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
     (["convert", "{tmp}/none", "{tmp}/out", "--no-verify", "--push-to-hub", "a/b"],
      "--push-to-hub cannot be combined with --no-verify: only verified conversions are pushed"),
     (["serve", "{tmp}", "--max-images", "-1"], "--max-images must be at least 0, got -1"),
     (["serve", "{tmp}", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
     (["bench", "--shapes", "tiny,huge"], "--shapes: unknown shape(s) huge; choose from tiny, base, large"),
     (["bench", "--repeats", "0"], "--repeats must be at least 1, got 0"),
     (["bench", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
     (["alignment", "--model", "{tmp}", "--data", "{tmp}/c.json", "--output", "{tmp}/p.png", "--steps", "0"],
      "--steps must be at least 1, got 0"),
     (["alignment", "--model", "{tmp}", "--data", "{tmp}/c.json", "--output", "{tmp}/p.png", "--batch-size", "1"],
      "--batch-size must be at least 2, got 1"),
     (["alignment", "--model", "{tmp}", "--data", "{tmp}/c.json", "--output", "{tmp}/p.png", "--num-pairs", "1"],
      "--num-pairs must be at least 2, got 1")],
)  # fmt: skip
def test_a_refused_option_value_is_one_error_line_and_exit_1(capsys, tmp_path, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    code, out, err = run(capsys, [arg.format(tmp=tmp_path.resolve()) for arg in argv])
    assert (code, out, err) == (1, "", [f"error: {message.format(tmp=tmp_path.resolve())}"])
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, problem",
    [(["serve", "m", "--max-images", "many"], "argument --max-images: invalid int value: 'many'"),
     (["convert", "src"], "the following arguments are required: output_dir"),
     (["bench", "--no-such-option"], "unrecognized arguments: --no-such-option"),
     (["demo-tiny", "--max-new-tokens"], "argument --max-new-tokens: expected one argument"),
     (["make-fixture", "out", "--llm", "gpt"], "argument --llm: invalid choice: 'gpt'"),
     (["no-such-command"], "invalid choice: 'no-such-command'")],
)  # fmt: skip
def test_argparse_usage_errors_keep_exit_2_with_the_usage(capsys, argv, problem):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: florence-vl") and problem in err, err


def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if not (helps.get(name) or "").strip():
                    missing.append(f"{path} {name}")
                missing += _undocumented(subparser, f"{path} {name}")
        elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_subcommand_and_option_has_help():
    parser = cli.build_parser()
    assert _undocumented(parser, "florence-vl") == []
    subcommands = next(action for action in parser._actions if action.dest == "command").choices
    assert {"demo-tiny", "demo", "convert", "make-fixture", "push", "make-shapes-data", "serve", "train", "train-tiny",
            "bundle-tiny", "ablations", "eval-shapes", "alignment", "bench"} <= set(subcommands)  # fmt: skip
def test_convert_names_a_broken_source_file_in_one_error_line(capsys, tmp_path):
    from florence_vl_hf.lab.fixture import make_fixture

    source = make_fixture(tmp_path / "src", "phi3", seed=3)
    (source / "vision_tower" / "config.json").write_text("[]")
    code, out, err = run(capsys, ["convert", str(source), str(tmp_path / "out"), "--no-verify"])
    assert code == 1
    assert err == [f"error: {source / 'vision_tower' / 'config.json'} holds a JSON list, not an object (nothing was "
                   f"written to {tmp_path / 'out'})"]
    assert not (tmp_path / "out").exists()
