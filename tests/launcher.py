"""Fork `anyo` commands from one process that has already imported torch and transformers.

The subprocess tests start `anyo` many times, and on a small CPU a fresh
interpreter spends a minute importing torch, faiss, transformers and peft before
doing anything. This process imports them once, without running any OpenMP
region (a child forked after one would hang in its first parallel op), then for
each line of stdin, a JSON {"argv": [...], "log": PATH, "env": {...}}, forks a
child that runs `distill.cli.main(argv)` in its own process group with stdout and
stderr in PATH, writes its exit status to PATH.rc, and answers with the child's pid.
An optional "kill_after": "module.name:N" makes the child SIGKILL its own group
the moment `module.name` (as looked up by its callers) returns for the N-th time:
a kill point that holds however fast or slow the machine is. An optional "read_only": PATH makes
any write, rename, removal or mkdir under PATH made through Python fail in the child (how a test
checks that a rank other than 0 writes nothing).
"""

import importlib
import json
import os
import signal
import sys
import traceback

import faiss  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401

import distill.commands  # noqa: F401
import student.train  # noqa: F401
import teacher.model  # noqa: F401
from distill.cli import main


def kill_after(spec: str) -> None:
    target, n = spec.rsplit(":", 1)
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(n):
            sys.stdout.flush()
            os.killpg(0, signal.SIGKILL)
        return result

    setattr(module, name, wrapper)


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.rename": 2, "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "shutil.rmtree": 1, "os.symlink": 2,
               "os.link": 2, "os.truncate": 1, "os.chmod": 1, "os.utime": 1}   # event -> how many path arguments


def read_only(root: str) -> None:
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False                                   # a file descriptor
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]) and isinstance(args[2], int) and args[2] & WRITE_FLAGS:
            raise PermissionError(f"read-only for this process: open {args[0]} for writing")
        if event in PATH_EVENTS and any(inside(a) for a in args[:PATH_EVENTS[event]]):
            raise PermissionError(f"read-only for this process: {event} {args[:PATH_EVENTS[event]]}")

    sys.addaudithook(hook)


def run_child(job: dict) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.update(job.get("env", {}))
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(write_through=True)  # nothing lost in a buffer when the test kills it
    code = 1
    try:
        if job.get("kill_after"):
            kill_after(job["kill_after"])
        if job.get("read_only"):
            read_only(job["read_only"])
        code = main(job["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(job["log"] + ".rc", "w") as f:
            f.write(str(code))
        os._exit(code)


if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they exit
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(job)
        try:
            os.setpgid(pid, pid)  # set on both sides: the group exists before the pid is handed out
        except ProcessLookupError:
            pass  # the child already finished
        print(pid, flush=True)
