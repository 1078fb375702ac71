"""Planner: one test per precedence rule, caching and invalidation, store failure, properties."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from team_logging_middleware.config import StaticConfig
from team_logging_middleware.errors import StoreUnavailableError
from team_logging_middleware.planning import NO_LOGGING, Destination, Plan, Planner
from team_logging_middleware.resolver import Caller
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.stores.memory import MemorySettingsStore

SECRET = "sk-lf-secret-0123456789abcdef"
STORE_PASSWORD = "hunter2-store-password"


class Clock:
    """A manual clock for TTLs: tests advance it instead of sleeping."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class SwitchableStore(MemorySettingsStore):
    """A memory store whose backend can be switched off (then every read fails) and gated."""

    def __init__(self) -> None:
        super().__init__()
        self.up = True
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.error: type[Exception] = StoreUnavailableError

    async def get_team(self, team_id: str) -> TeamSettings | None:
        self.reads += 1
        # The answer is read first and delivered after the gate opens: a slow reply carrying
        # what the backend held when it was asked.
        up = self.up
        settings = await super().get_team(team_id)
        if self.gate is not None:
            await self.gate.wait()
        if not up:
            # A message like a real client's: it names the connection URL, password included.
            raise self.error(f"cannot connect to redis://:{STORE_PASSWORD}@10.0.0.5:6379")
        return settings


def spec(
    name: str = "langfuse", callback_type: str = "success", **callback_vars: str
) -> CallbackSpec:
    return CallbackSpec.model_validate(
        {"callback_name": name, "callback_type": callback_type, "callback_vars": callback_vars}
    )


def config(
    defaults: Iterable[CallbackSpec] = (), teams: Iterable[TeamSettings] = (), **kw: Any
) -> StaticConfig:
    return StaticConfig(
        defaults=tuple(defaults),
        teams=MappingProxyType({t.team_id: t for t in teams}),
        **kw,
    )


def names(destinations: Sequence[Destination]) -> list[tuple[str, str]]:
    """(callback_name + its 'p' var, source) of each destination, in order."""
    return [
        (f"{d.spec.callback_name}:{d.spec.callback_vars.get('p', '')}", d.source)
        for d in destinations
    ]


DEFAULT = spec("jsonl", "success_and_failure", p="default")
TEAM_LF = spec("langfuse", "success", p="team", langfuse_secret_key=SECRET)
KEY_GCS = spec("gcs_bucket", "success", p="key")


async def planner_with(
    *,
    defaults: Iterable[CallbackSpec] = (DEFAULT,),
    store_team: TeamSettings | None = None,
    config_team: TeamSettings | None = None,
    store: MemorySettingsStore | None = None,
    **kw: Any,
) -> Planner:
    store = store if store is not None else MemorySettingsStore()
    if store_team is not None:
        await store.put_team(store_team)
    teams = [config_team] if config_team is not None else []
    return Planner(store, config=config(defaults, teams), **kw)


# -- rule 1: destinations are the union; API settings replace the config entry --------------


async def test_rule1_destinations_are_defaults_team_and_key() -> None:
    planner = await planner_with(store_team=TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(KEY_GCS,)))
    assert plan.logging_enabled and plan.logs
    assert names(plan.success) == [
        ("jsonl:default", "default"),
        ("langfuse:team", "team"),
        ("gcs_bucket:key", "key"),
    ]
    assert names(plan.failure) == [("jsonl:default", "default")]


async def test_rule1_team_can_opt_out_of_defaults() -> None:
    team = TeamSettings(team_id="t", callbacks=[TEAM_LF], inherit_defaults=False)
    planner = await planner_with(store_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(KEY_GCS,)))
    assert names(plan.success) == [("langfuse:team", "team"), ("gcs_bucket:key", "key")]
    assert plan.failure == ()


