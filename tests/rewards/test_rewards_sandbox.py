"""code_exec: fixture problems, test formats, and the adversarial cases (each scores 0, ends within its
limit and leaves the machine unharmed: no process of the sandbox user, no file outside its directory)."""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from grpokit.rewards import CodeExec, RewardSet, SandboxError, extract_code, parse_tests
from grpokit.rewards import sandbox as sandbox_mod

FIXTURE = Path(__file__).parents[1] / "fixtures" / "code_problems.jsonl"
ROWS = [json.loads(x) for x in FIXTURE.read_text().splitlines() if x.strip()]
LIMIT_S = 2.0


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def nobody_procs() -> int:
    out = subprocess.run(["ps", "-u", str(sandbox_mod.NOBODY), "--no-headers"], capture_output=True, text=True)
    return len(out.stdout.splitlines())


@pytest.fixture(scope="module")
def sandbox():
    try:
        return CodeExec(timeout_s=LIMIT_S, cpu_s=2, memory_mb=256, max_procs=8, concurrency=2)
    except SandboxError as e:  # a machine without namespaces: the refusal itself is tested below
        pytest.skip(f"no sandbox isolation on this machine: {e}")


def test_extract_code_and_parse_tests():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```\nz = 3\n```") == "z = 3\n" and extract_code("no code") is None
    assert parse_tests('["assert 1", {"input": "", "output": "x"}]') == ["assert 1", {"input": "", "output": "x"}]
    for bad in ([], "not json", [3], [{"input": "1"}]):
        with pytest.raises(ValueError, match="tests"):
            parse_tests(bad)


def test_fixture_solutions_pass_and_wrong_ones_do_not(sandbox):
    assert sandbox.isolation["net"] and sandbox.isolation["pid"]
    scores = sandbox([r["prompt"] for r in ROWS], [r["solution"] for r in ROWS], tests=[r["tests"] for r in ROWS])
    assert scores == [1.0] * len(ROWS)
    add = next(r for r in ROWS if "add(a, b)" in r["prompt"])
    half = block("def add(a, b):\n    return a + b if a > 0 else 99")
    assert sandbox(["p"] * 3, [half, "no code here", block("def add(a, b) return")], tests=[add["tests"]] * 3) == [
        pytest.approx(2 / 3), 0.0, 0.0]
    strict = CodeExec(timeout_s=LIMIT_S, all_or_nothing=True)
    assert strict(["p", "p"], [half, add["solution"]], tests=[add["tests"]] * 2) == [0.0, 1.0]
    io = next(r for r in ROWS if isinstance(r["tests"][0], dict))
    assert sandbox(["p"], [block("print(0)")], tests=[io["tests"]]) == [pytest.approx(1 / 3)]


def test_code_exec_from_rewardset_options():
    rs = RewardSet([("code_exec", 1.0, {"timeout_s": LIMIT_S, "all_or_nothing": True})], on_error="raise")
    res = rs.score([ROWS[0]["prompt"]], [ROWS[0]["solution"]], {"tests": [ROWS[0]["tests"]], "answer": ["x"]})
    assert res.per_function["code_exec"] == [1.0]
    with pytest.raises(Exception, match="needs a 'tests' column"):
        rs.score(["p"], ["x"], {"answer": ["x"]})


def test_refuses_without_a_network_namespace_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "probe_isolation", lambda python, **kw: {"net": False, "stdlib": True})
    with pytest.raises(SandboxError, match="allow_network = true"):
        CodeExec(timeout_s=LIMIT_S)
    assert CodeExec(timeout_s=LIMIT_S, allow_network=True).isolation["net"] is False


ADVERSARIAL = {
    "infinite_loop": ("while True:\n    pass", ["assert True"]),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", ["assert True"]),
    "memory_bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))", ["assert True"]),
    "big_alloc": ("x = bytearray(4 << 30)", ["assert len(x) > 0"]),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_resource_bombs(sandbox, name):
    code, tests = ADVERSARIAL[name]
    before = nobody_procs()
    t0 = time.perf_counter()
    assert sandbox(["p"], [block(code)], tests=[tests]) == [0.0]
    assert time.perf_counter() - t0 < LIMIT_S + 3.0
    time.sleep(0.2)
    assert nobody_procs() == before == 0  # every process it started is gone


