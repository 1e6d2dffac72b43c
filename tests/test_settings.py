"""The settings declaration: every Settings field is declared once and parsed by its declaration;
every bad value is reported before anything runs, at once, one line each naming the variable, the
value and what to write instead; the CLI prints them without a traceback and exits 2; `settings`
tells which API key each LLM backend will send, never a key."""

import hashlib
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
from dagster import DagsterInstance
from pipeline import tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.settings import SETTINGS, NeuronSelection, Settings, SettingsError, markdown_table, secret_shown

BIN = Path(sys.executable).parent


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`neuron-assets ARGS` with only `env`'s settings (no NEURON_ASSETS_* or OPENAI_* of the
    caller's), its Dagster home and storage under `tmp_path` unless `env` says otherwise."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NEURON_ASSETS_", "OPENAI_", "DAGSTER_"))}
    clean |= {"DAGSTER_HOME": str(tmp_path / "home"), "NEURON_ASSETS_STORAGE": str(tmp_path / "data"), **env}
    return subprocess.run([str(BIN / "neuron-assets"), *args], env=clean, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_every_field_is_declared_once_and_the_defaults_parse():
    declared = [s.field for s in SETTINGS if s.field in {f.name for f in fields(Settings)}]
    assert sorted(declared) == sorted(f.name for f in fields(Settings))
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    settings = Settings.from_env({})
    assert (settings.seq_len, settings.control, settings.workers) == (64, "shuffled", 1)
    assert Path(settings.storage).is_absolute() and Path(settings.prices).is_file()
    assert Settings.from_env(settings.environment()) == settings  # what a step process reads back


def test_every_bad_value_is_one_line_naming_the_variable_and_what_to_write():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"NEURON_ASSETS_SEQ_LEN": "1", "NEURON_ASSETS_SHARDS": "many",
                           "NEURON_ASSETS_CONTROL": "random", "NEURON_ASSETS_SEED": "-1",
                           "NEURON_ASSETS_PG_PORT": "postgres"})  # read by Dagster's yaml, checked here too
    assert e.value.problems == [
        "NEURON_ASSETS_SEQ_LEN=1 must be at least 2",
        "NEURON_ASSETS_SHARDS='many' is not a whole number: write one between 1 and 99",
        "NEURON_ASSETS_SEED=-1 must be at least 0",
        "NEURON_ASSETS_CONTROL='random': use 'shuffled' or 'none'",
        "NEURON_ASSETS_PG_PORT='postgres' is not a whole number: write one between 1 and 65535",
    ]


@pytest.mark.parametrize("value, problem", [
    ("1", "must be at least 0 and under 1, as in '1e-5' (0: only dead units are skipped)"),
    ("-0.1", "must be at least 0 and under 1, as in '1e-5' (0: only dead units are skipped)"),
    ("nan", "must be at least 0 and under 1, as in '1e-5' (0: only dead units are skipped)"),
    ("often", "not a number: write a share of tokens from 0 up to (not including) 1, as in '1e-5'"),
])
def test_a_bad_activation_frequency_says_what_a_share_is(value, problem):
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY": value})
    assert e.value.problems == [f"NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY={value!r}: {problem}"]


def test_an_activation_frequency_is_versioned_in_one_spelling():
    spellings = ("0.00001", "1e-5", " 1E-05 ")
    assert {Settings.from_env({"NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY": v}).min_activation_frequency
            for v in spellings} == {"1e-05"}
    assert Settings.from_env({"NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY": "0"}).min_activation_frequency == "0"


TOP = "'top:N:max', 'top:N:kurtosis' or 'top:N:sparsity'"
FIX = ("write 'all', 'first:N' (the first N neurons of each shard), 'list:3,17,1200' (neurons by layer index) "
       f"or 'top:N:<statistic>' (the N neurons of each shard ranked first by an activation statistic: {TOP})")