async def test_rule1_config_entry_applies_when_the_store_has_none() -> None:
    planner = await planner_with(config_team=TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    plan = await planner.plan_for(Caller(team_id="t"))
    assert names(plan.success) == [("jsonl:default", "default"), ("langfuse:team", "config")]


async def test_rule1_api_settings_replace_the_config_entry_entirely() -> None:
    config_team = TeamSettings(
        team_id="t",
        callbacks=[spec("otel", p="config")],
        logging_enabled=False,
        cache_enabled=True,
        message_logging="metadata_only",
        inherit_defaults=False,
    )
    store_team = TeamSettings(team_id="t", callbacks=[TEAM_LF])
    planner = await planner_with(config_team=config_team, store_team=store_team)
    plan = await planner.plan_for(Caller(team_id="t"))
    # Callbacks *and* switches come from the API-managed settings only.
    assert plan.logging_enabled is True
    assert plan.cache_enabled is False
    assert plan.message_logging == "full"
    assert names(plan.success) == [("jsonl:default", "default"), ("langfuse:team", "team")]


# -- rule 2: every entry keeps its vars; duplicates served once -------------------------------


async def test_rule2_same_name_different_vars_are_all_kept_with_their_own_vars() -> None:
    team = TeamSettings(
        team_id="t",
        callbacks=[spec("langfuse", p="project1", langfuse_secret_key="s1")],
    )
    key = spec("langfuse", p="project2", langfuse_secret_key="s2")
    planner = await planner_with(defaults=(), store_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(key,)))
    assert [d.spec.callback_vars for d in plan.success] == [
        {"p": "project1", "langfuse_secret_key": "s1"},
        {"p": "project2", "langfuse_secret_key": "s2"},
    ]
    assert len({d.identity for d in plan.success}) == 2


async def test_rule2_exact_duplicates_are_served_once_first_source_wins() -> None:
    same = spec("jsonl", "success_and_failure", p="default")
    team = TeamSettings(team_id="t", callbacks=[same, same])
    planner = await planner_with(store_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(same,)))
    assert names(plan.success) == [("jsonl:default", "default")]
    assert names(plan.failure) == [("jsonl:default", "default")]


async def test_rule2_success_here_and_failure_there_receive_each_outcome_once() -> None:
    target = {"p": "shared"}
    team = TeamSettings(team_id="t", callbacks=[spec("otel", "success", **target)])
    key_entries = (
        spec("otel", "failure", **target),
        spec("otel", "success_and_failure", **target),
    )
    planner = await planner_with(defaults=(), store_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=key_entries))
    assert names(plan.success) == [("otel:shared", "team")]
    assert names(plan.failure) == [("otel:shared", "key")]
    assert plan.success[0].identity == plan.failure[0].identity
    # Each destination's own entry agrees with the outcome it is listed for.
    assert plan.success[0].spec.receives(True)
    assert plan.failure[0].spec.receives(False)


# -- rule 3: callback_type routes outcomes ---------------------------------------------------


async def test_rule3_callback_type_routes_outcomes() -> None:
    team = TeamSettings(
        team_id="t",
        callbacks=[
            spec("a", "success"),
            spec("b", "failure"),
            spec("c", "success_and_failure"),
        ],
    )
    planner = await planner_with(defaults=(), store_team=team)
    plan = await planner.plan_for(Caller(team_id="t"))
    assert [d.name for d in plan.success] == ["a", "c"]
    assert [d.name for d in plan.failure] == ["b", "c"]
    assert [d.name for d in plan.destinations_for(True)] == ["a", "c"]
    assert [d.name for d in plan.destinations_for(False)] == ["b", "c"]


# -- rule 4: disabled logging sends nothing, defaults included -------------------------------


async def test_rule4_team_disabled_in_store_sends_nothing_at_all() -> None:
    team = TeamSettings(team_id="t", callbacks=[TEAM_LF], logging_enabled=False)
    planner = await planner_with(store_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(KEY_GCS,)))
    assert plan.logging_enabled is False
    assert plan.success == () and plan.failure == ()
    assert plan.destinations_for(True) == () and plan.destinations_for(False) == ()
    assert not plan.logs and not plan.active


