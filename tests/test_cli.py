"""The ``mlpot`` program: subcommands, help text, ``--version`` and the one error policy (one line, exit 2)."""

import argparse
import subprocess
import sys
from pathlib import Path

import ase.build
import pytest
import torch
import yaml

import mlpot
from mlpot import cli, commands, export
from mlpot.threads import torch_threads

from conftest import make_tiny_potential

SUBCOMMANDS = ["train", "eval", "deploy", "md", "relax", "vibrations", "study"]
HIDDEN = {("mlpot md", "--molecule"), ("mlpot study learning-curve", "--device"), ("mlpot study latent", "--device"),
          ("mlpot study irreps", "--device"), ("mlpot study symmetry", "--device"), ("mlpot study lr-search", "--device"),
          ("mlpot study protocol", "--device"), ("mlpot study vibrations", "--device")}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny float64 SchNet for H, C, O; an ethanol and an ammonia structure file."""
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "schnet.pt"
    export.save(make_tiny_potential("schnet", torch.float64), model)
    ethanol, ammonia = folder / "ethanol.xyz", folder / "ammonia.xyz"
    ase.build.molecule("CH3CH2OH").write(ethanol)
    ase.build.molecule("NH3").write(ammonia)
    return {"model": str(model), "ethanol": str(ethanol), "ammonia": str(ammonia), "folder": folder}


def all_parsers(parser=None):
    """Every parser of the program, the top level first."""
    parser = parser or commands.build_parser()
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += all_parsers(sub)
    return found


def one_error_line(capsys, prog):
    """The whole stderr of a failed call: exactly one line ``<prog>: error: ...``; returns its message."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), repr(err)
    assert "Traceback" not in err
    return err[len(f"{prog}: error: "):].strip()


# === help and version ===
def test_help_lists_every_subcommand_with_a_description(capsys):
    assert list(commands.COMMANDS) == SUBCOMMANDS
    with pytest.raises(SystemExit) as exit_:
        commands.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    subcommands = commands.build_parser()._subparsers._group_actions[0]
    described = {action.dest: action.help for action in subcommands._choices_actions}
    assert list(described) == SUBCOMMANDS
    for name, help in described.items():
        assert help and "\n" not in help and f"{name} {help}" in text, f"{name} is not listed with its description"


def test_help_text_has_no_markup_and_every_option_is_explained():
    parsers = all_parsers()
    assert len(parsers) == 1 + len(SUBCOMMANDS) + 8  # the program, its subcommands, eight studies
    for parser in parsers:
        text = parser.format_help()
        for markup in ("`", "**", "%(", ":func:", ":class:"):
            assert markup not in text, f"{parser.prog} --help shows {markup!r}"
        formatter = commands.HelpFormatter(parser.prog)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # its subcommands are described one by one (test above)
            name = action.option_strings[-1] if action.option_strings else action.dest
            if action.help == argparse.SUPPRESS:
                assert (parser.prog, name) in HIDDEN, f"{parser.prog} {name} is hidden"
                continue
            assert action.help, f"{parser.prog} {name} has no help string"
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []):
                assert "default" in shown, f"{parser.prog} {name}: default {action.default!r} not shown"
    md_help = commands.build_parser()._subparsers._group_actions[0].choices["md"].format_help()
    assert "usage: mlpot md MODEL STRUCTURE [options]" in md_help and "--molecule" not in md_help
    assert "--seed SEED seed of the initial velocities and the thermostat noise (default: 0)" in " ".join(md_help.split())


def test_version_names_mlpot_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        commands.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlpot {mlpot.__version__} (torch {torch.__version__})"


# === one error policy ===
def write_config(path, **train):
    path.write_text(yaml.safe_dump({"data": {"dataset": "/nonexistent.npz"}, "train": train}))
    return str(path)


def test_unknown_config_key_is_one_line(tmp_path, capsys):
    assert commands.main(["train", write_config(tmp_path / "c.yaml", lrr=1e-3), "--quiet"]) == 2
    assert one_error_line(capsys, "mlpot train").startswith("unknown key(s) train.lrr; allowed: [")
    assert not (tmp_path / "runs").exists()


def test_bad_set_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert commands.main(["train", config, "--set", "train.lr"]) == 2
    assert one_error_line(capsys, "mlpot train") == "--set expects key=value, got 'train.lr'"
    assert commands.main(["train", config, "--set", "train.epochs=ten"]) == 2
    assert one_error_line(capsys, "mlpot train").startswith("train.epochs: expected int, got str 'ten'")