def test_adversarial_write_outside_the_temp_dir(sandbox, tmp_path):
    target = tmp_path / "escape.txt"
    shm = Path("/dev/shm") / f"grpokit_escape_{os.getpid()}"
    tmp = Path("/tmp") / f"grpokit_escape_{os.getpid()}"
    home = Path.home() / f"grpokit_escape_{os.getpid()}"
    code = "\n".join(f"open({str(p)!r}, 'w').write('pwned')" for p in (target, shm, tmp, home))
    tests = [f"assert open({str(target)!r}).read() == 'pwned'"]
    assert sandbox(["p"], [block(code)], tests=[tests]) == [0.0]
    for p in (target, shm, tmp, home):
        assert not p.exists(), p
    # its own directory is writable (and private): a file written there is read back, then removed
    ok = block("open('mine.txt', 'w').write('ok')")
    assert sandbox(["p"], [ok], tests=[["assert open('mine.txt').read() == 'ok'"]]) == [1.0]
    assert not list(Path("/tmp").glob("grpokit_sandbox_*"))


def test_adversarial_open_a_socket(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = (f"import socket\nconn = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nout.sendto(b'x', ('8.8.8.8', 53))")
    try:
        assert sandbox(["p"], [block(code)], tests=[["assert conn is not None"]]) == [0.0]
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()


def test_adversarial_read_the_parents_environment(sandbox, monkeypatch):
    monkeypatch.setenv("GRPOKIT_TEST_SECRET", "hunter2")
    code = (
        "import os\n"
        "def leak():\n"
        "    s = str(dict(os.environ))\n"
        "    for p in os.listdir('/proc'):\n"
        "        try:\n"
        "            s += open('/proc/%s/environ' % p, errors='ignore').read()\n"
        "        except Exception:\n"
        "            pass\n"
        f"    for pid in (os.getppid(), {os.getpid()}):\n"
        "        try:\n"
        "            s += open('/proc/%d/environ' % pid, errors='ignore').read()\n"
        "        except Exception:\n"
        "            pass\n"
        "    return s\n"
    )
    assert sandbox(["p"], [block(code)], tests=[["assert 'hunter2' in leak()"]]) == [0.0]
    assert sandbox(["p"], [block("import os\nE = dict(os.environ)")], tests=[["assert 'PATH' in E and len(E) <= 5"]]) == [1.0]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists() or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to start the harness as an unprivileged user) and setpriv")
def test_unprivileged_start_uses_a_user_namespace():
    """Started by an ordinary user, the harness isolates through a user namespace: no network, the
    machine read-only, only its own directory writable."""
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="grpokit_userns_test_"))  # pytest's tmp_path is closed to other users
    try:
        _unprivileged(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _unprivileged(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(work, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("orig")
    os.chmod(victim, 0o666)  # writable by anyone on the host; not from the sandbox
    job = {"code": "import socket\n", "tests": [f"open({str(victim)!r}, 'w').write('x')", "open('mine', 'w').write('x')",
                                                "socket.create_connection(('127.0.0.1', 22), timeout=1)"],
           "net": True, "uid": sandbox_mod.NOBODY, "timeout_s": 3.0, "tmpfs_mb": 8,
           "limits": {"cpu_s": 3, "as": 256 << 20, "fsize": 1 << 20, "nproc": 8}}
    out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-I",
                          "-S", "-c", sandbox_mod.HARNESS], input=json.dumps(job).encode(), capture_output=True,
                         cwd=work, timeout=20)
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    if not result["isolation"]["userns"]:
        pytest.skip("unprivileged user namespaces are disabled on this machine")
    assert result["isolation"]["net"] and result["isolation"]["ro"] and result["isolation"]["pid"]
    assert result["passed"] == [False, True, False]
    assert victim.read_text() == "orig" and (work / "mine").exists()