async def test_rule4_team_disabled_in_config_sends_nothing() -> None:
    team = TeamSettings(team_id="t", callbacks=[TEAM_LF], logging_enabled=False)
    planner = await planner_with(config_team=team)
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(KEY_GCS,)))
    assert plan.logging_enabled is False
    assert plan.success == () and plan.failure == ()


async def test_rule4_key_disabled_sends_nothing_even_for_an_enabled_team() -> None:
    planner = await planner_with(store_team=TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    caller = Caller(team_id="t", key_logging=(KEY_GCS,), key_logging_enabled=False)
    plan = await planner.plan_for(caller)
    assert plan.logging_enabled is False
    assert plan.success == () and plan.failure == ()
    # A key without a team too: defaults are not sent either.
    plan = await planner.plan_for(Caller(team_id=None, key_logging_enabled=False))
    assert plan.logging_enabled is False and plan.success == ()


async def test_rule4_disabling_is_non_destructive() -> None:
    store = MemorySettingsStore()
    planner = await planner_with(store=store)
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF], logging_enabled=False))
    assert (await planner.plan_for(Caller(team_id="t"))).success == ()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF], logging_enabled=True))
    plan = await planner.plan_for(Caller(team_id="t"))
    assert names(plan.success) == [("jsonl:default", "default"), ("langfuse:team", "team")]


# -- rule 5: the stricter message_logging wins ------------------------------------------------


@pytest.mark.parametrize(
    ("team_mode", "key_mode", "expected"),
    [
        ("full", None, "full"),
        ("full", "full", "full"),
        ("full", "metadata_only", "metadata_only"),
        ("metadata_only", None, "metadata_only"),
        ("metadata_only", "full", "metadata_only"),
    ],
)
async def test_rule5_message_logging_is_the_stricter(
    team_mode: Any, key_mode: Any, expected: str
) -> None:
    planner = await planner_with(store_team=TeamSettings(team_id="t", message_logging=team_mode))
    plan = await planner.plan_for(Caller(team_id="t", key_message_logging=key_mode))
    assert plan.message_logging == expected


# -- rule 6: cache switches from the team; namespaces never shared ----------------------------


async def test_rule6_cache_switches_and_namespaces() -> None:
    store = MemorySettingsStore()
    await store.put_team(TeamSettings(team_id="a", cache_enabled=True, cache_ttl_seconds=120))
    await store.put_team(TeamSettings(team_id="b"))
    await store.put_team(
        TeamSettings(
            team_id="gdpr", cache_enabled=True, cache_ttl_seconds=60, logging_enabled=False
        )
    )
    planner = Planner(store)
    a = await planner.plan_for(Caller(team_id="a"))
    b = await planner.plan_for(Caller(team_id="b"))
    gdpr = await planner.plan_for(Caller(team_id="gdpr"))
    assert (a.cache_enabled, a.cache_ttl_seconds) == (True, 120)
    assert (b.cache_enabled, b.cache_ttl_seconds) == (False, None)
    # Logging off does not turn caching off: they are separate switches.
    assert (gdpr.cache_enabled, gdpr.logging_enabled, gdpr.active) == (True, False, True)
    assert len({a.cache_namespace, b.cache_namespace, gdpr.cache_namespace}) == 3
    assert all(len(p.cache_namespace) == 32 for p in (a, b, gdpr))
    # Stable: another planner (another replica) computes the same namespace.
    assert (await Planner(store).plan_for(Caller(team_id="a"))).cache_namespace == a.cache_namespace
    assert a.cache_namespace != "a"


# -- callers without a team -------------------------------------------------------------------


