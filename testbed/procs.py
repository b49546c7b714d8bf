"""Real subprocesses for tests: start with logs to a file, wait until ready, always stop by PID.

Every daemon the harness starts (registry, containerd, later the peersync daemon) goes through
`ManagedProcess`, so failures show the daemon's own log instead of a bare timeout, and a test that
fails half-way never leaves a daemon behind (context managers stop it on any exit path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0


class ProcessError(RuntimeError):
    """A managed process died or never became ready; the message carries its log tail."""


_HANDED_OUT: set[int] = set()  # ports free_port returned in this process


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the kernel picks it, so no guessing),
    and never one this process was given before: the kernel may pick the same port twice in a
    row while nothing binds it yet (one config got it for both its peer and mirror listeners).

    There is a small race until the caller binds it; daemons started right away win it in practice.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def log_tail(path: Path, max_bytes: int = 4000) -> str:
    """The last `max_bytes` of a log file, for error messages (empty if there is no log yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class ManagedProcess:
    """One child process whose stdout+stderr go to `log_path`, stopped by PID (TERM, then KILL).

    The child gets its own session so a Ctrl-C on pytest does not hit it before we stop it in order.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """PID of the running child (raises if not started)."""
        if self.proc is None:
            raise ProcessError(f"{self.args[0]} was not started")
        return self.proc.pid

    def start(self) -> ManagedProcess:
        """Spawn the child with its output appended to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def describe_failure(self, what: str) -> str:
        """Error text with the exit status and the log tail: what a developer needs to debug."""
        code = None if self.proc is None else self.proc.poll()
        return f"{self.args[0]}: {what} (exit status {code}); log {self.log_path}:\n{log_tail(self.log_path)}"

    def wait_ready(
        self, ready: Callable[[], bool], timeout: float = DEFAULT_READY_TIMEOUT, what: str = "ready"
    ) -> None:
        """Poll `ready()` until true; fail fast with the log if the child exits first."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if not self.alive():
                raise ProcessError(self.describe_failure(f"exited before it was {what}"))
            if ready():
                return
            if time.monotonic() > deadline:
                raise ProcessError(self.describe_failure(f"not {what} after {timeout:.0f}s"))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM the child by PID, SIGKILL it after `timeout`; return its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


@contextlib.contextmanager
def running(
    process: ManagedProcess,
    ready: Callable[[], bool] | None = None,
    timeout: float = DEFAULT_READY_TIMEOUT,
    what: str = "ready",
) -> Iterator[ManagedProcess]:
    """Start `process`, wait for `ready`, yield it, and stop it however the block exits."""
    process.start()
    try:
        if ready is not None:
            process.wait_ready(ready, timeout=timeout, what=what)
        yield process
    finally:
        process.stop()


def unix_socket_accepts(path: Path | str) -> bool:
    """True if something accepts connections on the unix socket `path` (not just that the file exists)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def tcp_port_accepts(host: str, port: int) -> bool:
    """True if a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_answers(url: str, ok_statuses: tuple[int, ...] = (200,)) -> bool:
    """True if GET `url` returns one of `ok_statuses` (401 counts when the caller says so)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status in ok_statuses
    except urllib.error.HTTPError as err:
        return err.code in ok_statuses
    except (urllib.error.URLError, OSError):
        return False


def run_checked(
    args: Sequence[str],
    timeout: float = 120.0,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a short command and return stdout; on failure raise with the command, stdout and stderr."""
    cmd = [str(a) for a in args]
    try:
        done = subprocess.run(
            cmd,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
        )
    except subprocess.TimeoutExpired as err:
        raise CommandError(cmd, None, _text(err.stdout), _text(err.stderr), timed_out=True) from err
    stdout, stderr = _text(done.stdout), _text(done.stderr)
    if done.returncode != 0:
        raise CommandError(cmd, done.returncode, stdout, stderr)
    return stdout


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


class CommandError(RuntimeError):
    """A helper command failed; keeps stderr so assertion messages say why."""

    def __init__(
        self, cmd: list[str], returncode: int | None, stdout: str, stderr: str, timed_out: bool = False
    ) -> None:
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        status = "timed out" if timed_out else f"exit status {returncode}"
        super().__init__(
            f"{' '.join(cmd)}: {status}\nstderr: {stderr.strip()}\nstdout: {stdout.strip()[-2000:]}"
        )