def test_missing_model_file_is_one_line(files, tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    for argv in (["eval", missing, "rmd17_ethanol"], ["md", missing, files["ethanol"], "--output", str(tmp_path / "md")],
                 ["relax", missing, files["ethanol"], "--output", str(tmp_path / "relax")],
                 ["vibrations", missing, files["ethanol"], "--output", str(tmp_path / "vibrations")]):
        assert commands.main(argv) == 2
        assert one_error_line(capsys, f"mlpot {argv[0]}") == f"no model file at {missing}"
    assert not (tmp_path / "md").exists(), "a failed md left its output folder"


def test_a_molecule_name_for_eval_data_is_one_line(files, capsys):
    # mlpot eval deploy/ethanol.pt ethanol: a molecule, not a dataset name
    assert commands.main(["eval", files["model"], "ethanol"]) == 2
    message = one_error_line(capsys, "mlpot eval")
    assert message.startswith("unknown dataset 'ethanol'; known names: ") and "rmd17_ethanol" in message


def test_usage_errors_are_one_line(files, capsys):
    for argv, prog, message in [
        ([], "mlpot", "the following arguments are required: COMMAND"),
        (["bogus"], "mlpot", "argument COMMAND: invalid choice: 'bogus'"),
        (["md", files["model"]], "mlpot md", "the following arguments are required: STRUCTURE"),
        (["relax", files["model"]], "mlpot relax", "the following arguments are required: STRUCTURE"),
        (["md", files["model"], files["ethanol"], "--temperature", "hot"], "mlpot md", "argument --temperature: invalid float value: 'hot'"),
        (["md", files["model"], files["ethanol"], "--molecule", "ethanol"], "mlpot md", "give the structure once"),
        (["train"], "mlpot train", "give a CONFIG.yaml or --resume RUN_DIR"),
        (["deploy", files["model"]], "mlpot deploy", "the following arguments are required: -o/--output"),
        (["study", "latent"], "mlpot study latent", "the following arguments are required: MODEL"),
    ]:
        assert commands.main(argv) == 2, argv
        got = one_error_line(capsys, prog)
        assert got.startswith(message) and got.endswith(f"(see {prog} --help)"), got


def test_md_with_elements_the_model_does_not_know_is_a_user_error(files, tmp_path, capsys):
    out = tmp_path / "md"
    argv = ["md", files["model"], files["ammonia"], "--time", "2fs", "--quiet", "--no-harmonic", "--output", str(out)]
    assert commands.main(argv) == 2
    message = one_error_line(capsys, "mlpot md")
    assert message == f"{files['ammonia']}: element(s) N not supported by this model; it knows H, C, O"
    assert capsys.readouterr().out == "" and not out.exists(), "a refused structure must not report an MD run"


def test_md_takes_model_and_structure_and_still_reads_molecule(files, tmp_path, capsys):
    before = torch.get_num_threads()
    report = commands.run(["md", files["model"], "--molecule", files["ethanol"], "--time", "2fs", "--quiet",
                           "--no-harmonic", "--output", str(tmp_path / "old"), "--threads", str(before + 1)])
    captured = capsys.readouterr()
    assert captured.err == ("mlpot md: warning: --molecule is deprecated; give the structure after the model: "
                            f"mlpot md MODEL {files['ethanol']}\n")
    assert torch.get_num_threads() == before, "a command left torch's thread count changed"
    new = commands.run(["md", files["model"], files["ethanol"], "--time", "2fs", "--quiet", "--no-harmonic",
                        "--output", str(tmp_path / "new")])
    assert capsys.readouterr().err == ""
    assert (report.molecule, report.steps) == (new.molecule, new.steps) == ("ethanol", 4)


def test_interrupt_exits_130_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def diverged(args):
        raise FloatingPointError("non-finite loss at epoch 1, batch 0")

    def bug(args):
        raise RuntimeError("a bug")

    for runner, status in ((interrupted, 130), (diverged, 1)):
        monkeypatch.setitem(commands.COMMANDS, "eval", (commands._eval_parser, runner))
        assert commands.main(["eval", "m.pt", "d"]) == status
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mlpot eval: "), err
    monkeypatch.setitem(commands.COMMANDS, "eval", (commands._eval_parser, bug))
    with pytest.raises(RuntimeError, match="a bug"):
        commands.main(["eval", "m.pt", "d"])


def test_in_process_calls_raise_instead_of_exiting(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        cli.evaluate([str(tmp_path / "missing.pt"), "rmd17_ethanol"])
    with pytest.raises(commands.UsageError, match="give a CONFIG.yaml"):
        cli.train([])
    with pytest.raises(ValueError, match="not supported by this model"):
        commands.run(["md", files["model"], files["ammonia"], "--output", str(tmp_path / "md")])


def test_aliases_are_the_subcommands(monkeypatch, files, tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    for alias, name in ((commands.mlpot_eval, "eval"), (commands.mlpot_deploy, "deploy"), (commands.mlpot_train, "train")):
        argv = {"eval": [missing, "rmd17_ethanol"], "deploy": [missing, "-o", str(tmp_path / "x.pt")], "train": [missing]}[name]
        monkeypatch.setattr(sys, "argv", [f"mlpot-{name}", *argv])
        assert alias() == 2
        via_alias = capsys.readouterr().err
        assert commands.main([name, *argv]) == 2
        assert capsys.readouterr().err == via_alias and via_alias.startswith(f"mlpot {name}: error: ")
    scripts = (ROOT / "pyproject.toml").read_text()
    for name in ("train", "eval", "deploy"):
        assert f'mlpot-{name} = "mlpot.commands:mlpot_{name}"' in scripts


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with torch_threads(before + 1):
            1 / 0
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_python_m_mlpot_reports_a_user_error_in_one_line(tmp_path):
    """The real program in a fresh process: exit status 2, one line on stderr, nothing on stdout."""
    missing = str(tmp_path / "missing.pt")
    result = subprocess.run([sys.executable, "-m", "mlpot", "eval", missing, "rmd17_ethanol"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"mlpot eval: error: no model file at {missing}\n" and result.stdout == ""