async def test_unknown_caller_gets_global_defaults_only() -> None:
    planner = await planner_with(store_team=TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    plan = await planner.plan_for(None)
    assert plan.team_id is None and plan.logging_enabled
    assert names(plan.success) == [("jsonl:default", "default")]
    assert plan.cache_enabled is False and plan.cache_namespace == ""


async def test_unknown_callers_can_be_left_unlogged() -> None:
    assert await (await planner_with(log_unknown_callers=False)).plan_for(None) is NO_LOGGING
    planner = Planner(MemorySettingsStore(), config=config([DEFAULT], log_unknown_callers=False))
    assert await planner.plan_for(None) is NO_LOGGING
    # The explicit argument wins over the config file.
    planner = Planner(
        MemorySettingsStore(),
        config=config([DEFAULT], log_unknown_callers=False),
        log_unknown_callers=True,
    )
    assert names((await planner.plan_for(None)).success) == [("jsonl:default", "default")]


async def test_a_key_without_a_team_gets_defaults_and_its_own_entries() -> None:
    planner = await planner_with()
    plan = await planner.plan_for(Caller(team_id=None, key_logging=(KEY_GCS,)))
    assert names(plan.success) == [("jsonl:default", "default"), ("gcs_bucket:key", "key")]


# -- caching and invalidation ------------------------------------------------------------------


async def test_plans_are_cached_for_ttl_on_the_injected_clock() -> None:
    clock = Clock()
    store = SwitchableStore()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    planner = Planner(store, ttl=30, timer=clock)
    first = await planner.plan_for(Caller(team_id="t"))
    clock.now += 29.9
    assert await planner.plan_for(Caller(team_id="t", key_id="other-key")) is first
    assert store.reads == 1
    clock.now += 0.1
    assert await planner.plan_for(Caller(team_id="t")) == first
    assert store.reads == 2
    stats = planner.stats()
    assert (stats["hits"], stats["misses"], stats["size"], stats["teams"]) == (1, 2, 1, 1)


async def test_keys_with_different_entries_get_their_own_plans_from_one_read() -> None:
    store = SwitchableStore()
    planner = Planner(store)
    k1 = await planner.plan_for(Caller(team_id="t", key_logging=(spec("x", p="1"),)))
    k2 = await planner.plan_for(Caller(team_id="t", key_logging=(spec("x", p="2"),)))
    plain = await planner.plan_for(Caller(team_id="t"))
    assert names(k1.success) == [("x:1", "key")]
    assert names(k2.success) == [("x:2", "key")]
    assert plain.success == ()
    assert store.reads == 1
    assert planner.stats()["size"] == 3


async def test_store_writes_invalidate_at_once() -> None:
    clock = Clock()
    store = MemorySettingsStore()
    planner = Planner(store, ttl=3600, timer=clock)
    assert (await planner.plan_for(Caller(team_id="t"))).success == ()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    assert names((await planner.plan_for(Caller(team_id="t"))).success) == [
        ("langfuse:team", "team")
    ]
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF], logging_enabled=False))
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is False
    await store.delete_team("t")
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is True


async def test_invalidate_one_team_or_all() -> None:
    store = SwitchableStore()
    planner = Planner(store)
    await planner.plan_for(Caller(team_id="a"))
    await planner.plan_for(Caller(team_id="b"))
    assert store.reads == 2
    planner.invalidate("a")
    await planner.plan_for(Caller(team_id="a"))
    await planner.plan_for(Caller(team_id="b"))
    assert store.reads == 3
    planner.invalidate("*")
    assert planner.stats()["teams"] == 0
    await planner.plan_for(Caller(team_id="b"))
    planner.invalidate()
    await planner.plan_for(Caller(team_id="b"))
    assert store.reads == 5


async def test_concurrent_misses_for_a_team_share_one_store_read() -> None:
    store = SwitchableStore()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    store.gate = asyncio.Event()
    planner = Planner(store)
    tasks = [asyncio.create_task(planner.plan_for(Caller(team_id="t"))) for _ in range(50)]
    await asyncio.wait_for(_until(lambda: planner.stats()["inflight"] == 1), 5)
    store.gate.set()
    plans = await asyncio.gather(*tasks)
    assert store.reads == 1
    assert all(p == plans[0] for p in plans)
    assert names(plans[0].success) == [("langfuse:team", "team")]