@pytest.mark.parametrize("spec, problem", [
    ("garbage", FIX),
    ("ALL", FIX),
    ("first", FIX),
    ("first:-1", "N of 'first:N' must be a whole number of at least 1, as in 'first:10'"),
    ("first:0", "N of 'first:N' must be a whole number of at least 1, as in 'first:10'"),
    ("list:", "lists no neuron: write layer indices, as in 'list:3,17,1200'"),
    ("list:3,x", "'x' is not a neuron index: list whole numbers from 0, as in 'list:3,17,1200'"),
    ("list:3,,5", "an empty entry is not a neuron index: list whole numbers from 0, as in 'list:3,17,1200'"),
    ("list:-1,2.5", "'-1', '2.5' are not neuron indices: list whole numbers from 0, as in 'list:3,17,1200'"),
    ("list:5,3,5", "names neuron(s) 5 more than once: name each neuron once"),
    ("top", FIX),
    ("top:3", f"names no statistic: write {TOP}"),
    ("top:3:", f"names no statistic: write {TOP}"),
    ("top:3:mean", f"'mean' is not a statistic to rank neurons by: write {TOP}"),
    ("top:3:Max", f"'Max' is not a statistic to rank neurons by: write {TOP}"),
    ("top:0:max", f"N of 'top:N:<statistic>' must be a whole number of at least 1: write {TOP}, as in 'top:10:kurtosis'"),
    ("top:kurtosis", f"N of 'top:N:<statistic>' must be a whole number of at least 1: write {TOP}, "
                     "as in 'top:10:kurtosis'"),
    ("top:3:max:x", f"'max:x' is not a statistic to rank neurons by: write {TOP}"),
])
def test_a_bad_neuron_selection_fails_with_the_settings(spec, problem):
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"NEURON_ASSETS_NEURONS": spec})
    assert e.value.problems == [f"NEURON_ASSETS_NEURONS={spec!r}: {problem}"]


def test_a_neuron_selection_is_kept_in_one_spelling_and_selects_per_shard():
    assert Settings.from_env({"NEURON_ASSETS_NEURONS": " list: 17, 3 "}).neurons == "list:3,17"
    assert Settings.from_env({"NEURON_ASSETS_NEURONS": "first: 2"}).neurons == "first:2"
    shard = range(16, 32)
    assert NeuronSelection.parse("all").of_shard(shard) == list(shard)
    assert NeuronSelection.parse("first:2").of_shard(shard) == [16, 17]
    assert NeuronSelection.parse("first:99").of_shard(shard) == list(shard)
    assert NeuronSelection.parse("list:3,17,31,32").of_shard(shard) == [17, 31]


@pytest.mark.parametrize("spec,canonical", [("top:3:kurtosis", "top:3:kurtosis"), (" top: 10 :max ", "top:10:max"),
                                            ("top:007:sparsity", "top:7:sparsity")])
def test_a_ranked_selection_is_kept_in_one_spelling_that_parses_back(spec, canonical):
    assert Settings.from_env({"NEURON_ASSETS_NEURONS": spec}).neurons == canonical
    selection = NeuronSelection.parse(spec)
    assert (selection.mode, selection.numbers) == ("top", (int(canonical.split(":")[1]),))
    assert str(NeuronSelection.parse(str(selection))) == canonical
    with pytest.raises(ValueError, match="ranks neurons by their stats"):  # the ranking needs the shard's stats
        selection.of_shard(range(0, 16))


