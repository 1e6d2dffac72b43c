"""A step keeps an endpoint busy: the LLM stages send the requests of many units at once, and their
tables are those of a serial run, row for row, whatever order the answers arrive in."""

import hashlib
import time

import numpy as np
import polars as pl
import pytest
from oracle_server import OracleServer

from neuron_assets.method.prompts import load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.openai_client import reset_shared_limits
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.detect import SCHEMA as JUDGED, judge_units
from neuron_assets.stages.explain import SCHEMA as EXPLAINED, explain_units
from neuron_assets.stages.revise import REVISED_SCHEMA, revise_units
from neuron_assets.stages.simulate import SCHEMA as SIMULATED, simulate_units
from neuron_assets.stages.variants import explanation_variants

WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta", " iota", " kappa"]
UNITS = 6


class Jittery(OracleServer):
    """The oracle, each answer after 0-10 ms decided by the request's hash: answers of requests sent
    together come back out of order."""

    def _chat(self, body: dict) -> dict:
        time.sleep(hashlib.sha256(repr(body).encode()).digest()[0] / 255 * 0.01)
        return super()._chat(body)


def shard():
    """Unit u's top records peak on word u (the last unit never fires: an error row); 35 windows each."""
    tokens, records = {}, {}
    for unit in range(UNITS):
        first = unit * 35
        for i in range(35):
            tokens[first + i] = [WORDS[(i + j) % len(WORDS)] for j in range(len(WORDS))]
        peak = 0.0 if unit == UNITS - 1 else 4.0
        top = [(first + i, np.array([peak * (1 - i / 40) * (w == WORDS[unit]) for w in tokens[first + i]],
                                    dtype=np.float32)) for i in range(20)]
        random = [(first + 20 + i, np.zeros(len(WORDS), dtype=np.float32)) for i in range(15)]
        records[unit] = {"top": top, "random": random}
    return records, tokens


def quiet(_state) -> None:
    pass


def tables(server, concurrency: int) -> dict[str, pl.DataFrame]:
    """Every LLM stage of one shard through `server`, `concurrency` requests in flight."""
    reset_shared_limits()  # the limits of a base_url are the process's: this run sets its own
    llm = LLM(backend="openai", model="oracle", base_url=server.base_url, simulation_method="json",
              max_concurrency=concurrency, max_retries=0)
    assert llm.requests_per_call >= 16 * concurrency
    records, tokens = shard()
    explainer = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")
    simulator = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")
    first = pl.DataFrame(explain_units(0, list(range(UNITS)), records, tokens, None, llm, explainer, "p", seed=0,
                                       code_version="c", report=quiet).rows, schema=EXPLAINED)
    revised = pl.DataFrame(revise_units(0, first.filter(pl.col("variant") == "llm"), records, tokens, None, llm, llm,
                                        simulator, "p", seed=0, code_version="c", report=quiet).rows,
                           schema=REVISED_SCHEMA)
    variants = explanation_variants([first, revised], f"0|0-{UNITS - 1}", seed=0, control=True)
    simulated = simulate_units(variants, records, tokens, None, llm, simulator, "s", report=quiet)
    judged = judge_units(variants, records, tokens, llm, seed=0, code_version="d", report=quiet)
    return {"explanations": first, "revised": revised, "simulations": pl.DataFrame(simulated.rows, schema=SIMULATED),
            "detection": pl.DataFrame(judged.rows, schema=JUDGED)}


@pytest.fixture(scope="module")
def serial_and_concurrent():
    runs = {}
    with Jittery() as server:  # one server: its base URL is in the rows
        for concurrency in (8, 1):  # concurrent first: its judges learn what the oracle rejects
            server.requests.clear()
            server.max_in_flight = 0
            runs[concurrency] = tables(server, concurrency), server.max_in_flight, len(server.posts())
    return runs


def test_concurrent_requests_write_the_tables_of_a_serial_run(serial_and_concurrent):
    (concurrent, most, requests), (serial, serial_most, serial_requests) = serial_and_concurrent.values()
    assert serial_most == 1 and 1 < most <= 8  # many at once, never over the limit
    # the same requests, and one more: the judges' first request to the oracle, which rejects the
    # logprobs asked for; the others, sent at the same time, waited for that answer
    assert requests == serial_requests + 1 > 500
    for name, table in serial.items():
        assert table.height > 0 and table.equals(concurrent[name]), name
    # the shard is really done: explained, revised, simulated and judged, the last unit an error row throughout
    detection = serial["detection"]
    assert detection.filter(pl.col("unit") < UNITS - 1)["error"].is_null().all()
    assert detection.filter(pl.col("unit") == UNITS - 1)["error"].str.starts_with("no explanation").all()
    llm = serial["explanations"].filter((pl.col("variant") == "llm") & (pl.col("unit") < UNITS - 1))
    assert [WORDS[unit].strip() in text for unit, text in llm.select("unit", "text").iter_rows()] == [True] * 5
