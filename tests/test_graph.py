"""rmens.steps.graph: a plan recorded as a graph of keyed calls, and run with independent calls at once."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rmens.steps import Output, Store, step
from rmens.steps.graph import GraphRun, placement, record, waves

SPANS: dict[str, tuple[float, float]] = {}
FAIL = threading.Event()


@step("g_source", files={"value": "value.txt"})
def source(folder, *, value: int) -> dict:
    (folder / "value.txt").write_text(str(value))
    return {"value": value}


@step("g_branch", devices=1, memory_gib=3)
def branch(folder, *, up: Output, times: int) -> dict:
    start = time.monotonic()
    if FAIL.is_set() and times == 3:
        raise RuntimeError("branch 3 failed")
    time.sleep(0.6)
    SPANS[f"branch{times}"] = (start, time.monotonic())
    return {"value": int(up.file("value").read_text()) * times}


@step("g_join")
def join(folder, *, parts: dict[str, Output]) -> dict:
    return {"total": sum(part.summary["value"] for part in parts.values())}  # reads the summaries


def diamond(value: int, call) -> dict[str, Output]:
    up = call(source, "src", value=value)
    parts = {f"b{t}": call(branch, f"b{t}", up=up, times=t) for t in (2, 3)}
    return {"join": call(join, "all", parts=parts), **parts}


def threaded(store: Store, pool: ThreadPoolExecutor):
    return lambda node, inputs: pool.submit(lambda: store.run(node.step, inputs, key=node.key)[0])


def test_independent_calls_run_at_once_and_the_join_reads_their_finished_outputs(tmp_path):
    store = Store(tmp_path)
    nodes, returned = record(diamond, store, 5)
    assert [[n.name for n in wave] for wave in waves(nodes)] == [
        ["g_source:src"], ["g_branch:b2", "g_branch:b3"], ["g_join:all"]]
    assert nodes["g_join:all"].after == ("g_branch:b2", "g_branch:b3") and not any(n.found for n in nodes.values())
    with ThreadPoolExecutor(4) as pool:
        graph = GraphRun(nodes, threaded(store, pool))
        outputs = graph.run()
    assert outputs["g_join:all"].summary == {"total": 25} and graph.overlap == 2
    (s2, e2), (s3, e3) = SPANS["branch2"], SPANS["branch3"]
    assert max(s2, s3) < min(e2, e3)  # the branches overlapped in time
    assert outputs["g_join:all"].key == returned["join"].key  # what the plan returned names the same outputs

    again, _ = record(diamond, store, 5)
    assert all(node.found is not None for node in again.values())
    reused = []
    GraphRun(again, submit=lambda *a: pytest.fail("a stored call must start nothing"), reuse=reused.append).run()
    assert len(reused) == 4


def test_a_failed_call_stops_what_reads_it_and_keeps_what_finished(tmp_path):
    store = Store(tmp_path)
    nodes, _ = record(diamond, store, 7)
    FAIL.set()
    try:
        with ThreadPoolExecutor(4) as pool, pytest.raises(RuntimeError, match="branch 3 failed"):
            GraphRun(nodes, threaded(store, pool)).run()
    finally:
        FAIL.clear()
    after, _ = record(diamond, store, 7)
    assert {name for name, node in after.items() if node.found} == {"g_source:src", "g_branch:b2"}


def test_a_dry_run_lays_out_waves_with_what_each_call_asks_for(tmp_path):
    store = Store(tmp_path)
    store.run(source, {"value": 1})
    nodes, _ = record(diamond, store, 1)
    lines = placement(nodes)
    assert lines[0] == "wave 1: 1 call(s), 0 to compute, asking for at most 0 device(s) at once"
    assert lines[2] == "wave 2: 2 call(s), 2 to compute, asking for at most 2 device(s) at once"
    assert "g_branch:b2" in lines[3] and lines[3].endswith("1 device(s), 3 GiB host")
    assert lines[1].endswith("in the store")


def test_a_plan_that_calls_one_label_twice_is_refused(tmp_path):
    def twice(call):
        call(source, "x", value=1)
        call(source, "x", value=2)

    with pytest.raises(ValueError, match="calls g_source:x twice"):
        record(twice, Store(tmp_path))


def test_a_stop_noticed_between_polls_ends_the_run_at_once(tmp_path):
    store = Store(tmp_path)
    nodes, _ = record(diamond, store, 9)

    def stop():
        if "g_source:src" in started:
            raise KeyboardInterrupt

    started = []
    with ThreadPoolExecutor(4) as pool, pytest.raises(KeyboardInterrupt):
        GraphRun(nodes, threaded(store, pool), started=lambda node: started.append(node.name), check=stop).run()
    assert started == ["g_source:src"]  # nothing after the stop was started


def test_a_runs_resources_replace_a_steps_declaration_by_step_or_by_call():
    from rmens.steps.resources_config import StepResources, request_for, unknown_keys

    overrides = {"g_branch": StepResources(memory_gib=8), "g_branch:b3": StepResources(devices=0)}
    assert request_for("g_branch:b2", "g_branch", 1, 3, overrides) == (1, 8)
    assert request_for("g_branch:b3", "g_branch", 1, 3, overrides) == (0, 8)  # the call's own setting wins
    assert request_for("g_source:src", "g_source", 0, 2, overrides) == (0, 2)
    names = ["g_branch:b2", "g_branch:b3"]
    assert unknown_keys({**overrides, "g_brnch": StepResources(), "g_branch:b9": StepResources()}, names) == [
        "g_branch:b9", "g_brnch"]
    assert unknown_keys({"g_join": StepResources(), "g_join:all": StepResources()}, names) == []  # not in this run
