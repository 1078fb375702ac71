"""StaticConfig: the seed's default_team_settings form, the richer form, and located errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from team_logging_middleware.config import StaticConfig
from team_logging_middleware.errors import ConfigFileError, SettingsError
from team_logging_middleware.settings import CallbackSpec, TeamSettings
from team_logging_middleware.sinks import default_registry
from team_logging_middleware.sinks.base import SinkContext, SinkRegistry, SinkType

SECRET = "sk-lf-0123456789-very-secret"


def _unbuildable(vars_: Mapping[str, str], ctx: SinkContext) -> Any:
    raise AssertionError("the config never builds sinks")


def _check_host(vars_: Mapping[str, str]) -> None:
    host = vars_.get("langfuse_host")
    if host is not None and not host.startswith(("http://", "https://")):
        raise SettingsError("callback_vars.langfuse_host: must start with http:// or https://")


def _registry() -> SinkRegistry:
    # The shapes of the built-in langfuse and jsonl sink types, declared here so these tests pin
    # the config's behaviour independently of the sink modules.
    return SinkRegistry(
        [
            SinkType(
                "langfuse",
                _unbuildable,
                required_vars=frozenset({"langfuse_public_key", "langfuse_secret_key"}),
                optional_vars=frozenset({"langfuse_host"}),
                aliases={"langfuse_secret": "langfuse_secret_key"},
                validate_vars=_check_host,
            ),
            SinkType("jsonl", _unbuildable, optional_vars=frozenset({"path"})),
            SinkType(
                "otel",
                _unbuildable,
                required_vars=frozenset({"otel_endpoint"}),
                optional_vars=frozenset({"otel_headers"}),
            ),
        ]
    )


# The seed document's example, verbatim (comments included), in LiteLLM's nesting.
SEED_YAML = """
litellm_settings:
  default_team_settings:
    - team_id: my-secret-project
      success_callback: ["langfuse"]
      langfuse_public_key: os.environ/LANGFUSE_PUB_KEY_1 # Project 1
      langfuse_secret: os.environ/LANGFUSE_PRIVATE_KEY_1 # Project 1
    - team_id: ishaans-secret-project
      success_callback: ["langfuse"]
      langfuse_public_key: os.environ/LANGFUSE_PUB_KEY_2 # Project 2
      langfuse_secret: os.environ/LANGFUSE_SECRET_2 # Project 2
