import pytest

from controller.policy import IdlenessHistory, Phase


def run_cycle(history: IdlenessHistory, arrive: float, start: float, end: float) -> None:
    history.request_arrived(arrive)
    history.call_started(start)
    history.call_finished(end)


def test_new_session_is_busy():
    history = IdlenessHistory()
    assert history.is_new
    assert history.idleness(0.0) == 0.0
    assert history.idleness(1e6) == 0.0, "an unused session does not age into idleness"


def test_ratio_of_sums_not_mean_of_ratios():
    history = IdlenessHistory()
    run_cycle(history, 0.0, 0.0, 1.0)  # 1 s LLM, then 1 s tool
    run_cycle(history, 2.0, 2.0, 3.0)  # 1 s LLM, then 8 s tool (still running at t=11)
    # sums: tool 9, llm 2 -> 9/11; a mean of per-cycle ratios would be (0.5 + 8/9) / 2
    assert history.idleness(11.0) == pytest.approx(9 / 11)


def test_tool_call_in_progress_counts_and_grows():
    history = IdlenessHistory()
    run_cycle(history, 0.0, 0.0, 10.0)
    assert history.phase is Phase.TOOL
    assert history.idleness(10.0) == 0.0
    assert history.idleness(20.0) == pytest.approx(0.5)
    assert history.idleness(100.0) == pytest.approx(0.9)


def test_llm_call_in_progress_counts_as_llm():
    history = IdlenessHistory()
    run_cycle(history, 0.0, 0.0, 10.0)
    history.request_arrived(20.0)
    history.call_started(20.0)
    # tool 10 closed; llm 10 + 30 running
    assert history.idleness(50.0) == pytest.approx(10 / 50)


def test_gated_time_counts_in_neither_term():
    held = IdlenessHistory()
    run_cycle(held, 0.0, 0.0, 10.0)
    held.request_arrived(20.0)
    held.call_started(1000.0)  # the platform held it for 980 s
    held.call_finished(1010.0)
    direct = IdlenessHistory()
    run_cycle(direct, 0.0, 0.0, 10.0)
    run_cycle(direct, 20.0, 20.0, 30.0)
    assert held.idleness(1010.0) == pytest.approx(direct.idleness(30.0)) == pytest.approx(10 / 30)
    assert held.idleness(1015.0) == pytest.approx(direct.idleness(35.0))


def test_an_abandoned_call_counts_nowhere_and_the_gap_runs_on():
    left = IdlenessHistory()
    run_cycle(left, 0.0, 0.0, 10.0)
    left.request_arrived(20.0)
    left.call_started(25.0)  # admitted, but its caller left before the engine saw it
    left.call_abandoned(40.0)
    assert left.phase is Phase.TOOL
    untouched = IdlenessHistory()
    run_cycle(untouched, 0.0, 0.0, 10.0)
    assert left.idleness(60.0) == pytest.approx(untouched.idleness(40.0)) == pytest.approx(30 / 40)
    with pytest.raises(ValueError, match="abandoned while the session is tool"):
        left.call_abandoned(61.0)
    withdrawn = IdlenessHistory()
    run_cycle(withdrawn, 0.0, 0.0, 10.0)
    withdrawn.request_arrived(20.0)
    withdrawn.request_withdrawn(40.0)  # timed out at the gate
    assert withdrawn.idleness(60.0) == pytest.approx(30 / 40)


def test_window_keeps_last_k_cycles():
    history = IdlenessHistory(k=2)
    run_cycle(history, 0.0, 0.0, 1.0)  # cycle 1: llm 1, tool 99 (forgotten below)
    run_cycle(history, 100.0, 100.0, 110.0)  # cycle 2: llm 10, tool 10
    run_cycle(history, 120.0, 120.0, 130.0)  # cycle 3: llm 10, tool running
    assert history.idleness(130.0) == pytest.approx(10 / 30)


def test_aborted_call_waits_again():
    history = IdlenessHistory()
    history.request_arrived(0.0)
    history.call_started(0.0)
    history.call_aborted(5.0)
    assert history.phase is Phase.GATED
    history.call_started(50.0)
    history.call_finished(55.0)
    assert history.idleness(55.0) == 0.0
    assert history.calls_completed == 1


@pytest.mark.parametrize("k", [0, -3])
def test_bad_window_rejected(k):
    with pytest.raises(ValueError, match="k must be >= 1"):
        IdlenessHistory(k=k)


def test_events_out_of_order_rejected():
    history = IdlenessHistory()
    with pytest.raises(ValueError, match="call started while the session is tool"):
        history.call_started(0.0)
    history.request_arrived(5.0)
    with pytest.raises(ValueError, match="request arrived while the session is gated"):
        history.request_arrived(6.0)
    history.call_started(6.0)
    with pytest.raises(ValueError, match="clock went backwards"):
        history.call_finished(1.0)