async def test_a_read_running_during_a_write_is_not_cached() -> None:
    store = SwitchableStore()
    store.gate = asyncio.Event()
    planner = Planner(store, ttl=3600)
    stale_read = asyncio.create_task(planner.plan_for(Caller(team_id="t")))
    await asyncio.wait_for(_until(lambda: store.reads == 1), 5)
    # The admin disables logging while the read above is in flight (it read "no settings").
    await MemorySettingsStore.put_team(store, TeamSettings(team_id="t", logging_enabled=False))
    store.gate.set()
    assert (await stale_read).logging_enabled is True
    store.gate = None
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is False


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0)


# -- store failure ---------------------------------------------------------------------------


async def test_store_down_serves_the_last_known_plan(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    store = SwitchableStore()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    planner = Planner(store, ttl=30, timer=clock, retry_interval=1)
    known = await planner.plan_for(Caller(team_id="t"))
    store.up = False
    clock.now += 31
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware"):
        stale = await planner.plan_for(Caller(team_id="t"))
        assert stale == known
        # Served from the cache until retry_interval, then the store is tried again.
        await planner.plan_for(Caller(team_id="t"))
        assert store.reads == 2
        clock.now += 1
        await planner.plan_for(Caller(team_id="t"))
        assert store.reads == 3
    stats = planner.stats()
    assert stats["stale_served"] == 3
    assert stats["store_errors"] == 2
    assert stats["failsafe_served"] == 0
    # Logged once per team per minute, without the error's message (it holds a password).
    records = [r for r in caplog.records if "settings store unavailable" in r.getMessage()]
    assert len(records) == 1
    assert "StoreUnavailableError" in records[0].getMessage()
    assert "'t'" in records[0].getMessage()
    assert STORE_PASSWORD not in caplog.text and SECRET not in caplog.text
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="team_logging_middleware"):
        await planner.plan_for(Caller(team_id="t"))
    records = [r for r in caplog.records if "settings store unavailable" in r.getMessage()]
    assert len(records) == 2
    # The store comes back: fresh settings after the next retry.
    store.up = True
    await store.put_team(TeamSettings(team_id="t", logging_enabled=False))
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is False


async def test_store_down_with_nothing_known_fails_safe() -> None:
    clock = Clock()
    store = SwitchableStore()
    store.up = False
    store.error = RuntimeError  # any exception, not only StoreUnavailableError
    # Even a team in the config file and global defaults are not used: the store might hold a
    # disabled switch for the team that we could not read.
    planner = Planner(
        store,
        config=config([DEFAULT], [TeamSettings(team_id="t", callbacks=[TEAM_LF])]),
        timer=clock,
    )
    plan = await planner.plan_for(Caller(team_id="t", key_logging=(KEY_GCS,)))
    assert plan.logging_enabled is False
    assert plan.success == () and plan.failure == ()
    assert plan.cache_enabled is False
    assert plan.team_id == "t"
    assert planner.stats()["failsafe_served"] == 1
    clock.now += 2
    store.up = True
    plan = await planner.plan_for(Caller(team_id="t"))
    assert names(plan.success) == [("jsonl:default", "default"), ("langfuse:team", "config")]


async def test_an_invalidation_during_an_outage_forgets_the_last_known_settings() -> None:
    # The team changed (we were told so) but we cannot read how: it may have been disabled.
    store = SwitchableStore()
    planner = Planner(store)
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is True
    store.up = False
    planner.invalidate("t")
    assert (await planner.plan_for(Caller(team_id="t"))).logging_enabled is False
    assert planner.stats()["failsafe_served"] == 1


# -- effective destinations (admin GET) ------------------------------------------------------


