"""Command-line options: range checks, help text, --version (the parser alone, no processes)."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

from edge.client import ClientConfig
from edge.train import TrainOptions
from server.rounds import FederationConfig
from split.cli import build_parser, main
from split.lora import LoraSpec


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(command: str):
    return [a for a in subparsers()[command]._actions if a.option_strings]


# (subcommand, option, a value out of range); each is refused by argparse with the option's name.
BAD = [
    ("server", "--seed", "-1"), ("server", "--threads", "0"), ("server", "--num-labels", "1"),
    ("server", "--session-timeout", "0"), ("server", "--max-message-mb", "-5"), ("server", "--rounds", "0"),
    ("server", "--fraction", "0"), ("server", "--fraction", "1.01"), ("server", "--min-clients", "0"),
    ("server", "--min-uploads", "0"), ("server", "--deadline", "0"), ("server", "--deadline", "inf"),
    ("server", "--local-steps", "0"), ("server", "--local-epochs", "-1"), ("server", "--reinit-every", "-1"),
    ("server", "--pending-timeout", "0"), ("server", "--max-samples", "0"), ("server", "--max-upload-value", "0"),
    ("server", "--max-upload-value", "inf"), ("server", "--clip-norm", "0"), ("server", "--clip-median", "nan"),
    ("server", "--trim", "0"), ("server", "--trim", "0.5"), ("server", "--robust", "mean"),
    ("server", "--save-every", "-1"), ("client", "--reconnect-for", "-1"), ("client", "--reconnect-for", "inf"),
    ("client", "--rank", "0"), ("client", "--alpha", "0"), ("client", "--lora-dropout", "1"),
    ("client", "--lora-dropout", "-0.1"), ("client", "--lr", "0"), ("client", "--lr", "nan"),
    ("client", "--head-lr", "-1"), ("client", "--epochs", "0"), ("client", "--epochs", "-1"),
    ("client", "--epochs", "nan"), ("client", "--steps", "0"), ("client", "--batch-size", "0"),
    ("client", "--max-length", "1"), ("client", "--timeout", "0"), ("client", "--connect-timeout", "-1"),
    ("client", "--num-clients", "0"), ("client", "--client-index", "-1"), ("client", "--partition-alpha", "0"),
    ("client", "--blocks", "-1"), ("client", "--blocks", "1,,2"), ("client", "--threads", "-2"),
    ("demo", "--clients", "0"), ("demo", "--rounds", "0"), ("demo", "--local-steps", "0"),
    ("demo", "--alpha", "0"), ("demo", "--ranks", "4,0"), ("demo", "--epochs", "0"), ("demo", "--steps", "0"),
    ("demo", "--rank", "0"), ("demo", "--lr", "-inf"), ("demo", "--head-lr", "0"),
    ("client", "--rank", "2.5"), ("client", "--epochs", "abc"),
]


@pytest.mark.parametrize("command, option, value", BAD)
def test_out_of_range_values_are_refused_naming_the_option(command, option, value, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, f"{option}={value}"])
    assert info.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_every_numeric_option_is_range_checked():
    # A bare int or float type accepts 0, negatives, NaN and inf; each option names its range.
    for command in subparsers():
        raw = [a.option_strings[0] for a in options(command) if a.type in (int, float)]
        assert not raw, f"{command}: {raw} parse numbers without a range check"


def test_good_values_parse():
    args = build_parser().parse_args(["client", "--epochs", "0.5", "--lora-dropout", "0", "--blocks", "0,3",
                                      "--log-level", "info", "--client-index", "2", "--num-clients", "3"])
    assert (args.epochs, args.lora_dropout, args.blocks, args.log_level) == (0.5, 0.0, [0, 3], "INFO")
    assert build_parser().parse_args(["demo", "--ranks", "4,8"]).ranks == [4, 8]
    assert build_parser().parse_args(["server", "--fraction", "1", "--local-epochs", "0"]).fraction == 1.0


def test_robust_aggregation_options_parse_and_need_a_federation(capsys):
    args = build_parser().parse_args(["server", "--robust", "trimmed-mean", "--trim", "0.2", "--clip-median", "3"])
    assert (args.robust, args.trim, args.clip_median, args.clip_norm) == ("trimmed-mean", 0.2, 3.0, None)
    defaults = build_parser().parse_args(["server"])
    assert (defaults.max_samples, defaults.max_upload_value, defaults.pending_timeout) == (1_000_000, 1e3, 60.0)
    # Refused before any model loads: without --strategy nothing would aggregate.
    assert main(["server", "--clip-norm", "5"]) == 2
    assert "--clip-norm set(s) how rounds aggregate; this server runs no federation: add --strategy" in \
        capsys.readouterr().err


def test_client_index_outside_the_clients_is_a_clear_error(capsys):
    code = main(["client", "--num-clients", "2", "--client-index", "2", "--connect-timeout", "1"])
    assert code == 2
    assert "--client-index must be in [0, --num-clients=2), got 2" in capsys.readouterr().err


def test_every_option_has_help_and_shows_its_default():
    for command in subparsers():
        for action in options(command):
            assert action.help and action.help.strip(), f"{command} {action.option_strings[0]} has no help"
    text = subparsers()["client"].format_help()
    assert "(default: 16)" in text  # --batch-size
    assert "(default: 0.0)" in text  # --lora-dropout: a zero default is shown too


def test_each_subcommand_help_has_an_example():
    for command, parser in subparsers().items():
        text = parser.format_help()
        assert "example:" in text and f"fedsplit {command} " in text, command


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedsplit {version('fedsplit')}"


@pytest.mark.parametrize("make, message", [
    (lambda: TrainOptions(epochs=0), "epochs must be"),
    (lambda: TrainOptions(epochs=float("nan")), "epochs must be"),
    (lambda: TrainOptions(max_steps=0), "max_steps must be >= 1"),
    (lambda: TrainOptions(batch_size=0), "batch_size must be >= 1"),
    (lambda: TrainOptions(num_clients=2, client_index=2), "--client-index must be in"),
    (lambda: TrainOptions(partition_alpha=0), "partition_alpha must be"),
    (lambda: LoraSpec(alpha=0), "LoRA alpha must be"),
    (lambda: LoraSpec(alpha=float("inf")), "LoRA alpha must be"),
    (lambda: ClientConfig(lr=0), "lr must be"),
    (lambda: ClientConfig(timeout=float("nan")), "timeout must be"),
    (lambda: FederationConfig(min_uploads=0), "min_uploads"),
    (lambda: FederationConfig(deadline=0), "deadline must be"),
])
def test_the_python_api_refuses_the_same_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()
