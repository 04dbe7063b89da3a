"""Remote reward and LLM judge against a real HTTP server on 127.0.0.1, with its fault cases."""
import math
import time

import pytest

from grpokit.rewards import HTTPScorerError, LLMJudge, RemoteReward, RewardError, RewardSet, parse_verdict

FAST = dict(backoff_s=0.01, max_backoff_s=0.05)
PROMPTS = ["Say 12", "Say 34", "Say 56", "Say 78"]
GOOD = ["12", "x34", "55", "NULL"]
COLS = {"answer": ["12", "34", "56", "78"]}


def remote(server, path, **kw):
    return RemoteReward(server.url + path, **{"timeout_s": 2.0, "retries": 2, **FAST, **kw})


def test_remote_scores_in_batches_with_null(fake_server):
    fn = remote(fake_server, "/score", batch_size=3)
    assert fn(PROMPTS, GOOD, **COLS) == [1.0, 1.0, 0.0, None]
    assert fake_server.counts["/score"] == 2  # 4 samples in batches of 3


def test_remote_http500_is_retried_then_succeeds(fake_server):
    fn = remote(fake_server, "/fail/2/score", batch_size=8)
    assert fn(PROMPTS, GOOD, **COLS) == [1.0, 1.0, 0.0, None]
    assert fake_server.counts["/fail/2/score"] == 3


def test_remote_persistent_500_gives_bounded_retries_then_policy(fake_server):
    fn = remote(fake_server, "/always500", retries=2, batch_size=8)
    t0 = time.perf_counter()
    with pytest.raises(HTTPScorerError, match="failed 3 times"):
        fn(PROMPTS, GOOD, **COLS)
    assert fake_server.counts["/always500"] == 3 and time.perf_counter() - t0 < 2
    rs = RewardSet([(fn, 1.0, {}, "remote")], on_error="zero")
    res = rs.score(PROMPTS, GOOD, COLS)
    assert res.per_function["remote"] == [0.0] * 4 and res.errors == {"remote": 4}
    with pytest.raises(RewardError, match="remote.*HTTPScorerError.*on_error"):
        RewardSet([(fn, 1.0, {}, "remote")], on_error="raise").score(PROMPTS, GOOD, COLS)


def test_remote_malformed_json_is_not_retried_and_follows_policy(fake_server):
    fn = remote(fake_server, "/malformed", batch_size=8)
    with pytest.raises(HTTPScorerError, match="not valid JSON"):
        fn(PROMPTS, GOOD, **COLS)
    assert fake_server.counts["/malformed"] == 1
    res = RewardSet([(fn, 1.0, {}, "remote")], on_error="skip").score(PROMPTS, GOOD, COLS)
    assert not res.valid.any() and all(math.isnan(x) for x in res.total.tolist())


def test_remote_wrong_length_answer_is_an_error(fake_server):
    with pytest.raises(HTTPScorerError, match="expected a JSON list of 4"):
        remote(fake_server, "/wronglen", batch_size=8)(PROMPTS, GOOD, **COLS)


def test_remote_timeout_on_slow_server_is_bounded(fake_server):
    fn = remote(fake_server, "/slow/1.5/score", timeout_s=0.2, retries=1, batch_size=8)
    t0 = time.perf_counter()
    with pytest.raises(HTTPScorerError, match="failed 2 times.*(timed out|TimeoutError|timeout)"):
        fn(PROMPTS, GOOD, **COLS)
    assert time.perf_counter() - t0 < 1.5


def test_remote_slow_but_within_timeout_succeeds(fake_server):
    assert remote(fake_server, "/slow/0.3/score", timeout_s=3.0)(PROMPTS, GOOD, **COLS) == [1.0, 1.0, 0.0, None]


def test_remote_dropped_connection_is_retried(fake_server):
    fn = remote(fake_server, "/drop/1/score", batch_size=8)
    assert fn(PROMPTS, GOOD, **COLS) == [1.0, 1.0, 0.0, None]
    assert fake_server.counts["/drop/1/score"] == 2
    with pytest.raises(HTTPScorerError, match="failed 2 times"):
        remote(fake_server, "/drop/9/score", retries=1, batch_size=8)(PROMPTS, GOOD, **COLS)


def test_remote_keeps_results_received_before_a_failure(fake_server):
    """A failing batch does not lose the others: RewardSet re-asks per sample, the cache answers the good ones."""
    fn = remote(fake_server, "/bad-item/score", batch_size=2, retries=1)
    comps = ["12", "34", "BAD", "78"]
    res = RewardSet([(fn, 1.0, {}, "remote")], on_error="zero").score(PROMPTS, comps, COLS)
    assert res.per_function["remote"] == [1.0, 1.0, 0.0, 1.0] and res.errors == {"remote": 1}
    # batch 1 once; batch 2 twice (1 retry); alone: "BAD" twice, "78" once; "12" and "34" never again
    assert fake_server.counts["/bad-item/score"] == 1 + 2 + 2 + 1


