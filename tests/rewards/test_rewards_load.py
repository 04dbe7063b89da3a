"""load_reward: registered names, module:function, file.py:function, and clear import errors."""
import sys

import pytest

from grpokit.rewards import REWARDS, RewardSet, load_reward, numeric_match

MODULE = '''
def exact(prompts, completions, *, answer):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

VALUE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "grpokit_test_user_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "grpokit_test_user_rewards.py"
    sys.modules.pop("grpokit_test_user_rewards", None)


def test_registered_names():
    assert load_reward("numeric_match") is numeric_match
    assert {"numeric_match", "format", "overlong", "math_verify", "reasoning_gym"} <= set(REWARDS.names())


def test_module_function_loads_and_scores(user_module):
    fn = load_reward("grpokit_test_user_rewards:exact")
    assert fn([""] * 2, ["4", " 5"], answer=["4", "4"]) == [1.0, 0.0]
    rs = RewardSet([("grpokit_test_user_rewards:exact", 1.0)])
    assert rs.names == ["exact"]
    assert rs.score(["p", "q"], ["4", "5"], {"answer": ["4", "4"]}).total.tolist() == [1.0, 0.0]


def test_file_path_function(user_module):
    fn = load_reward(f"{user_module}:exact")
    assert fn([""], ["7"], answer=["7"]) == [1.0]


def test_import_errors_are_clear(user_module):
    with pytest.raises(ImportError, match=r"cannot import module 'no_such_reward_module'.*PYTHONPATH"):
        load_reward("no_such_reward_module:fn")
    with pytest.raises(AttributeError, match=r"has no attribute 'exakt'; its public callables: exact"):
        load_reward("grpokit_test_user_rewards:exakt")
    with pytest.raises(TypeError, match="'VALUE' is a int, not a function"):
        load_reward("grpokit_test_user_rewards:VALUE")
    with pytest.raises(ImportError, match="file 'missing.py' not found"):
        load_reward("missing.py:fn")
