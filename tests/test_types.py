"""The plan's public view: built once per plan, shared by its requests, and read-only."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from team_logging_middleware._types import NO_LOGGING, Destination, Plan
from team_logging_middleware.settings import CallbackSpec

JSONL = CallbackSpec(callback_name="jsonl")
PLAN = Plan(
    team_id="team-a",
    logging_enabled=True,
    success=(Destination(JSONL, "team", JSONL.identity()),),
)


def test_the_view_is_one_object_per_plan_and_equal_to_a_plain_dict() -> None:
    view = PLAN.public()
    assert view is PLAN.public()
    assert view == {
        "team_id": "team-a",
        "logging_enabled": True,
        "cache_enabled": False,
        "message_logging": "full",
        "success_destinations": ["jsonl"],
        "failure_destinations": [],
    }
    assert json.loads(json.dumps(view)) == view


def test_no_request_can_change_what_the_next_one_sees() -> None:
    view = PLAN.public()
    with pytest.raises(TypeError):
        view["logging_enabled"] = False
    with pytest.raises(TypeError):
        view.update(team_id="team-b")
    with pytest.raises(TypeError):
        del view["team_id"]
    with pytest.raises(TypeError):
        view["success_destinations"].append("langfuse")
    with pytest.raises(TypeError):
        view["failure_destinations"] += ["langfuse"]
    assert PLAN.public()["success_destinations"] == ["jsonl"]
    assert PLAN.public()["failure_destinations"] == []
    mine = dict(view)  # a copy is the app's own to change
    mine["team_id"] = "changed"
    assert PLAN.public()["team_id"] == "team-a"


def test_derived_fields_follow_the_plan_and_stay_out_of_equality() -> None:
    assert PLAN.active and not NO_LOGGING.active
    cached_only = dataclasses.replace(NO_LOGGING, cache_enabled=True)
    assert cached_only.active and cached_only.public()["cache_enabled"] is True
    assert Plan(team_id="team-a", logging_enabled=True, success=PLAN.success) == PLAN
    assert "_public" not in repr(PLAN)
    unpickled = pickle.loads(pickle.dumps(PLAN))  # noqa: S301 (bytes we just made)
    for clone in (copy.deepcopy(PLAN), unpickled):
        assert clone == PLAN and clone.public() == PLAN.public() and clone.active
        with pytest.raises(TypeError):
            clone.public()["success_destinations"].clear()