async def test_effective_destinations_are_masked_with_their_source() -> None:
    team = TeamSettings(
        team_id="t",
        callbacks=[
            spec("langfuse", "failure", langfuse_public_key="pk-1", langfuse_secret_key=SECRET),
            spec("jsonl", "success_and_failure", p="default"),  # duplicate of the default
        ],
    )
    planner = await planner_with(store_team=team)
    out = await planner.effective_destinations("t")
    assert out == [
        {
            "callback_name": "jsonl",
            "callback_type": "success_and_failure",
            "callback_vars": {"p": "default"},
            "source": "default",
        },
        {
            "callback_name": "langfuse",
            "callback_type": "failure",
            "callback_vars": {"langfuse_public_key": "pk-1", "langfuse_secret_key": "sk-****ef"},
            "source": "team",
        },
    ]
    assert SECRET not in repr(out)


async def test_effective_destinations_of_a_disabled_or_unknown_team() -> None:
    planner = await planner_with(
        store_team=TeamSettings(team_id="off", callbacks=[TEAM_LF], logging_enabled=False)
    )
    assert await planner.effective_destinations("off") == []
    assert await planner.effective_destinations("nobody") == [
        {
            "callback_name": "jsonl",
            "callback_type": "success_and_failure",
            "callback_vars": {"p": "default"},
            "source": "default",
        }
    ]


async def test_effective_destinations_raise_when_the_store_is_down() -> None:
    store = SwitchableStore()
    planner = Planner(store)
    store.up = False
    with pytest.raises(StoreUnavailableError):
        await planner.effective_destinations("t")
    store.error = RuntimeError
    with pytest.raises(StoreUnavailableError) as info:
        await planner.effective_destinations("t")
    assert STORE_PASSWORD not in str(info.value)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Planner(MemorySettingsStore(), ttl=-1)
    with pytest.raises(ValueError):
        Planner(MemorySettingsStore(), maxsize=0)


# -- properties -------------------------------------------------------------------------------

_TEAMS = ("A", "B")


def _specs(team: str | None) -> st.SearchStrategy[CallbackSpec]:
    # A small pool so duplicates and same-name-different-vars cases are frequent. Team entries
    # carry their team in a var, so an entry of team A can never equal one of team B.
    extra = {"team": team} if team else {}
    return st.builds(
        lambda name, ctype, v: spec(name, ctype, v=v, **extra),
        st.sampled_from(["langfuse", "otel", "jsonl"]),
        st.sampled_from(["success", "failure", "success_and_failure"]),
        st.sampled_from(["1", "2"]),
    )


def _team(team: str) -> st.SearchStrategy[TeamSettings | None]:
    return st.none() | st.builds(
        TeamSettings,
        team_id=st.just(team),
        callbacks=st.lists(_specs(team), max_size=4),
        logging_enabled=st.booleans(),
        inherit_defaults=st.booleans(),
    )


_caller = st.builds(
    Caller,
    team_id=st.sampled_from(_TEAMS),
    key_logging=st.lists(_specs(None), max_size=3).map(tuple),
    key_logging_enabled=st.booleans(),
)


def _outcomes(entries: Iterable[CallbackSpec]) -> set[tuple[str, bool]]:
    return {
        (e.identity(), outcome) for e in entries for outcome in (True, False) if e.receives(outcome)
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    defaults=st.lists(_specs(None), max_size=3),
    config_teams=st.tuples(*(_team(t) for t in _TEAMS)),
    store_teams=st.tuples(*(_team(t) for t in _TEAMS)),
    callers=st.lists(_caller, min_size=1, max_size=6),
)
def test_plan_properties(
    defaults: list[CallbackSpec],
    config_teams: tuple[TeamSettings | None, ...],
    store_teams: tuple[TeamSettings | None, ...],
    callers: list[Caller],
) -> None:
    async def check() -> None:
        store = MemorySettingsStore()
        for team in store_teams:
            if team is not None:
                await store.put_team(team)
        planner = Planner(
            store, config=config(defaults, [t for t in config_teams if t is not None])
        )
        effective = {
            team_id: stored if stored is not None else configured
            for team_id, configured, stored in zip(_TEAMS, config_teams, store_teams, strict=True)
        }
        # Interleaved requests of both teams share one planner (and its caches).
        for caller in callers:
            plan = await planner.plan_for(caller)
            assert caller.team_id is not None
            team = effective[caller.team_id]
            _check_plan(plan, team, caller, defaults)

    asyncio.run(check())