def test_remote_runs_batches_concurrently(fake_server):
    fn = remote(fake_server, "/slow/0.3/score", batch_size=1, concurrency=4, timeout_s=3.0)
    t0 = time.perf_counter()
    fn(PROMPTS * 2, GOOD * 2, answer=COLS["answer"] * 2)
    assert fake_server.max_in_flight >= 3 and time.perf_counter() - t0 < 8 * 0.3


def test_remote_auth_header_from_environment(fake_server, monkeypatch):
    monkeypatch.setenv("GRPOKIT_TEST_TOKEN", "s3cret")
    assert remote(fake_server, "/auth/score", auth_env="GRPOKIT_TEST_TOKEN")(PROMPTS, GOOD, **COLS)[0] == 1.0
    monkeypatch.setenv("GRPOKIT_TEST_TOKEN", "wrong")
    with pytest.raises(HTTPScorerError, match="HTTP 401"):
        remote(fake_server, "/auth/score", auth_env="GRPOKIT_TEST_TOKEN")(PROMPTS, GOOD, **COLS)
    assert fake_server.counts["/auth/score"] == 2  # 401 is not retried
    monkeypatch.delenv("GRPOKIT_TEST_TOKEN")
    with pytest.raises(ValueError, match="GRPOKIT_TEST_TOKEN is not set"):
        remote(fake_server, "/auth/score", auth_env="GRPOKIT_TEST_TOKEN")
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        remote(fake_server, "/auth/score", auth_env="Bearer s3cret")


def test_remote_from_rewardset_options(fake_server):
    rs = RewardSet([("remote", 1.0, {"url": fake_server.url + "/score", "batch_size": 2})])
    assert rs.score(PROMPTS, GOOD, COLS).per_function["remote"][:3] == [1.0, 1.0, 0.0]
    with pytest.raises(TypeError, match="reward 'remote': cannot build it.*it takes: url"):
        RewardSet([("remote", 1.0, {"ulr": "http://x"})])


def test_parse_verdict():
    assert parse_verdict("Yes.") == 1.0 and parse_verdict("no") == 0.0
    assert parse_verdict("Not sure... final: YES") == 1.0
    assert parse_verdict("Score: 7/10", "score") == 0.7 and parse_verdict("10", "score") == 1.0
    for bad, mode in [("maybe", "yes_no"), ("none", "score"), ("11", "score"), ("yesterday", "yes_no")]:
        with pytest.raises(ValueError):
            parse_verdict(bad, mode)


def judge(server, mode, **kw):
    return LLMJudge(server.url + "/v1", mode, **{"timeout_s": 2.0, "retries": 1, **FAST, **kw})


def test_judge_yes_no_and_score(fake_server):
    assert judge(fake_server, "yes_no")(PROMPTS, GOOD, **COLS) == [1.0, 1.0, 0.0, 0.0]
    assert judge(fake_server, "score", verdict="score")(PROMPTS, GOOD, **COLS) == [0.9, 0.9, 0.2, 0.2]
    assert fake_server.counts["/v1/chat/completions"] == 8


def test_judge_custom_template(fake_server):
    tpl = "Q: {problem}\n\nReference answer:\n{answer}\n\nStudent's answer:\n{completion}\n\nJSON {{\"ok\": bool}}"
    assert judge(fake_server, "yes_no", template=tpl)(PROMPTS[:2], ["12", "0"], answer=["12", "34"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="only \\{problem\\}"):
        judge(fake_server, "yes_no", template="{question}")


def test_judge_unparseable_verdict_follows_policy(fake_server):
    comps = ["12", "what?", "55", "78"]
    fn = judge(fake_server, "garbage")
    res = RewardSet([(fn, 1.0, {}, "judge")], on_error="skip").score(PROMPTS, comps, COLS)
    assert res.valid.tolist() == [True, False, True, True]
    assert res.per_function["judge"][0] == 1.0 and res.per_function["judge"][2] == 0.0
    assert fake_server.counts["/v1/chat/completions"] == 4 + 1  # the re-ask is only for the failing sample
    with pytest.raises(RewardError, match="sample 1.*unparseable verdict"):
        RewardSet([(fn, 1.0, {}, "judge")], on_error="raise").score(PROMPTS, ["1", "what?", "5", "7"], COLS)


def test_judge_server_down_is_bounded(fake_server):
    url = fake_server.url
    fake_server.close()
    fn = LLMJudge(url + "/v1", "yes_no", timeout_s=0.5, retries=1, **FAST)
    t0 = time.perf_counter()
    with pytest.raises(HTTPScorerError, match="failed 2 times"):
        fn(PROMPTS, GOOD, **COLS)
    assert time.perf_counter() - t0 < 3