def test_every_other_setting_parsed_downstream_is_checked_with_the_others():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"NEURON_ASSETS_LAYERS": "5-2", "NEURON_ASSETS_DEVICE": "gpu",
                           "NEURON_ASSETS_EXPLAINER_BASE_URL": "127.0.0.1:8000/v1",
                           "NEURON_ASSETS_SIMULATION_METHOD": "json"})
    assert e.value.problems == [
        "NEURON_ASSETS_LAYERS='5-2': the range '5-2' runs backwards: write '2-5'",
        "NEURON_ASSETS_DEVICE='gpu': write 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU number, e.g. 'cuda:0') or 'mps'",
        "NEURON_ASSETS_EXPLAINER_BASE_URL='127.0.0.1:8000/v1': not an http(s) URL: write e.g. "
        "http://127.0.0.1:8000/v1, or leave it empty for OpenAI",
        # valid alone, not with the local simulator (the default backend), which only simulates all at once
        "NEURON_ASSETS_SIMULATION_METHOD='json': the local simulator backend simulates all_at_once only; "
        "write 'auto' or 'all_at_once', or set NEURON_ASSETS_SIMULATOR_BACKEND=openai",
    ]
    with pytest.raises(SettingsError, match=r"^NEURON_ASSETS_LAYERS='0,x': 'x' is not a layer number or range"):
        Settings.from_env({"NEURON_ASSETS_LAYERS": "0,x"})
    good = Settings.from_env({"NEURON_ASSETS_LAYERS": "0-2,7", "NEURON_ASSETS_DEVICE": "cuda:1",
                              "NEURON_ASSETS_SIMULATOR_BACKEND": "openai", "NEURON_ASSETS_SIMULATION_METHOD": "json"})
    assert (good.layers, good.device, good.simulation_method) == ("0-2,7", "cuda:1", "json")


def test_the_price_table_is_checked_when_an_openai_backend_will_read_it(tmp_path):
    (tmp_path / "prices.json").write_text('["gpt-4o-mini", 0.15]')  # JSON, but not a table of prices
    for prices in (tmp_path / "missing.json", tmp_path / "prices.json"):
        env = {"NEURON_ASSETS_PRICES": str(prices)}
        assert Settings.from_env(env).prices == str(prices)  # the local backends never read it
        with pytest.raises(SettingsError) as e:
            Settings.from_env({**env, "NEURON_ASSETS_EXPLAINER_BACKEND": "openai"})
        [problem] = e.value.problems
        assert problem.startswith(f"NEURON_ASSETS_PRICES={str(prices)!r}: the openai backend cannot read this price table")
        assert problem.endswith("point it at a JSON object like resources/prices.json")


@pytest.mark.parametrize("command", [["demo", "--layers", "00"], ["refresh", "--missing"], ["explore", "a text"],
                                     ["scores"], ["audit", "0", "3"]], ids=lambda command: command[0])
def test_every_command_stops_on_bad_settings_with_exit_status_2_before_anything_runs(tmp_path, command):
    done = cli(tmp_path, *command, NEURON_ASSETS_NEURONS="garbage", NEURON_ASSETS_SEQ_LEN="1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["neuron-assets: NEURON_ASSETS_SEQ_LEN=1 must be at least 2",
                                        f"neuron-assets: NEURON_ASSETS_NEURONS='garbage': {FIX}"]
    assert done.stdout == ""  # no traceback, no banner: the demo did not start
    assert not (tmp_path / "data").exists() and not (tmp_path / "home").exists()  # nothing was written


def test_the_settings_command_shows_every_value_then_names_the_bad_ones(tmp_path):
    done = cli(tmp_path, "settings", NEURON_ASSETS_NEURONS="first:-1")
    assert done.returncode == 2
    assert "NEURON_ASSETS_NEURONS=first:-1\n" in done.stdout and "NEURON_ASSETS_PG_DB=" in done.stdout
    assert done.stderr == ("neuron-assets: NEURON_ASSETS_NEURONS='first:-1': N of 'first:N' must be a whole "
                           "number of at least 1, as in 'first:10'\n")


