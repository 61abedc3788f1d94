"""benchmarks/fine_motion.py's conditions are command lines handed to train.py in a device call: a misspelt flag
or option value would only surface there, as a lost run. Each one must parse and build its model here."""
import pytest
from benchmark_scripts import load_benchmark

from msf_scale.config import load_config
from msf_scale.models import build_model

FM = load_benchmark("fine_motion")


@pytest.mark.parametrize("name", sorted(FM.CONDITIONS))
def test_condition_parses_and_builds(name):
    variant, flags = FM.CONDITIONS[name]
    cfg = load_config(["--variant", variant, "--size", "tiny", *FM.RECIPE, *flags])
    assert cfg.model.variant == variant
    model = build_model(cfg.model, num_classes=8)
    for flag, value in zip(flags, flags[1:]):   # each arch option reached the model
        if flag.startswith("--model.arch."):
            assert str(getattr(model.cfg, flag.removeprefix("--model.arch."))) == value


def test_studies_name_known_conditions():
    for study, names in FM.STUDIES.items():
        assert set(names) <= set(FM.CONDITIONS), study


def test_a_stopped_run_reports_how_far_it_got():
    done = {"test_top1": 97.4, "status": "exit 0", "eval_curve": [(5, 60.0), (20, 97.4)]}
    killed = {"test_top1": None, "status": "killed after 310 s (--timeout)", "eval_curve": [(5, 50.5), (15, 96.9)]}
    failed = {"test_top1": None, "status": "exit 1", "eval_curve": []}
    assert FM.seed_cell(done) == "97.4"
    assert FM.seed_cell(killed) == "killed (epoch 15: 96.9)"
    assert FM.seed_cell(failed) == "failed"
