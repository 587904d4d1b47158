"""The child side of ``eval/sandbox.py``: limit this process, then run one untrusted Python program.

Run as a script, never imported: ``python -I -B sandbox_child.py STATUS_FD LIMITS_JSON PROGRAM``, in the fresh
working folder the parent made (the cwd). Standard library only: under ``-I`` llmlab is not importable.

In order, before the program's first line runs:

1. resource limits, soft = hard (``RLIMIT_CPU``: hard = soft + 1 s, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
   ``RLIMIT_NPROC``, ``RLIMIT_CORE`` 0). Python ignores SIGXFSZ, so a write past the file-size limit raises
   ``OSError: File too large``; SIGXCPU kills the process (the parent reports "timed out").
2. a network namespace of its own (``unshare(CLONE_NEWNET)``, as root, else with a user namespace) when the kernel
   allows: no interface but a downed loopback. Where it is refused, step 3 alone guards the network.
3. an audit hook (PEP 578; hooks cannot be removed) that refuses, with ``PermissionError``: every ``socket.*``
   event (creating, connecting, binding, resolving), starting processes (``os.fork``, ``os.exec``, ``os.system``,
   ``os.posix_spawn``, ``subprocess.Popen``, and importing ``_posixsubprocess``, whose ``fork_exec`` is not
   audited), signalling them (``os.kill``), ctypes (importing it, ``ctypes.dlopen``), raising the resource limits,
   changing directory, opening a folder outside the working folder (its descriptor would let ``dir_fd=`` paths
   escape), and writing, creating, deleting, renaming, linking or re-permissioning any path outside it (symbolic
   links resolved).
4. stdout and stderr of the program go to a sink; the status goes to the parent on the inherited ``STATUS_FD``,
   which is made non-inheritable and taken out of ``sys.argv``.

The status line is ``passed`` when the program (prompt + completion + test + ``check(entry_point)``) ran to its
end, else ``failed: <ExceptionType>: <message> (line N: <source line>)``; an exit code other than 0 is a failure
whatever was written. The status descriptor is not hidden from a program that looks for it: a hostile program
could write a false "passed" and leave with ``os._exit(0)``; scores are for models, not for adversaries.
"""

import json
import os
import resource
import sys
import traceback

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
REFUSED = {"os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "os.kill", "os.killpg",
           "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "resource.setrlimit",
           "resource.prlimit", "os.chdir", "os.chroot", "os.unshare", "os.setns", "sys.remote_exec"}
# events whose leading path arguments are written to; each must stay inside the working folder
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
               "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chflags": 1, "os.mkfifo": 1,
               "os.mknod": 1, "os.setxattr": 1, "os.removexattr": 1, "shutil.rmtree": 1, "shutil.move": 2}
# _posixsubprocess.fork_exec starts processes without an audit event; ctypes calls native code
UNSAFE_MODULES = ("_posixsubprocess", "ctypes", "_ctypes")
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


def set_limits(limits: dict) -> None:
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_CORE", 0)):
        # the CPU limit's hard value one second later: SIGXCPU (soft) comes first; with soft = hard the kernel
        # may send SIGKILL instead, and a program that ignores SIGXCPU gets SIGKILL a second later anyway
        resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))


def own_network() -> bool:
    """A network namespace of our own (no route anywhere); False when the kernel refuses."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return any(libc.unshare(flags) == 0 for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET))
    except (OSError, AttributeError):
        return False
    finally:  # the program's own "import ctypes" must run the import (and meet the audit hook) again
        for name in [m for m in sys.modules if m.split(".")[0] in UNSAFE_MODULES]:
            del sys.modules[name]


def make_hook(root: str):
    def inside(path) -> bool:
        if isinstance(path, int) or path is None:  # a file descriptor already open, or "no path"
            return True
        path = os.fsdecode(path)
        return os.path.realpath(path).startswith(root + os.sep) or os.path.realpath(path) == root

    def hook(event: str, args: tuple) -> None:
        if event.startswith("socket.") or event in REFUSED:
            raise PermissionError(f"sandbox: {event} refused")
        if event == "open" and not inside(args[0]):
            if isinstance(args[2], int) and args[2] & WRITE_FLAGS:
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working folder refused")
            if os.path.isdir(args[0]):  # a directory's fd would let dir_fd= paths escape the check above
                raise PermissionError(f"sandbox: opening the folder {args[0]!r} refused")
        if event == "import" and args[0] in UNSAFE_MODULES:
            raise PermissionError(f"sandbox: importing {args[0]} refused")
        n = PATH_EVENTS.get(event)
        if n and not all(inside(a) for a in args[:n] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the working folder refused")

    return hook


def error_line(e: BaseException, source: list[str]) -> str:
    """``Type: message (line N: text)``, the line being the program's innermost frame."""
    message = f"{type(e).__name__}: {e}".strip().rstrip(":").splitlines()[0] if str(e) else type(e).__name__
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<program>"]
    if frames and 0 < frames[-1].lineno <= len(source):
        message += f" (line {frames[-1].lineno}: {source[frames[-1].lineno - 1].strip()})"
    return message[:300]


def main() -> None:
    status_fd, limits, program = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    os.set_inheritable(status_fd, False)
    del sys.argv[1:]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    root = os.path.realpath(os.getcwd())
    set_limits(limits)
    network = "namespace" if own_network() else "audit hook"
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the sink lives as long as the process
    sys.addaudithook(make_hook(root))
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        status = "passed"
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included: all are failures
        status = "failed: " + error_line(e, source.splitlines())
    os.write(status_fd, (json.dumps({"status": status, "network": network}) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
