"""Sandboxed code execution as a reward (SPEC section 13): `rewards.functions = ["code_exec"]`.

    [rewards.options.code_exec]
    timeout_s = 10.0        # wall clock per completion; then the whole process group (and PID namespace) is killed
    cpu_s = 10              # RLIMIT_CPU (default: ceil(timeout_s))
    memory_mb = 512         # RLIMIT_AS
    file_size_mb = 16       # RLIMIT_FSIZE
    max_procs = 16          # RLIMIT_NPROC of the sandbox user
    all_or_nothing = false  # reward = fraction of tests passed (default), or 1/0
    allow_network = false   # true runs even where no network namespace can be made (NOT isolated)

The completion's last fenced code block (```python, ```py or a bare ```) runs against the row's
`tests` column (`tests_column`), a list (or a JSON string of a list) whose items are either
- a string: Python statements, usually an `assert`, run after the solution in its namespace
  (e.g. "assert add(2, 3) == 5"); a test passes when it raises nothing; or
- a table {"input": str, "output": str}: the solution runs as a program (`__name__ == "__main__"`)
  with that stdin; it passes when its stdout equals `output` (trailing whitespace of each line and
  of the whole text ignored).
A completion with no code block scores 0.

Isolation, per completion (a fresh interpreter, `python -I -S -c HARNESS`):
- a new session and process group (start_new_session), killed with os.killpg after the run;
- a minimal environment (PATH, LANG, HOME = the private directory): nothing of the parent's leaks;
- a private temporary directory as the working directory, removed afterwards;
- Linux namespaces via unshare(2) (as root, or in a new user namespace where that is allowed):
  network (only a loopback that is down: no network at all), mount (every mount read-only except
  the private directory; private tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock, /var/lock,
  /dev/mqueue; a fresh /proc that shows only the sandbox's processes) and PID (the test code runs as PID 1 of its namespace, so killing it kills
  every process it started, fork bombs included);
- when started as root, the test code runs as the user nobody (65534), so RLIMIT_NPROC applies
  (the kernel exempts root from it); started as another user, it runs as that user inside a user
  namespace, and RLIMIT_NPROC counts all of that user's processes;
- rlimits: CPU seconds, address space, file size, processes, open files (64), no core dumps;
- the wall-clock deadline, enforced by the harness (SIGKILL to the namespace's PID 1) and again by
  the parent (os.killpg of the whole group).
If no network namespace can be made, `CodeExec` refuses to start unless allow_network = true.
It protects the machine; it does not stop a program that deliberately forges the harness's result
protocol (the tests run in the same interpreter as the solution), so keep the tests' verdicts
meaningful (e.g. compare against values the solution cannot see).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from grpokit.rewards.base import REWARDS, scorer_factory

#: User and group the test code runs as when the harness starts as root.
NOBODY = 65534
#: Seconds the parent adds to timeout_s for interpreter start-up before it kills the group itself.
PARENT_GRACE_S = 5.0
#: Fenced code blocks: ```python / ```py / ``` (the last one is run).
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

HARNESS = r'''
import ctypes, io, json, os, resource, select, signal, sys, time
job = json.loads(sys.stdin.read())
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWPID, NEWNET, NEWUSER = 0x00020000, 0x20000000, 0x40000000, 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
iso = {"root": os.geteuid() == 0, "userns": False, "net": False, "mnt": False, "ro": False, "pid": False, "uid": False}

def unshare(flag):
    return libc.unshare(ctypes.c_int(flag)) == 0

def mount(src, dst, fstype, flags, data):
    return libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                      data and data.encode()) == 0

if not iso["root"]:
    uid, gid = os.getuid(), os.getgid()
    if unshare(NEWUSER):
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
                with open("/proc/self/" + name, "w") as f:
                    f.write(text)
            iso["userns"] = True
        except OSError:
            pass
if job["net"]:
    iso["net"] = unshare(NEWNET)
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
KEEP = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

def read_only_everywhere(work):
    """Every mount read-only in this mount namespace, except the private directory (bound onto itself)."""
    mount(work, work, None, MS_BIND | MS_REC, None)
    os.chdir(work)  # into the new bind mount (the old cwd stays on the mount made read-only below)
    ok = True
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    for e in entries:
        point = e[4].encode().decode("unicode_escape")
        if point == work or point.startswith("/proc") or point.startswith("/sys"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in e[5].split(","):
            flags |= KEEP.get(opt, 0)
        if not mount(None, point, None, flags, None) and point == "/":
            ok = False
    return ok

if unshare(NEWNS) and mount(None, "/", None, MS_REC | MS_PRIVATE, None):
    iso["mnt"] = True
    iso["ro"] = read_only_everywhere(os.path.realpath(os.getcwd()))
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % job["tmpfs_mb"])
iso["pid"] = unshare(NEWPID)

def run_tests(code, tests, w):
    try:
        solution = compile(code, "solution.py", "exec")
    except BaseException:
        solution = None
    ns, loaded = {"__name__": "solution"}, None
    for t in tests:
        ok = False
        if solution is not None:
            if isinstance(t, str):
                if loaded is None:
                    try:
                        exec(solution, ns)
                        loaded = True
                    except BaseException:
                        loaded = False
                if loaded:
                    try:
                        exec(compile(t, "test.py", "exec"), ns)
                        ok = True
                    except BaseException:
                        ok = False
            else:
                out, old = io.StringIO(), (sys.stdin, sys.stdout)
                sys.stdin, sys.stdout = io.StringIO(t["input"]), out
                try:
                    exec(solution, {"__name__": "__main__"})
                    done = True
                except SystemExit as e:
                    done = e.code in (None, 0)
                except BaseException:
                    done = False
                finally:
                    sys.stdin, sys.stdout = old
                norm = lambda s: "\n".join(line.rstrip() for line in s.rstrip().splitlines())
                ok = done and norm(out.getvalue()) == norm(t["output"])
        os.write(w, b"1\n" if ok else b"0\n")

def child(w):
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the harness
    if iso["pid"] and iso["mnt"]:  # a /proc that shows only this namespace's processes
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    lim = job["limits"]
    for res, v in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)), (resource.RLIMIT_AS, (lim["as"],) * 2),
                   (resource.RLIMIT_FSIZE, (lim["fsize"],) * 2), (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),
                   (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NOFILE, (64, 64))):
        resource.setrlimit(res, v)
    if iso["root"]:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
        libc.prctl(1, signal.SIGKILL)  # a credential change clears the parent-death signal
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    hi = os.dup2(w, 63)
    os.closerange(3, 63)
    run_tests(job["code"], job["tests"], hi)

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(r)
        child(w)
    finally:
        os._exit(0)
os.close(w)
deadline, buf, status = time.monotonic() + job["timeout_s"], b"", "ok"
os.set_blocking(r, False)
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        status = "timeout"
        break
    ready, _, _ = select.select([r], [], [], min(left, 0.05))
    if ready:
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            break
        buf += chunk or b""
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done:
        try:
            buf += os.read(r, 65536)
        except BlockingIOError:
            pass
        break
try:
    os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
try:
    os.waitpid(pid, 0)
except ChildProcessError:
    pass
lines = buf.decode(errors="replace").split("\n")[: len(job["tests"])]
iso["uid"] = iso["root"]
print(json.dumps({"passed": [x == "1" for x in lines], "status": status, "isolation": iso}))
'''


class SandboxError(RuntimeError):
    """The sandbox could not run (not: the code failed its tests, which scores 0)."""


def extract_code(completion: str) -> str | None:
    """The last fenced code block of `completion` (```python, ```py or bare ```), or None."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def parse_tests(tests: Any, *, where: str = "tests") -> list[Any]:
    """A row's tests: a list (or JSON string of a list) of statements (str) or {"input", "output"} tables."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: a string must be a JSON list of tests ({e})") from None
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"{where}: expected a non-empty list of assert statements or {{input, output}} tables, got {tests!r}"[:300])
    out: list[Any] = []
    for t in tests:
        if isinstance(t, str):
            out.append(t)
        elif isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str):
            out.append({"input": t["input"], "output": t["output"]})
        else:
            raise ValueError(f"{where}: each test is a Python statement (str) or {{'input': str, 'output': str}}, got {t!r}"[:300])
    return out


def run_sandboxed(
    code: str,
    tests: Sequence[Any],
    *,
    python: str,
    timeout_s: float,
    cpu_s: int,
    memory_mb: int,
    file_size_mb: int,
    max_procs: int,
    isolate_network: bool = True,
    tmpfs_mb: int = 64,
) -> dict[str, Any]:
    """Run `code` against `tests` in a fresh sandbox; -> {"passed": [bool], "status", "isolation"}."""
    work = tempfile.mkdtemp(prefix="grpokit_sandbox_")
    try:
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        os.chmod(work, 0o700)
        job = {
            "code": code, "tests": list(tests), "net": isolate_network, "uid": NOBODY, "timeout_s": timeout_s,
            "tmpfs_mb": tmpfs_mb,
            "limits": {"cpu_s": cpu_s, "as": memory_mb << 20, "fsize": file_size_mb << 20, "nproc": max_procs},
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", HARNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=work, env=env, start_new_session=True,
        )
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=timeout_s + PARENT_GRACE_S)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)  # the harness is alive (not reaped), so its group id is still ours
            proc.communicate()
            return {"passed": [False] * len(tests), "status": "killed", "isolation": {}}
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            _killpg(proc.pid)
            raise SandboxError(
                f"code_exec: the sandbox harness failed (exit {proc.returncode}): {err.decode(errors='replace')[-300:]}"
            ) from None
        if not result.get("isolation", {}).get("pid"):
            _killpg(proc.pid)  # without a PID namespace, stragglers may remain in the group
        result["passed"] += [False] * (len(tests) - len(result["passed"]))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


#: The probe: isolation flags, and whether the sandbox user can import from the interpreter's stdlib.
PROBE_TESTS = ["import fractions, decimal, statistics"]


def probe_isolation(python: str, *, isolate_network: bool = True) -> dict[str, Any]:
    """Which isolation this machine gives (see the module docstring), by running one empty sandbox."""
    r = run_sandboxed("", PROBE_TESTS, python=python, timeout_s=10.0, cpu_s=10, memory_mb=512, file_size_mb=1,
                      max_procs=8, isolate_network=isolate_network)
    return {**r.get("isolation", {}), "stdlib": bool(r["passed"][0])}


@REWARDS.register("code_exec")
@scorer_factory
class CodeExec:
    """Run each completion's code block against its row's tests in a sandbox; reward = fraction passed."""

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        cpu_s: int | None = None,
        memory_mb: int = 512,
        file_size_mb: int = 16,
        max_procs: int = 16,
        all_or_nothing: bool = False,
        allow_network: bool = False,
        concurrency: int = 2,
        tests_column: str = "tests",
        python: str | None = None,
        tmpfs_mb: int = 64,
    ) -> None:
        who = "rewards.options.code_exec"
        if not timeout_s > 0 or memory_mb < 64 or file_size_mb < 1 or max_procs < 1 or concurrency < 1:
            raise ValueError(f"{who}: need timeout_s > 0, memory_mb >= 64, file_size_mb >= 1, max_procs >= 1, concurrency >= 1")
        self.limits = dict(timeout_s=float(timeout_s), cpu_s=int(cpu_s or math.ceil(timeout_s)), memory_mb=int(memory_mb),
                           file_size_mb=int(file_size_mb), max_procs=int(max_procs), tmpfs_mb=int(tmpfs_mb))
        self.all_or_nothing, self.allow_network, self.concurrency = all_or_nothing, allow_network, concurrency
        self.tests_column = tests_column
        candidates = [python] if python else list(dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]))
        self.python, self.isolation = None, {}
        for cand in filter(None, candidates):
            if not os.path.exists(cand):
                continue
            iso = probe_isolation(cand, isolate_network=True)
            if iso["stdlib"]:
                self.python, self.isolation = cand, iso
                break
        if self.python is None:
            raise SandboxError(
                f"{who}: no Python interpreter ({', '.join(filter(None, candidates))}) whose standard library the "
                f"sandbox user (nobody) can read; set {who}.python to one installed outside /root (e.g. /usr/bin/python3)"
            )
        if not self.isolation.get("net") and not allow_network:
            raise SandboxError(
                f"{who}: this machine does not allow a new network namespace (needs root, or unprivileged user "
                f"namespaces), so sandboxed code could reach the network. Run where it is allowed, or set "
                f"{who}.allow_network = true to run the code WITHOUT network isolation"
            )
        self.__name__ = "code_exec"

    def score_one(self, completion: str, tests: Any, index: int = 0) -> float:
        parsed = parse_tests(tests, where=f"code_exec: column '{self.tests_column}' of sample {index}")
        code = extract_code(completion)
        if code is None:
            return 0.0
        r = run_sandboxed(code, parsed, python=self.python, isolate_network=True, **self.limits)
        if self.isolation.get("net") and not r["isolation"].get("net", True):
            raise SandboxError("code_exec: the network namespace could not be made for this run; refusing its result")
        passed = r["passed"]
        frac = sum(passed) / len(passed)
        return float(frac == 1.0) if self.all_or_nothing else frac

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        if self.tests_column not in columns:
            raise KeyError(
                f"code_exec needs a '{self.tests_column}' column with each row's tests (columns: {', '.join(columns)}); "
                f"add it to the data or set rewards.options.code_exec.tests_column"
            )
        tests = columns[self.tests_column]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(completions)))) as pool:
            return list(pool.map(self.score_one, completions, tests, range(len(completions))))
