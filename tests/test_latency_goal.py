"""A target's latency is a goal unless made a limit: a model the device runs, only slower than the target's
``latency_ms``, still gets the fastest plan within RAM/storage (and says it misses the goal); ``--max-latency-ms``
turns it into a limit that refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeopt.errors import BudgetError, EdgeoptError
from edgeopt.pipeline import BuildInputs, Planning, plan_latency
from edgeopt.planner import make_plan, with_latency_limit
from edgeopt.targets import load_target


@pytest.fixture(scope="module")
def digits() -> BuildInputs:
    return BuildInputs.default_model()


def _tiny_goal(name: str = "x86-cpu"):
    t = load_target(name)
    return t.model_copy(update={"budgets": t.budgets.model_copy(update={"latency_ms": 1e-6})})


def _latency_check(plan):
    return next(c for c in plan.budgets if c.name == "latency_ms")


def test_builtin_targets_state_latency_as_a_goal():
    for name in ("x86-cpu", "jetson-orin", "mcu-cortex-m7"):
        assert load_target(name).budgets.latency_is_limit is False


def test_missed_goal_gives_the_fastest_plan_and_says_so(digits):
    calib, digits_no_calib = digits, BuildInputs(digits.path, digits.model, digits.analysis, None, None)
    target = _tiny_goal()
    plan = plan_latency(Planning(digits_no_calib, target))
    check = _latency_check(plan)
    assert not check.limit and not check.ok
    assert any("latency goal" in r and "--max-latency-ms" in r for r in plan.rationale), plan.rationale
    # the fastest faithful plan of every option the target has, not merely the first option's
    from edgeopt import technique
    from edgeopt.planner import candidate_options, evaluate

    faithful = [t.name for t in technique.precisions() if t.presumed_faithful]
    lat = min(evaluate(digits.analysis, target, o, p).latency_ms for o in candidate_options(target, None)
              for p in faithful if p in o.precisions)
    assert plan.predicted_latency_ms == pytest.approx(lat, rel=1e-6)
    # with calibration data the per-layer search also keeps its plan
    plan = plan_latency(Planning(calib, target))
    assert not _latency_check(plan).ok and any("latency goal" in r for r in plan.rationale)


def test_a_latency_limit_refuses(digits):
    target = with_latency_limit(load_target("x86-cpu"), 1e-6)
    assert target.budgets.latency_is_limit and target.budgets.latency_ms == 1e-6
    with pytest.raises(BudgetError, match="no plan meets the budgets"):
        plan_latency(Planning(BuildInputs(digits.path, digits.model, digits.analysis, None, None), target))
    with pytest.raises(BudgetError):
        make_plan(digits.analysis, target)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(EdgeoptError, match="--max-latency-ms"):
            with_latency_limit(load_target("x86-cpu"), bad)


def test_fidelity_objective_steers_by_the_goal(digits):
    # a generous goal keeps the most faithful recipe; an unreachable one gives the fastest recipe that fits
    loose = make_plan(digits.analysis, load_target("x86-cpu"))
    assert loose.rationale[-1].startswith("chose") and _latency_check(loose).ok
    tight = make_plan(digits.analysis, _tiny_goal())
    assert not _latency_check(tight).ok and "latency goal" in tight.rationale[-1]
    assert tight.predicted_latency_ms <= loose.predicted_latency_ms


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_goal_and_limit(tmp_path):
    goal = tmp_path / "slow.yaml"
    goal.write_text("base: x86-cpu\nname: x86-tiny-goal\nbudgets: {latency_ms: 0.000001}\n")
    p = _cli("plan", "default", "--target", goal)
    assert p.returncode == 0, p.stderr
    assert "misses the goal" in p.stdout and "goal" in p.stdout
    p = _cli("plan", "default", "--target", "x86-cpu", "--max-latency-ms", "0.000001")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: no plan meets the budgets"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli("plan", "default", "--target", "x86-cpu", "--max-latency-ms", "-3")
    assert p.returncode == 2 and "--max-latency-ms must be a positive" in p.stderr