@pytest.mark.parametrize("env, shown", [
    ({}, "(unset; no key is used: the simulator backend is 'local')"),
    ({"NEURON_ASSETS_SIMULATOR_API_KEY": "sk-own"}, "(set; no key is used: the simulator backend is 'local')"),
    ({"NEURON_ASSETS_SIMULATOR_BACKEND": "openai"}, "(unset, and so is OPENAI_API_KEY: the simulator sends no key)"),
    ({"NEURON_ASSETS_SIMULATOR_BACKEND": "openai", "OPENAI_API_KEY": "sk-shared"},
     "(unset: OPENAI_API_KEY will be used)"),
    ({"NEURON_ASSETS_SIMULATOR_BACKEND": "openai", "OPENAI_API_KEY": "sk-shared", "NEURON_ASSETS_SIMULATOR_API_KEY": "sk-own"},
     "(set: the simulator uses it)"),
])
def test_the_key_shown_is_the_key_the_backend_sends(monkeypatch, env, shown):
    from neuron_assets.definitions import _api_key

    [setting] = [s for s in SETTINGS if s.env == "NEURON_ASSETS_SIMULATOR_API_KEY"]
    assert secret_shown(setting, env) == shown
    for name in ("NEURON_ASSETS_SIMULATOR_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sent = _api_key("simulator")  # what the definitions give the openai backend, by name
    expected = next((name for name in ("NEURON_ASSETS_SIMULATOR_API_KEY", "OPENAI_API_KEY") if name in env), None)
    assert (sent and sent.env_var_name) == expected


def test_the_settings_command_says_which_key_each_backend_uses_and_never_prints_one(tmp_path):
    done = cli(tmp_path, "settings", NEURON_ASSETS_EXPLAINER_BACKEND="openai", NEURON_ASSETS_EXPLAINER_API_KEY="sk-own-1",
               NEURON_ASSETS_SIMULATOR_BACKEND="openai", OPENAI_API_KEY="sk-shared-2", NEURON_ASSETS_PG_PASSWORD="pw-3")
    assert done.returncode == 0, done.stderr
    assert "NEURON_ASSETS_EXPLAINER_API_KEY=(set: the explainer uses it)\n" in done.stdout
    assert "NEURON_ASSETS_SIMULATOR_API_KEY=(unset: OPENAI_API_KEY will be used)\n" in done.stdout
    assert "NEURON_ASSETS_PG_PASSWORD=(set)\n" in done.stdout
    assert not any(secret in done.stdout + done.stderr for secret in ("sk-own-1", "sk-shared-2", "pw-3"))


def _tables(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_a_selection_of_neurons_the_model_lacks_stops_before_any_run_and_keeps_the_tables(tmp_path):
    from neuron_assets.definitions import build_definitions
    from neuron_assets.runs import materialize_runs

    model = build_tiny_model("gpt2", tmp_path / "gpt2", n_layers=2, max_positions=32)  # 64 neurons per layer
    good = tiny_settings(model, tmp_path, layers="0")
    (tmp_path / "home").mkdir()
    instance = DagsterInstance.local_temp(str(tmp_path / "home"))
    materialize_runs(build_definitions(good), instance, [(("corpus_documents", "corpus_tokens"), None)],
                     log=lambda _: None)
    runs, before = instance.get_runs_count(), _tables(Path(good.storage))
    assert before  # the tables a typo must not touch

    assert build_definitions(replace(good, neurons="list:3,63"))  # the last neuron exists
    with pytest.raises(SettingsError, match=r"NEURON_ASSETS_NEURONS='list:3,64' names neuron\(s\) 64, which the model"):
        build_definitions(replace(good, neurons="list:3,64"))

    done = cli(tmp_path, "demo", "--layers", "00", **{**good.environment(), "NEURON_ASSETS_NEURONS": "list:999999"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "neuron-assets: NEURON_ASSETS_NEURONS='list:999999' names neuron(s) 999999, which the model does not have: "
        "its layers have neurons 0-63; list neurons of that range, or write 'all'"]
    assert "Traceback" not in done.stdout
    assert _tables(Path(good.storage)) == before and instance.get_runs_count() == runs  # nothing ran or changed


def test_the_markdown_table_has_a_row_per_setting_with_its_effect():
    rows = markdown_table().splitlines()[2:]
    assert len(rows) == len(SETTINGS)
    seed = next(r for r in rows if r.startswith("| `NEURON_ASSETS_SEED`"))
    assert "version of `sampling`" in seed
    assert "| none |" in next(r for r in rows if r.startswith("| `NEURON_ASSETS_WORKERS`"))
    # the README's settings table is this one, word for word
    assert markdown_table() in (Path(__file__).resolve().parents[1] / "README.md").read_text()