"""


def _langfuse(pub: str, secret: str, callback_type: str = "success") -> CallbackSpec:
    return CallbackSpec.model_validate(
        {
            "callback_name": "langfuse",
            "callback_type": callback_type,
            "callback_vars": {"langfuse_public_key": pub, "langfuse_secret_key": secret},
        }
    )


def _load(data: Mapping[str, Any]) -> StaticConfig:
    return StaticConfig.from_dict(data, _registry())


def _error(data: Mapping[str, Any]) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        _load(data)
    return info.value


def _assert_no_secret(err: ConfigFileError) -> None:
    for text in (str(err), repr(err), err.message, str(err.param)):
        assert SECRET not in text
        assert SECRET[:12] not in text


def test_seed_yaml_loads_with_env_references_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even when the variables are set, the config keeps references: resolution happens only
    # when a destination is built.
    monkeypatch.setenv("LANGFUSE_PUB_KEY_1", "pk-resolved")
    path = tmp_path / "config.yaml"
    path.write_text(SEED_YAML, encoding="utf-8")
    config = StaticConfig.load(path, _registry())
    assert config.defaults == ()
    assert list(config.teams) == ["my-secret-project", "ishaans-secret-project"]
    assert config.teams["my-secret-project"] == TeamSettings(
        team_id="my-secret-project",
        callbacks=[_langfuse("os.environ/LANGFUSE_PUB_KEY_1", "os.environ/LANGFUSE_PRIVATE_KEY_1")],
    )
    assert config.teams["ishaans-secret-project"].callbacks == [
        _langfuse("os.environ/LANGFUSE_PUB_KEY_2", "os.environ/LANGFUSE_SECRET_2")
    ]


def test_seed_yaml_with_the_default_registry(tmp_path: Path) -> None:
    # The same file against the real built-in sink types (langfuse's alias langfuse_secret).
    path = tmp_path / "config.yaml"
    path.write_text(SEED_YAML, encoding="utf-8")
    config = StaticConfig.load(path, default_registry(jsonl_dir=tmp_path))
    assert {team_id: settings.callbacks for team_id, settings in config.teams.items()} == {
        "my-secret-project": [
            _langfuse("os.environ/LANGFUSE_PUB_KEY_1", "os.environ/LANGFUSE_PRIVATE_KEY_1")
        ],
        "ishaans-secret-project": [
            _langfuse("os.environ/LANGFUSE_PUB_KEY_2", "os.environ/LANGFUSE_SECRET_2")
        ],
    }


def test_seed_entries_are_also_accepted_at_the_top_level() -> None:
    nested = yaml.safe_load(SEED_YAML)
    top = {"default_team_settings": nested["litellm_settings"]["default_team_settings"]}
    assert _load(top) == _load(nested)


def test_a_name_in_both_lists_becomes_one_success_and_failure_entry() -> None:
    config = _load(
        {
            "default_team_settings": [
                {
                    "team_id": "t",
                    "success_callback": ["langfuse", "jsonl"],
                    "failure_callback": ["langfuse", "otel"],
                    "langfuse_public_key": "pk",
                    "langfuse_secret_key": SECRET,
                    "langfuse_host": "https://lf.example",
                    "path": "/var/log/llm",
                    "otel_endpoint": "http://collector:4318",
                }
            ]
        }
    )
    callbacks = config.teams["t"].callbacks
    assert [(c.callback_name, c.callback_type) for c in callbacks] == [
        ("langfuse", "success_and_failure"),
        ("jsonl", "success"),
        ("otel", "failure"),
    ]
    # Each entry keeps only the flat vars its own sink type declares.
    assert callbacks[0].callback_vars == {
        "langfuse_public_key": "pk",
        "langfuse_secret_key": SECRET,
        "langfuse_host": "https://lf.example",
    }
    assert callbacks[1].callback_vars == {"path": "/var/log/llm"}
    assert callbacks[2].callback_vars == {"otel_endpoint": "http://collector:4318"}


def test_richer_form_with_switches_and_explicit_callbacks() -> None:
    config = _load(
        {
            "default_callbacks": [
                {"callback_name": "jsonl", "callback_type": "success_and_failure"},
                {
                    "callback_name": "langfuse",
                    "callback_vars": {"langfuse_public_key": "pk-g", "langfuse_secret": SECRET},
                },
            ],
            "default_team_settings": [
                {
                    "team_id": "gdpr",
                    "logging_enabled": False,
                    "cache_enabled": True,
                    "cache_ttl_seconds": 600,
                    "message_logging": "metadata_only",
                    "inherit_defaults": False,
                    "success_callback": ["jsonl"],
                    "callbacks": [
                        {
                            "callback_name": "otel",
                            "callback_type": "failure",
                            "callback_vars": {"otel_endpoint": "http://c:4318"},
                        }
                    ],
                }
            ],
        }
    )
    assert config.defaults == (
        CallbackSpec(callback_name="jsonl", callback_type="success_and_failure"),
        _langfuse("pk-g", SECRET),  # the alias is normalised in defaults too
    )
    assert config.teams["gdpr"] == TeamSettings(
        team_id="gdpr",
        logging_enabled=False,
        cache_enabled=True,
        cache_ttl_seconds=600,
        message_logging="metadata_only",
        inherit_defaults=False,
        callbacks=[
            CallbackSpec(callback_name="jsonl"),
            CallbackSpec(
                callback_name="otel",
                callback_type="failure",
                callback_vars={"otel_endpoint": "http://c:4318"},
            ),
        ],
    )


def test_team_logging_section_options() -> None:
    config = _load({"team_logging": {"env_allowlist": ["LF_*"], "log_unknown_callers": False}})
    assert config.env_allowlist == ("LF_*",)
    assert config.log_unknown_callers is False
    assert _load({}).env_allowlist is None
    assert _load({}).log_unknown_callers is True


def test_litellm_config_file_keeps_its_own_sections() -> None:
    # A whole LiteLLM proxy config: its sections and its own litellm_settings keys are ignored.
    data = yaml.safe_load(
        """
model_list:
  - model_name: gpt-4
    litellm_params: {model: openai/gpt-4}
general_settings:
  master_key: sk-1234
litellm_settings:
  success_callback: ["langfuse"]
  drop_params: true
  default_team_settings:
    - team_id: a
      success_callback: ["jsonl"]
