"""CLI smoke: user errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
import torch

from dromo_ray.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("bench", ["learner", "dynamics"])
def test_bench_cuda_without_gpu_is_a_user_error(bench, capsys):
    assert main(["bench", bench, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable CUDA GPU" in err[0]


def test_train_with_bad_config_key_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {dataset: x.hdf5}\nagent: {alhpa: 1}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg) in err[0] and "agent.alhpa" in err[0]


def test_train_with_bad_override_value(tmp_path, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("data: {dataset: x.hdf5}\n")
    assert main(["train", str(cfg), "--set", "agent.f=1.5"]) == 2
    assert "agent.f" in capsys.readouterr().err


def test_evaluate_missing_checkpoint(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint found" in err[0]


def test_every_option_of_every_command_says_what_it_does():
    # `dromo-ray COMMAND --help` is a user's text: no flag or argument without a help line.
    import argparse

    from dromo_ray.cli.parser import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), ["dromo-ray"])
    assert missing == []