def _check_plan(
    plan: Plan, team: TeamSettings | None, caller: Caller, defaults: list[CallbackSpec]
) -> None:
    disabled = (team is not None and not team.logging_enabled) or not caller.key_logging_enabled
    if disabled:
        assert plan.logging_enabled is False
        assert plan.success == () and plan.failure == ()
        return
    expected: list[CallbackSpec] = []
    if team is None or team.inherit_defaults:
        expected.extend(defaults)
    if team is not None:
        expected.extend(team.callbacks)
    expected.extend(caller.key_logging)
    got = [(d.identity, True) for d in plan.success] + [(d.identity, False) for d in plan.failure]
    # The union by identity, each outcome delivered once.
    assert len(got) == len(set(got))
    assert set(got) == _outcomes(expected)
    for destination in (*plan.success, *plan.failure):
        owner = destination.spec.callback_vars.get("team")
        # No destination of another team.
        assert owner in (None, caller.team_id)
        assert (owner is None) == (destination.source in ("default", "key"))


# -- the request path's shortcut: the plan last served to a Caller object ----------------------


async def test_a_callers_plan_is_reused_until_its_team_changes_or_expires() -> None:
    clock = Clock()
    store = SwitchableStore()
    await store.put_team(TeamSettings(team_id="t", callbacks=[TEAM_LF]))
    planner = await planner_with(store=store, ttl=30, timer=clock)
    caller = Caller(team_id="t", key_id="k")
    first = await planner.plan_for(caller)
    assert planner.cached_plan(caller) is first
    assert planner.cached_plan(Caller(team_id="t", key_id="k")) is None  # another object
    assert await planner.plan_for(Caller(team_id="t", key_id="k")) == first
    assert store.reads == 1

    await store.put_team(TeamSettings(team_id="t", logging_enabled=False))  # notifies
    assert planner.cached_plan(caller) is None
    assert not (await planner.plan_for(caller)).logging_enabled
    assert store.reads == 2

    clock.now += 30
    assert planner.cached_plan(caller) is None
    await planner.plan_for(caller)
    assert store.reads == 3
    assert planner.stats()["hits"] == 2 and planner.stats()["misses"] == 3


async def test_a_plan_read_across_an_invalidation_is_not_reused() -> None:
    store = SwitchableStore()
    planner = await planner_with(store=store)
    caller = Caller(team_id="t")
    store.gate = asyncio.Event()
    pending = asyncio.ensure_future(planner.plan_for(caller))
    await asyncio.wait_for(_until(lambda: store.reads == 1), 5)
    planner.invalidate("t")
    store.gate.set()
    await pending
    assert planner.cached_plan(caller) is None  # it answered its request, nothing more


async def test_the_unknown_caller_and_degraded_plans_are_counted_on_the_shortcut() -> None:
    clock = Clock()
    store = SwitchableStore()
    planner = await planner_with(store=store, timer=clock, retry_interval=1)
    assert planner.cached_plan(None) is await planner.plan_for(None)
    store.up = False
    caller = Caller(team_id="t")
    assert not (await planner.plan_for(caller)).logging_enabled
    assert planner.cached_plan(caller) is not None
    assert planner.stats()["failsafe_served"] == 2
    clock.now += 1  # the retry interval: the store is asked again
    assert planner.cached_plan(caller) is None


async def test_the_shortcut_is_bounded_by_maxsize() -> None:
    planner = await planner_with(maxsize=2)
    callers = [Caller(team_id=f"t{i}") for i in range(3)]
    plans = [await planner.plan_for(caller) for caller in callers]
    assert planner.cached_plan(callers[0]) is None  # the oldest shortcut went first
    assert planner.cached_plan(callers[2]) is plans[2]
    assert await planner.plan_for(callers[0]) == plans[0]
