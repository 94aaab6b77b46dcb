"""The command line against the Python API: flags generated from the config classes cannot
drift from them, every config field is a flag or is listed with a reason, `--help` stays
light, and the entry points (`--version`, `python -m universal_neurons`) work."""

import dataclasses
import os
import subprocess
import sys

import pytest

from universal_neurons import __version__
from universal_neurons.ablation import AblationConfig
from universal_neurons.activations import StoreConfig, TokenSetConfig
from universal_neurons.agreement import AgreementConfig
from universal_neurons.cli import flags
from universal_neurons.cli.agreement import AGREEMENT_FLAGS
from universal_neurons.cli.explain import EXPLAIN_FLAGS
from universal_neurons.cli.main import build_parser
from universal_neurons.cli.options import NOT_FLAGS
from universal_neurons.correlation import CorrelationConfig
from universal_neurons.explain import ExplainConfig
from universal_neurons.pipeline import PipelineConfig
from universal_neurons.properties import PropertiesConfig

FLAG_SETS = [
    (TokenSetConfig, flags.TOKEN_FLAGS),
    (CorrelationConfig, flags.CORRELATION_FLAGS),
    (PipelineConfig, flags.PIPELINE_FLAGS),
    (AblationConfig, flags.ABLATION_FLAGS),
    (PropertiesConfig, flags.PROPERTIES_FLAGS),
    (AgreementConfig, AGREEMENT_FLAGS),
    (ExplainConfig, EXPLAIN_FLAGS),
]


def _parse(argv):
    return build_parser(argv[0]).parse_args(argv)


@pytest.mark.parametrize("cls,flags", FLAG_SETS, ids=lambda x: getattr(x, "__name__", ""))
def test_every_config_field_is_a_flag_or_listed_with_a_reason(cls, flags):
    fields = {f.name for f in dataclasses.fields(cls)}
    flagged = {f.field for f in flags}
    assert flagged <= fields, f"flags for fields {cls.__name__} does not have: {flagged - fields}"
    listed = {k.split(".", 1)[1] for k in NOT_FLAGS if k.startswith(cls.__name__ + ".")}
    assert fields - flagged == listed, (f"{cls.__name__}: fields neither a flag nor in NOT_FLAGS: "
                                        f"{sorted(fields - flagged - listed)}; listed but flagged or gone: "
                                        f"{sorted(listed - (fields - flagged))}")


def test_no_flags_means_the_python_defaults():
    run = _parse(["run", "m1", "m2", "--text", "t.txt", "-o", "out"])
    assert flags.token_config(run) == TokenSetConfig()
    assert flags.correlation_config(run) == CorrelationConfig()
    assert flags.pipeline_config(run) == PipelineConfig()
    cache = _parse(["cache", "m", "--tokens", "t.h5", "-o", "s.h5"])
    assert flags.store_config(cache) == StoreConfig()
    ablate = _parse(["ablate", "m", "--table", "t.csv", "--tokens", "t.h5", "-o", "out"])
    from universal_neurons.cli.options import config_from_args

    assert config_from_args(AblationConfig, ablate, flags.ABLATION_FLAGS) == AblationConfig()
    props = _parse(["properties", "m", "--tokens", "t.h5", "-o", "p.csv"])
    assert config_from_args(PropertiesConfig, props, flags.PROPERTIES_FLAGS) == PropertiesConfig()


def test_flags_set_the_fields_they_name():
    a = _parse(["run", "m1", "m2", "--text", "t", "-o", "o", "--ctx-len", "64", "--keep-newlines", "--memory-gb",
                "0.5", "--baseline", "gaussian", "--baseline-seed", "3", "--no-cache", "--threshold", "0.4",
                "--no-weight-processing"])
    assert flags.token_config(a) == TokenSetConfig(ctx_len=64, exclude_newlines=False)
    assert flags.correlation_config(a) == CorrelationConfig(memory_budget=2**29, baseline="gaussian", seed=3)
    cfg = flags.pipeline_config(a)
    assert (cfg.cache, cfg.threshold, cfg.process_weights) == (False, 0.4, False)
    s = _parse(["cache", "m", "--tokens", "t", "-o", "s", "--pre", "--fp32", "--compression", "lzf"])
    assert flags.store_config(s) == StoreConfig(kinds=("post", "pre"), dtype="float32", compression="lzf")


def _run(*args, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_version_and_module_entry_point():
    got = _run("-m", "universal_neurons", "--version")
    assert got.returncode == 0 and got.stdout.strip() == f"universal-neurons {__version__}"
    assert __version__ != "0+unknown"


def test_help_does_not_import_torch():
    code = ("import sys; from universal_neurons.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformer_lens' in sys.modules)")
    got = _run("-c", code)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().splitlines()[-1] == "False False"