"""
    )
    config = _load(data)
    assert config.defaults == ()
    assert list(config.teams) == ["a"]


def test_empty_inputs() -> None:
    assert StaticConfig.empty() == StaticConfig()
    assert StaticConfig.from_dict(None, _registry()) == StaticConfig.empty()
    assert _load({}) == StaticConfig.empty()


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing configured yet\n", encoding="utf-8")
    assert StaticConfig.load(path, _registry()) == StaticConfig.empty()


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        '{"default_team_settings": [{"team_id": "j", "success_callback": ["jsonl"]}]}',
        encoding="utf-8",
    )
    assert StaticConfig.load(path, _registry()).teams["j"].callbacks == [
        CallbackSpec(callback_name="jsonl")
    ]


def test_config_is_immutable() -> None:
    config = _load(yaml.safe_load(SEED_YAML))
    with pytest.raises(TypeError):
        config.teams["new"] = TeamSettings(team_id="new")  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.defaults = ()  # type: ignore[misc]


# -- errors ---------------------------------------------------------------------------------


def _seed_entry(**extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "team_id": "x",
        "success_callback": ["langfuse"],
        "langfuse_public_key": "pk-x",
        "langfuse_secret": SECRET,
    }
    entry.update(extra)
    return entry


def test_typo_names_the_field_the_entry_and_the_allowed_fields() -> None:
    entry = _seed_entry()
    entry["success_callbacks"] = entry.pop("success_callback")
    err = _error({"default_team_settings": [{"team_id": "ok"}, entry]})
    assert err.message.startswith(
        "default_team_settings[1] (team_id 'x'): unknown field 'success_callbacks' "
        "(did you mean 'success_callback'?); allowed: ["
    )
    assert "'failure_callback'" in err.message
    assert err.param == "default_team_settings[1].success_callbacks"
    _assert_no_secret(err)


def test_missing_team_id() -> None:
    entry = _seed_entry()
    del entry["team_id"]
    err = _error({"litellm_settings": {"default_team_settings": [entry]}})
    assert err.message == "litellm_settings.default_team_settings[0]: missing field 'team_id'"
    _assert_no_secret(err)


def test_duplicate_team_id() -> None:
    err = _error({"default_team_settings": [_seed_entry(), {"team_id": "y"}, _seed_entry()]})
    assert err.message == (
        "default_team_settings[2] (team_id 'x'): duplicate team_id, "
        "already defined by default_team_settings[0]"
    )
    _assert_no_secret(err)


def test_unknown_callback_lists_registered_names() -> None:
    err = _error({"default_team_settings": [_seed_entry(success_callback=["langfuze"])]})
    assert err.message == (
        "default_team_settings[0] (team_id 'x'): success_callback: unknown callback "
        "'langfuze'; registered: ['jsonl', 'langfuse', 'otel']"
    )
    _assert_no_secret(err)


def test_missing_required_var_is_named() -> None:
    entry = _seed_entry()
    del entry["langfuse_public_key"]
    err = _error({"default_team_settings": [entry]})
    assert err.message.startswith(
        "default_team_settings[0] (team_id 'x'): langfuse_public_key: required by callback "
        "'langfuse'"
    )
    assert err.param == "default_team_settings[0].langfuse_public_key"
    _assert_no_secret(err)


def test_var_of_a_callback_the_entry_does_not_list() -> None:
    err = _error({"default_team_settings": [_seed_entry(otel_endpoint="http://c:4318")]})
    assert err.message == (
        "default_team_settings[0] (team_id 'x'): 'otel_endpoint' is a var of callback 'otel', "
        "which this entry does not list in success_callback or failure_callback"
    )
    _assert_no_secret(err)


def test_both_nestings_at_once_is_ambiguous() -> None:
    err = _error(
        {
            "default_team_settings": [_seed_entry()],
            "litellm_settings": {"default_team_settings": []},
        }
    )
    assert "given both at the top level and under litellm_settings" in err.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "the config file must be a mapping at the top level (got list)"),
        ({"default_team_settings": {"team_id": "x"}}, "default_team_settings: must be a list"),
        ({"default_team_settings": ["x"]}, "default_team_settings[0]: must be a mapping"),
        ({"default_team_settings": [{"team_id": 7}]}, "team_id must be a non-empty string"),
        (
            {"default_team_settings": [_seed_entry(success_callback="langfuse")]},
            "(team_id 'x'): success_callback: must be a list of callback names",
        ),
        (
            {"default_team_settings": [_seed_entry(langfuse_secret=12345)]},
            "(team_id 'x'): langfuse_secret: must be a string (got int)",
        ),
        (
            {"default_team_settings": [_seed_entry(logging_enabled="no")]},
            "(team_id 'x'): logging_enabled: Input should be a valid boolean",
        ),
        (
            {"default_team_settings": [_seed_entry(cache_ttl_seconds=0)]},
            "(team_id 'x'): cache_ttl_seconds: Input should be greater than or equal to 1",
        ),
        (
            {"default_team_settings": [_seed_entry(message_logging="some")]},
            "(team_id 'x'): message_logging: Input should be 'full' or 'metadata_only'",
        ),
        (
            {"default_team_settings": [_seed_entry(langfuse_host="ftp://x")]},
            "(team_id 'x'): langfuse_host: must start with http:// or https://",
        ),
        (
            {"default_team_settings": [_seed_entry(callbacks={"callback_name": "jsonl"})]},
            "(team_id 'x'): callbacks: must be a list of callback entries (got dict)",
        ),
        (
            {
                "default_team_settings": [
                    _seed_entry(
                        callbacks=[
                            {
                                "callback_name": "langfuse",
                                "callback_vars": {
                                    "langfuse_public_key": "p",
                                    "langfuse_secret_key": SECRET,
                                    "langfuse_sekret": SECRET,
                                },
                            }
                        ]
                    )
                ]
            },
            "(team_id 'x'): callbacks[0].callback_vars.langfuse_sekret: unknown var for "
            "callback 'langfuse'",
        ),
        (
            {"default_callbacks": [{"callback_name": "nope"}]},
            "default_callbacks[0]: callback_name: unknown callback 'nope'; registered: [",
        ),
        (
            {"default_callbacks": [{"callback_name": "jsonl", "callback_typ": "success"}]},
            "default_callbacks[0]: unknown field 'callback_typ'; allowed: ['callback_name', ",
        ),
        (
            {
                "default_callbacks": [
                    {
                        "callback_name": "langfuse",
                        "callback_vars": {"langfuse_public_key": "p", "langfuse_secret_key": 9},
                    }
                ]
            },
            "default_callbacks[0]: callback_vars.langfuse_secret_key: Input should be a valid "
            "string",
        ),
        ({"default_callbacks": "jsonl"}, "default_callbacks: must be a list"),
        ({"default_callback": []}, "unknown field 'default_callback' (did you mean"),
        ({"team_logging": {"env_allowlists": []}}, "team_logging: unknown field"),
        ({"team_logging": {"env_allowlist": "LF_*"}}, "team_logging.env_allowlist: must be"),
        ({"team_logging": {"log_unknown_callers": "yes"}}, "log_unknown_callers: must be"),
        ({"team_logging": ["x"]}, "team_logging: must be a mapping"),
        ({"litellm_settings": ["x"]}, "litellm_settings: must be a mapping"),
        (
            {"model_list": [], "litellm_settings": {"default_team_setting": []}},
            "litellm_settings: unknown field 'default_team_setting' (did you mean",
        ),
        # A LiteLLM file ignores unknown sections but still catches a misspelling of ours.
        ({"model_list": [], "default_team_setting": []}, "did you mean 'default_team_settings'"),
    ],
)
def test_wrong_shapes_are_located_and_never_echo_a_secret(data: Any, expected: str) -> None:
    err = _error(data)
    assert expected in err.message
    _assert_no_secret(err)


def test_a_validator_that_echoes_a_secret_is_scrubbed() -> None:
    def leaky(vars_: Mapping[str, str]) -> None:
        raise SettingsError(f"bad secret {vars_['langfuse_secret_key']}")

    registry = SinkRegistry(
        [
            SinkType(
                "langfuse",
                _unbuildable,
                required_vars=frozenset({"langfuse_public_key", "langfuse_secret_key"}),
                aliases={"langfuse_secret": "langfuse_secret_key"},
                validate_vars=leaky,
            )
        ]
    )
    with pytest.raises(ConfigFileError) as flat:
        StaticConfig.from_dict({"default_team_settings": [_seed_entry()]}, registry)
    _assert_no_secret(flat.value)
    assert "bad secret ****" in flat.value.message
    with pytest.raises(ConfigFileError) as rich:
        StaticConfig.from_dict(
            {
                "default_callbacks": [
                    {
                        "callback_name": "langfuse",
                        "callback_vars": {
                            "langfuse_public_key": "p",
                            "langfuse_secret_key": SECRET,
                        },
                    }
                ]
            },
            registry,
        )
    _assert_no_secret(rich.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("default_callback: []\n", encoding="utf-8")
    with pytest.raises(ConfigFileError) as info:
        StaticConfig.load(path, _registry())
    assert info.value.message.startswith(f"{path}: top level: unknown field 'default_callback'")
    assert info.value.param == "default_callback"

    with pytest.raises(ConfigFileError, match="cannot read the config file"):
        StaticConfig.load(tmp_path / "missing.yaml", _registry())


def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "default_team_settings:\n"
        "  - team_id: x\n"
        f'    langfuse_secret_key: "{SECRET}\n'  # unterminated quote
        "    other: [\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigFileError) as info:
        StaticConfig.load(path, _registry())
    assert "invalid YAML at line" in info.value.message
    _assert_no_secret(info.value)
