"""The policy file: the shipped example loads, every validation rule fails with its message,
warnings are returned (not raised), and `tritonpilot check` exits 0 or 2 accordingly."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pydantic
import pytest
import yaml

from tritonpilot.cli import main
from tritonpilot.control.policy import (
    BUILTIN_PROFILES,
    ModelOverride,
    ModelSettings,
    PolicyError,
    load_policy,
    parse_flag_bool,
    parse_flag_int,
    parse_policy,
    policy_warnings,
    resolve,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "policy.example.yaml"


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(yaml.safe_load(dedent(text)))
    return info.value.problems


def warnings_of(text: str) -> list[str]:
    return policy_warnings(parse_policy(yaml.safe_load(dedent(text))))


def test_the_shipped_example_loads_and_resolves() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.triton.grpc == "127.0.0.1:8001"
    assert policy.triton.metrics_url == "http://127.0.0.1:8002/metrics"
    assert policy.proxy.listen == "0.0.0.0:8101"
    assert policy.metrics.listen == "127.0.0.1:9101"
    assert policy.control.interval_s == 1 and policy.control.dry_run is False
    assert (policy.control.max_concurrent_reloads, policy.control.max_reloads_per_minute) == (1, 6)
    assert parse_policy({"control": {"max_reloads_per_minute": None}}).control.max_reloads_per_minute is None
    assert policy_warnings(policy) == []
    resolved = resolve(policy)
    assert list(resolved) == ["license_plate_restoration"]
    lpr = resolved["license_plate_restoration"]
    assert (lpr.min_instances, lpr.max_instances) == (1, 3)  # override
    assert lpr.target_inflight_per_instance == 1 and lpr.scale_up_delay_s == 5 and lpr.scale_down_delay_s == 60
    assert [lpr.profile_for(n).name for n in (1, 2, 3)] == ["single", "multi", "multi"]
    assert lpr.profile_for(2).parameters == {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}


def test_an_empty_file_is_all_defaults_and_warns_that_nothing_is_controlled() -> None:
    policy = parse_policy(None)
    assert policy == parse_policy({})
    assert resolve(policy) == {}
    assert policy.defaults.profiles == BUILTIN_PROFILES
    assert any(w.startswith("models: got {}; no model is controlled") for w in policy_warnings(policy))


def test_builtin_profiles_apply_when_profiles_is_absent() -> None:
    m = resolve(parse_policy({"models": {"m": None}}))["m"]
    assert m.profiles == BUILTIN_PROFILES
    assert m.profile_for(1).parameters == {"INFERENCE_MODE": "true"}
    assert m.profile_for(7).parameters == {"INFERENCE_MODE": "true", "DISABLE_OPTIMIZED_EXECUTION": "true"}


def test_model_overrides_merge_over_defaults_key_by_key() -> None:
    policy = parse_policy(yaml.safe_load("""
        defaults: {max_instances: 6, scale_down_delay_s: 30}
        models:
          a: {min_instances: 2, profiles: [{name: only, instances: [1, null]}]}
          b: {}
        control: {reload_strategy: auto, failed_config_backoff_s: 60}
    """))
    a, b = resolve(policy)["a"], resolve(policy)["b"]
    assert (a.min_instances, a.max_instances, a.scale_down_delay_s) == (2, 6, 30)
    assert [p.name for p in a.profiles] == ["only"]
    assert (b.min_instances, b.max_instances) == (1, 6) and b.profiles == BUILTIN_PROFILES
    assert a.reload_strategy == "auto" and a.failed_config_backoff_s == 60


def test_override_keys_are_exactly_the_default_keys() -> None:
    # max_inflight is the proxy's: its default is proxy.max_inflight, for every model.
    assert set(ModelOverride.model_fields) - {"max_inflight"} == set(ModelSettings.model_fields)


def test_policy_objects_are_frozen() -> None:
    policy = parse_policy({})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        policy.control.interval_s = 5  # type: ignore[misc]
    assert policy.control.interval_s == 1


# --- every validation rule, with its message ---------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("models: {resnet: {max_instances: 0}}", "models.resnet.max_instances: got 0; must be >= 1"),
    ("defaults: {min_instances: 0}", "defaults.min_instances: got 0; must be >= 1"),
    ("defaults: {min_instances: 1.5}", "defaults.min_instances: got 1.5; must be an integer"),
    ("defaults: {target_inflight_per_instance: 0}", "defaults.target_inflight_per_instance: got 0; must be > 0"),
    ("defaults: {scale_up_delay_s: -1}", "defaults.scale_up_delay_s: got -1; must be >= 0"),
    ("defaults: {panic_threshold_ratio: 1}", "defaults.panic_threshold_ratio: got 1; must be > 1"),
    ("defaults: {gpu_utilization_ceiling_ratio: 1.5}", "defaults.gpu_utilization_ceiling_ratio: got 1.5; must be <= 1"),
    ("defaults: {gpu_memory_headroom_ratio: 1}", "defaults.gpu_memory_headroom_ratio: got 1; must be < 1"),
    ("defaults: {tolerance_ratio: two}", "defaults.tolerance_ratio: got 'two'; must be a number"),
    ("control: {interval_s: 0}", "control.interval_s: got 0; must be > 0"),
    ("control: {dry_run: 3}", "control.dry_run: got 3; must be true or false"),
    ("control: {reload_strategy: fast}",
     "control.reload_strategy: got 'fast'; must be one of 'full', 'update' or 'auto'"),
    ("control: {max_concurrent_reloads: 0}", "control.max_concurrent_reloads: got 0; must be >= 1"),
    ("control: {max_reloads_per_minute: 0}", "control.max_reloads_per_minute: got 0; must be >= 1"),
    ("control: {max_reloads_per_minute: 2.5}", "control.max_reloads_per_minute: got 2.5; must be an integer"),
    ("logging: {format: xml}", "logging.format: got 'xml'; must be one of 'console' or 'json'"),
    ("triton: {grpc: localhost}",
     "triton.grpc: got 'localhost'; must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:8001"),
    ("proxy: {listen: '0.0.0.0:99999'}", "proxy.listen: got '0.0.0.0:99999'; must be HOST:PORT"),
    ("triton: {metrics_url: '127.0.0.1:8002'}", "triton.metrics_url: got '127.0.0.1:8002'; must be an http://"),
    ("proxy: {max_message_bytes: 0}", "proxy.max_message_bytes: got 0; must be >= 1"),
    ("proxy: {max_connections: 0}", "proxy.max_connections: got 0; must be >= 1"),
    ("proxy: {idle_timeout_s: -1}", "proxy.idle_timeout_s: got -1; must be > 0"),
    ("proxy: {tls: {cert: a.pem}}", "proxy.tls.key: missing; required"),
    ("proxy: {tls: {cert: a, key: b, ca: c}}",
     "proxy.tls.ca: got 'c'; unknown key; allowed here: cert, key, client_ca"),
    ("models: {a: {max_instance: 2}}",
     "models.a.max_instance: got 2; unknown key; did you mean max_instances? allowed here: min_instances"),
    ("control: {intervall_s: 1}", "control.intervall_s: got 1; unknown key; did you mean interval_s?"),
    ("bogus: 1", "bogus: got 1; unknown key; allowed here: triton, proxy, metrics, control, logging, defaults"),
    ("defaults: {profiles: [{name: x, instance: [1, null]}]}",
     "defaults.profiles[0].instance: got [1, None]; unknown key; did you mean instances?"),
    ("defaults: {profiles: [{instances: [1, null]}]}", "defaults.profiles[0].name: missing; required"),
    ("defaults: {profiles: []}", "defaults.profiles: got []; must have at least 1 item(s)"),
    ("defaults: {profiles: [{name: 'a b', instances: [1, null]}]}", "defaults.profiles[0].name: got 'a b'; must match"),
    ("models: [a, b]", "models: got ['a', 'b']; must be a mapping"),
    ("models: {'x/y': {}}", "model names must be non-empty and contain no '/'"),
])
def test_each_value_rule_names_key_value_and_what_is_allowed(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_duplicate_profile_names_are_named() -> None:
    problems = problems_of("defaults: {profiles: [{name: a, instances: [1, 1]}, {name: a, instances: [2, null]}]}")
    assert any("profile names must be unique; repeated: a" in p for p in problems), problems


@pytest.mark.parametrize("value", ["yes", "no", "enabled", "tru", " true", ""])
def test_a_flag_value_triton_cannot_parse_as_boolean_is_an_error(value: str) -> None:
    problems = problems_of(f"""
        defaults:
          profiles:
            - {{name: single, instances: [1, 1], parameters: {{INFERENCE_MODE: "true"}}}}
            - {{name: multi, instances: [2, null], parameters: {{INFERENCE_MODE: "{value}"}}}}
    """)
    assert problems == [f"defaults.profiles[1].parameters.INFERENCE_MODE: got {value!r}; Triton parses only "
                        "true/on/1/false/off/0 (case-insensitive) and would fail the load"]


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("On", True), ("1", True),
    ("false", False), ("OFF", False), ("0", False), ("yes", None), (" true", None),
])
def test_flag_booleans_parse_as_triton_does(value: str, expected: bool | None) -> None:
    assert parse_flag_bool(value) is expected


@pytest.mark.parametrize("value, expected", [("4", 4), ("4x", 4), (" 8", 8), ("-1", -1), ("x4", None), ("", None),
                                             ("99999999999", None)])
def test_thread_counts_parse_as_std_stoi_does(value: str, expected: int | None) -> None:
    assert parse_flag_int(value) == expected


def test_an_unquoted_yaml_boolean_flag_is_an_error_that_says_quote_it() -> None:
    problems = problems_of("defaults: {profiles: [{name: a, instances: [1, null], parameters: {INFERENCE_MODE: yes}}]}")
    assert problems == ["defaults.profiles[0].parameters.INFERENCE_MODE: got True; must be a quoted string such as "
                        "\"true\": Triton reads only string_value, and YAML reads unquoted yes/no/on/off as booleans"]


def test_an_unquoted_integer_flag_is_taken_as_its_digits() -> None:
    m = resolve(parse_policy(yaml.safe_load(
        "models: {m: {profiles: [{name: a, instances: [1, null], parameters: {INTRA_OP_THREAD_COUNT: 4}}]}}")))["m"]
    assert m.profiles[0].parameters == {"INTRA_OP_THREAD_COUNT": "4"}


def test_a_thread_count_stoi_cannot_read_is_an_error() -> None:
    problems = problems_of("defaults: {profiles: [{name: a, instances: [1, null], "
                           "parameters: {INTER_OP_THREAD_COUNT: 'four'}}]}")
    assert problems == ["defaults.profiles[0].parameters.INTER_OP_THREAD_COUNT: got 'four'; must be an integer: "
                        "Triton parses it with std::stoi and would fail the load"]


def test_the_generation_parameter_is_reserved() -> None:
    problems = problems_of("defaults: {profiles: [{name: a, instances: [1, null], "
                           "parameters: {tritonpilot_generation: '1'}}]}")
    assert problems[0].startswith("defaults.profiles[0].parameters.tritonpilot_generation: got '1'; "
                                  "tritonpilot_generation is reserved")


def test_min_above_max_is_an_error_at_the_key_that_set_it() -> None:
    assert problems_of("models: {resnet: {min_instances: 5}}") == [
        "models.resnet.min_instances: got 5; must be <= defaults.max_instances (4) for models.resnet"]
    assert problems_of("models: {resnet: {min_instances: 3, max_instances: 2}}") == [
        "models.resnet.min_instances: got 3; must be <= models.resnet.max_instances (2)"]
    # Inherited by every model: said once, at the defaults.
    assert problems_of("defaults: {min_instances: 3, max_instances: 2}\nmodels: {a: {}, b: {}}") == [
        "defaults.min_instances: got 3; must be <= defaults.max_instances (2)"]


def test_a_profile_range_with_lo_above_hi_is_an_error() -> None:
    assert problems_of("defaults: {profiles: [{name: a, instances: [3, 1]}]}") == [
        "defaults.profiles[0].instances: got [3, 1]; lo must be <= hi (write [lo, null] for no upper bound)"]


@pytest.mark.parametrize("instances", ["[0, 2]", "[1]", "[1, 2, 3]", "'1-2'", "[1.5, null]", "[null, 2]"])
def test_a_malformed_profile_range_is_an_error(instances: str) -> None:
    problems = problems_of(f"defaults: {{profiles: [{{name: a, instances: {instances}}}]}}")
    assert problems[0].startswith("defaults.profiles[0].instances: got ")
    assert problems[0].endswith("must be [lo, hi] with integers 1 <= lo <= hi (hi null for no upper bound)")


def test_counts_no_profile_rule_covers_are_named() -> None:
    problems = problems_of("""
        defaults:
          max_instances: 6
          profiles:
            - {name: one, instances: [1, 1]}
            - {name: few, instances: [3, 4]}
    """)
    assert problems == [
        "defaults.profiles: got rules covering one [1, 1], few [3, 4]; instance counts 2, 5-6 in [1, 6] "
        "(defaults.min_instances, defaults.max_instances) match no rule; every count in [min_instances, "
        "max_instances] needs one (the first rule whose range holds it wins)"]


def test_a_model_whose_max_outgrows_the_default_rules_is_named() -> None:
    problems = problems_of("""
        defaults:
          profiles: [{name: small, instances: [1, 4]}]
        models:
          big: {max_instances: 8}
    """)
    assert len(problems) == 1
    assert problems[0].startswith("defaults.profiles (used by models.big): got rules covering small [1, 4]; "
                                  "instance counts 5-8 in [1, 8] (defaults.min_instances, models.big.max_instances)")


def test_thread_counts_differing_between_models_are_an_error() -> None:
    problems = problems_of("""
        defaults:
          profiles: [{name: a, instances: [1, null], parameters: {INTRA_OP_THREAD_COUNT: "4"}}]
        models:
          m1: {}
          m2: {profiles: [{name: b, instances: [1, null], parameters: {INTRA_OP_THREAD_COUNT: "8"}}]}
    """)
    assert problems == [
        "models.m2.profiles[0].parameters.INTRA_OP_THREAD_COUNT: got '8'; must equal 4 as set at "
        "defaults.profiles[0].parameters.INTRA_OP_THREAD_COUNT: Triton applies INTRA_OP_THREAD_COUNT once per "
        "server process (the first model loaded wins), so a different value never takes effect"]


def test_equal_thread_counts_across_models_are_fine() -> None:
    policy = parse_policy(yaml.safe_load(dedent("""
        defaults:
          profiles: [{name: a, instances: [1, null], parameters: {INTER_OP_THREAD_COUNT: "2"}}]
        models: {m1: {}, m2: {profiles: [{name: b, instances: [1, null], parameters: {INTER_OP_THREAD_COUNT: "2"}}]}}
    """)))  # no PolicyError
    assert policy_warnings(policy) == []
    resolved = resolve(policy)
    assert [resolved[m].profile_for(1).parameters for m in ("m1", "m2")] == [{"INTER_OP_THREAD_COUNT": "2"}] * 2


def test_max_signal_age_below_the_interval_is_an_error() -> None:
    assert problems_of("control: {interval_s: 10, max_signal_age_s: 5}") == [
        "control.max_signal_age_s: got 5.0; must be >= control.interval_s (10.0), or every tick would see no data"]


def test_every_problem_is_listed_at_once() -> None:
    problems = problems_of("""
        triton: {grpc: nowhere}
        defaults:
          min_instances: 5
          profiles:
            - {name: a, instances: [1, null], parameters: {INFERENCE_MODE: "maybe"}}
        models:
          resnet: {max_instances: 0}
    """)
    assert problems == [
        "triton.grpc: got 'nowhere'; must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:8001",
        "models.resnet.max_instances: got 0; must be >= 1",
        "defaults.profiles[0].parameters.INFERENCE_MODE: got 'maybe'; Triton parses only true/on/1/false/off/0 "
        "(case-insensitive) and would fail the load",
        "defaults.min_instances: got 5; must be <= defaults.max_instances (4)",
    ]


def test_a_top_level_that_is_not_a_mapping_is_an_error() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(["a"])
    assert info.value.problems[0].startswith("(top level): got ['a']; must be a mapping of sections")


def test_yaml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("defaults:\n  max_instances: 2\n  profiles: [\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems[0].startswith(f"{path}:4:1: YAML syntax error: ")


def test_duplicate_yaml_keys_are_an_error_not_silently_the_last(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  a: {max_instances: 2}\n  a: {max_instances: 3}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems[0].startswith(f"{path}:3:3: YAML syntax error: found duplicate key 'a' "
                                             "(first at line 2)")


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read the policy file: No such file or directory"]


# --- warnings: returned, not raised --------------------------------------------------------

def test_an_unknown_flag_key_is_a_warning_with_a_suggestion() -> None:
    warnings = warnings_of("""
        defaults:
          profiles: [{name: a, instances: [1, null], parameters: {INFERENCE_MOD: "true"}}]
        models: {m: {}}
    """)
    assert len(warnings) == 1
    assert warnings[0].startswith("defaults.profiles[0].parameters.INFERENCE_MOD: got 'true'; INFERENCE_MOD is "
                                  "not a PyTorch-backend flag (did you mean INFERENCE_MODE? known: DISABLE_CUDNN")


def test_process_global_jit_flags_differing_between_models_are_a_warning() -> None:
    warnings = warnings_of("""
        defaults:
          profiles: [{name: a, instances: [1, null], parameters: {ENABLE_TENSOR_FUSER: "false"}}]
        models:
          m1: {}
          m2: {profiles: [{name: b, instances: [1, null], parameters: {ENABLE_TENSOR_FUSER: "true"}}]}
          m3: {profiles: [{name: c, instances: [1, null]}]}
    """)
    assert warnings == [
        "defaults.profiles[0].parameters.ENABLE_TENSOR_FUSER: got 'false'; the controlled models run "
        "ENABLE_TENSOR_FUSER with different values (models.m1: false, models.m2: true, models.m3: unset), and it "
        "is process-global in libtorch: models in one Triton overwrite each other's setting on every execute; "
        "give every model the same value"]


def test_process_global_flags_equal_as_triton_reads_them_are_fine() -> None:
    assert warnings_of("""
        defaults:
          profiles: [{name: a, instances: [1, null], parameters: {ENABLE_JIT_PROFILING: "true"}}]
        models:
          m1: {}
          m2: {profiles: [{name: b, instances: [1, null], parameters: {ENABLE_JIT_PROFILING: "ON"}}]}
    """) == []


def test_thread_count_oddities_and_removed_flags_are_warnings() -> None:
    warnings = warnings_of("""
        defaults:
          profiles: [{name: a, instances: [1, null],
                      parameters: {INTRA_OP_THREAD_COUNT: "4x", ENABLE_NVFUSER: "true"}}]
        models: {m: {}}
    """)
    assert "defaults.profiles[0].parameters.INTRA_OP_THREAD_COUNT: got '4x'; std::stoi reads it as 4 and ignores " \
           "the rest" in warnings
    assert any(w.startswith("defaults.profiles[0].parameters.ENABLE_NVFUSER: got 'true'; ENABLE_NVFUSER was "
                            "removed in Triton 23.12") for w in warnings)


def test_a_rule_earlier_rules_shadow_is_a_warning() -> None:
    warnings = warnings_of("""
        defaults:
          profiles:
            - {name: any, instances: [1, null]}
            - {name: multi, instances: [2, null]}
        models: {m: {}}
    """)
    assert warnings == ["defaults.profiles[1].instances: got [2, None]; rule 'multi' never wins: earlier rules "
                        "take every count it holds"]


# --- tritonpilot check ---------------------------------------------------------------------

def test_check_prints_the_resolved_policy_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "model license_plate_restoration" in out
    assert "instances 1..3, target 1 in flight per instance" in out
    assert "up after 5s, down after 60s" in out
    assert "    1: single  INFERENCE_MODE=true" in out
    assert "    3: multi  INFERENCE_MODE=true DISABLE_OPTIMIZED_EXECUTION=true" in out
    assert err == ""


def test_check_prints_every_error_and_exits_2_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  resnet: {max_instances: 0}\n"
                    "defaults:\n  profiles: [{name: a, instances: [1, null], parameters: {INFERENCE_MODE: 'yes'}}]\n")
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: invalid policy, 2 problems:" in err
    assert "  - models.resnet.max_instances: got 0; must be >= 1" in err
    assert "  - defaults.profiles[0].parameters.INFERENCE_MODE: got 'yes'" in err
    assert "Traceback" not in err


def test_check_on_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read the policy file" in capsys.readouterr().err


def test_check_prints_warnings_and_fails_on_them_only_with_strict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "warn.yaml"
    path.write_text("models:\n  m:\n    profiles: [{name: a, instances: [1, null], parameters: {FOO: 'x'}}]\n")
    assert main(["check", str(path)]) == 0
    assert "FOO is not a PyTorch-backend flag" in capsys.readouterr().err
    assert main(["check", "--strict", str(path)]) == 2


def test_check_prints_the_pod_wide_reload_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text("control: {max_concurrent_reloads: 2, max_reloads_per_minute: null}\nmodels: {m: {}}\n")
    assert main(["check", str(path)]) == 0
    assert "reload budget, all models together: at most 2 in progress, unlimited started per minute" in (
        capsys.readouterr().out.splitlines())


def test_check_example_validates_the_shipped_example_and_prints_its_path(capsys: pytest.CaptureFixture[str]) -> None:
    from tritonpilot import resources
    assert main(["check", "--example"]) == 0
    shipped = str(resources.deploy_file(resources.EXAMPLE_POLICY))
    assert capsys.readouterr().out.splitlines()[0] == f"{shipped}: valid"
    assert Path(shipped).read_text() == EXAMPLE.read_text()


def test_check_needs_exactly_one_of_a_file_or_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2
    assert main(["check", "--example", str(EXAMPLE)]) == 2
    assert capsys.readouterr().err.count("give either a policy FILE or --example") == 2
