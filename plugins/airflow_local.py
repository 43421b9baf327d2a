"""A local Airflow for the lake: ``scheduler`` + ``dag-processor`` + ``api-server`` with the
LocalExecutor, SQLite and the simple auth manager, under ``settings.airflow.home``.

    python -m plugins.airflow_local up                  # start (detached), print URL and login
    python -m plugins.airflow_local down                # stop what `up` started
    python -m plugins.airflow_local trigger corpus_curation --wait
    python -m plugins.airflow_local dag-test corpus_curation   # dag.test(): no services needed

Tests drive the same functions with a temporary home (``tests/airflow_env.py``). This is a
development setup (SQLite allows one writer; the simple auth manager keeps plaintext passwords);
production uses the official Helm chart with PostgreSQL (``infra/README.md``).

Every process gets one environment (``airflow_env``): the JWT secret must be shared by the
scheduler (which signs task tokens) and the api-server (which checks them), and the workers
reach the Task Execution API at ``http://127.0.0.1:<port>/execution/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jzlake.settings import Settings, load_settings

SERVICES = ("scheduler", "dag-processor", "api-server")
USERNAME = "admin"
TERMINAL_RUN_STATES = {"success", "failed"}
REPO = Path(__file__).resolve().parents[1]


def airflow_bin() -> str:
    """The ``airflow`` CLI of this interpreter's environment."""
    binary = Path(sys.executable).parent / "airflow"
    if not binary.exists():
        raise RuntimeError(f"{binary} not found: apache-airflow is not installed in {sys.prefix}; run `make setup`")
    return str(binary)


def spark_connection(settings: Settings) -> str:
    """``AIRFLOW_CONN_SPARK_DEFAULT`` for the configured master (JSON form: ``local[*]`` is no URI host)."""
    return json.dumps({"conn_type": "spark", "host": settings.spark.master})


def _secrets(home: Path) -> dict[str, str]:
    """Per-home secrets, generated once: the admin password and the JWT signing key."""
    path = home / "local_secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {"password": secrets.token_urlsafe(12), "jwt_secret": secrets.token_urlsafe(32)}
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


def airflow_env(home: Path, port: int, settings: Settings, base: Mapping[str, str] | None = None,
                **overrides: str) -> dict[str, str]:
    """The environment every Airflow process of this local instance runs with."""
    home = home.resolve()
    values = _secrets(home)
    passwords = home / "simple_auth_manager_passwords.json"
    if not passwords.exists():
        passwords.write_text(json.dumps({USERNAME: values["password"]}))
        passwords.chmod(0o600)
    env = dict(os.environ if base is None else base)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",  # Spark jobs are the heavy part: never two JVMs per core
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "180",
        # Paths spelled out: the airflow.cfg the CLI writes on first use hard-codes its home, and
        # tests copy a migrated home.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(home / "logs" / "dag_processor"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": values["jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW_CONN_SPARK_DEFAULT": spark_connection(settings),
    })
    env.update(overrides)
    return env


def migrate(env: Mapping[str, str], timeout_s: float = 600) -> None:
    """``airflow db migrate`` (idempotent); its output is in the error when it fails."""
    proc = subprocess.run([airflow_bin(), "db", "migrate"], env=dict(env), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if proc.returncode:
        raise RuntimeError(f"airflow db migrate failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@dataclass
class Services:
    """The three long-running Airflow processes, each in its own process group with a log file."""

    env: dict[str, str]
    log_dir: Path
    pids: dict[str, int] = field(default_factory=dict)

    def start(self, names: Iterable[str] = SERVICES) -> Services:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(self.log_dir / f"{name}.log", "ab") as log:
                proc = subprocess.Popen([airflow_bin(), name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO))
            self.pids[name] = proc.pid
        return self

    def dead(self) -> list[str]:
        """Services whose process has exited."""
        return [name for name, pid in self.pids.items() if not _alive(pid)]

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM each process group (workers and spark-submit children too), then SIGKILL."""
        for pid in self.pids.values():
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in self.pids.values()):
            time.sleep(0.5)
        for pid in self.pids.values():
            _signal_group(pid, signal.SIGKILL)
            _reap(pid)
        self.pids.clear()

    def logs_tail(self, lines: int = 40) -> str:
        """The last lines of every service log (for failure messages)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {path.name} (last {len(text)} lines) -----\n" + "\n".join(text))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # our child and exited: reaped now
            return False
    except ChildProcessError:  # not our child (`down` from another shell): init reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_airflow(pid: int) -> bool:
    """Guard against pid reuse before signalling a pid read from a file."""
    try:
        return b"airflow" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # start_new_session made pid the group leader


class AirflowApi:
    """The few REST API v2 calls the lake needs, authenticated with a simple-auth-manager token."""

    def __init__(self, base_url: str, username: str, password: str, timeout_s: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.username, self.password, self.timeout_s = username, password, timeout_s
        self._token: str | None = None

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ApiError(exc.code, f"{method} {path} → {exc.code}: {detail}") from None
        return json.loads(payload) if payload else None

    def token(self) -> str:
        if self._token is None:
            body = {"username": self.username, "password": self.password}
            reply = self._call("POST", "/auth/token", body, auth=False)
            self._token = reply["access_token"]
        return self._token

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def healthy(self) -> bool:
        try:
            health = self._call("GET", "/api/v2/monitor/health", auth=False)
        except (OSError, ApiError):
            return False
        return health.get("metadatabase", {}).get("status") == "healthy"

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return self.get(f"/api/v2/dags/{dag_id}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self._call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{_quote(run_id)}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{_quote(run_id)}/taskInstances")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def failed_task_logs(self, dag_id: str, run_id: str, chars: int = 4000) -> str:
        """The tail of each failed task's last attempt log (for failure messages; never raises)."""
        parts = []
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] != "failed":
                continue
            try:
                text = self.task_log(dag_id, run_id, ti["task_id"], max(ti["try_number"], 1))[-chars:]
            except (OSError, ApiError) as exc:
                text = f"(log unavailable: {exc})"
            parts.append(f"--- {ti['task_id']} (try {ti['try_number']}) ---\n{text}")
        return "\n".join(parts)

    def asset_events(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        query = f"source_dag_id={dag_id}&source_run_id={_quote(run_id)}&limit=100"
        return self.get(f"/api/v2/assets/events?{query}")["asset_events"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        ti = f"/api/v2/dags/{dag_id}/dagRuns/{_quote(run_id)}/taskInstances/{task_id}"
        reply = self.get(f"{ti}/logs/{try_number}?full_content=true")
        content = reply.get("content", "")
        if not isinstance(content, list):
            return str(content)
        lines = []
        for item in content:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            lines.append(str(item.get("event", "")))
            for detail in item.get("error_detail") or []:  # the exception, with the spark-submit tail
                lines.append(f"{detail.get('exc_type')}: {detail.get('exc_value')}")
        return "\n".join(lines)


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def wait_until(check: Any, timeout_s: float, what: str, interval_s: float = 2.0,
               on_timeout: Any = None) -> Any:
    """Poll ``check()`` until it returns a truthy value; the timeout error says what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{extra}")
        time.sleep(interval_s)


def wait_for_run(api: AirflowApi, dag_id: str, run_id: str, timeout_s: float,
                 on_timeout: Any = None) -> str:
    """Poll a DAG run until it is ``success`` or ``failed``; returns the final state."""
    def finished() -> str | None:
        state = api.run_state(dag_id, run_id)
        return state if state in TERMINAL_RUN_STATES else None

    return wait_until(finished, timeout_s, f"DAG run {dag_id}/{run_id} to finish", interval_s=3,
                      on_timeout=on_timeout)


# ---- dag.test() in this process (the CLI runs it in a fresh interpreter) ------------------


def run_dag_test(dag_id: str) -> dict[str, Any]:
    """Run one DAG run with ``dag.test()`` (tasks in-process, no scheduler) and report task states.

    Needs a migrated metadata DB (``migrate``) and ``AIRFLOW_HOME``/``DAGS_FOLDER`` set before
    Airflow is imported, hence a fresh interpreter per call (``python -m plugins.airflow_local``).
    """
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    folder = conf.get("core", "dags_folder")
    bag = DagBag(dag_folder=folder)
    if dag_id not in bag.dags:
        raise RuntimeError(f"DAG {dag_id!r} not found in {folder}; import errors: {bag.import_errors}")
    run = bag.dags[dag_id].test()
    tis = run.get_task_instances()
    return {"dag_id": dag_id, "run_id": run.run_id, "state": str(run.state),
            "tasks": {ti.task_id: str(ti.state) for ti in tis}}


# ---- CLI -------------------------------------------------------------------------------------


def _local(settings: Settings) -> tuple[Path, int, dict[str, str]]:
    home = Path(settings.path(settings.airflow.home))
    return home, settings.airflow.api_port, airflow_env(home, settings.airflow.api_port, settings)


def _pid_file(home: Path) -> Path:
    return home / "services.json"


def cmd_up(settings: Settings, timeout_s: float) -> dict[str, Any]:
    home, port, env = _local(settings)
    if _pid_file(home).exists():
        pids = {name: pid for name, pid in json.loads(_pid_file(home).read_text()).items() if _is_airflow(pid)}
        running = Services(env, home / "service-logs", pids)
        if len(pids) == len(SERVICES) and not running.dead():
            return _login_info(home, port, "already running")
        running.stop()
    migrate(env)
    services = Services(env, home / "service-logs").start()
    _pid_file(home).write_text(json.dumps(services.pids))
    api = AirflowApi(f"http://127.0.0.1:{port}", USERNAME, _secrets(home)["password"])
    try:
        wait_until(lambda: api.healthy() or (services.dead() and "dead"), timeout_s, "the api-server",
                   on_timeout=services.logs_tail)
        if services.dead():
            raise RuntimeError(f"services exited: {services.dead()}\n{services.logs_tail()}")
    except BaseException:
        services.stop()
        _pid_file(home).unlink(missing_ok=True)
        raise
    return _login_info(home, port, "started")


def _login_info(home: Path, port: int, status: str) -> dict[str, Any]:
    return {"status": status, "url": f"http://127.0.0.1:{port}", "username": USERNAME,
            "password": _secrets(home)["password"], "airflow_home": str(home),
            "logs": str(home / "service-logs")}


def cmd_down(settings: Settings) -> dict[str, Any]:
    home, _, env = _local(settings)
    if not _pid_file(home).exists():
        return {"status": "not running"}
    pids = {name: pid for name, pid in json.loads(_pid_file(home).read_text()).items() if _is_airflow(pid)}
    Services(env, home / "service-logs", pids).stop()
    _pid_file(home).unlink()
    return {"status": "stopped"}


def cmd_trigger(settings: Settings, dag_id: str, wait: bool, timeout_s: float) -> dict[str, Any]:
    home, port, _ = _local(settings)
    api = AirflowApi(f"http://127.0.0.1:{port}", USERNAME, _secrets(home)["password"])
    if not api.healthy():
        raise SystemExit(f"no Airflow api-server on port {port}: run `make airflow-up` first")
    wait_until(lambda: api.dag(dag_id), 300, f"DAG {dag_id} to be parsed")
    api.set_paused(dag_id, False)
    run_id = api.trigger(dag_id)
    result: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "url": f"http://127.0.0.1:{port}/dags/{dag_id}"}
    if wait:
        result["state"] = wait_for_run(api, dag_id, run_id, timeout_s)
        result["tasks"] = api.task_states(dag_id, run_id)
    return result


def cmd_dag_test(settings: Settings, dag_id: str) -> dict[str, Any]:
    home, _, env = _local(settings)
    migrate(env)
    return dag_test_subprocess(env, dag_id, home / "dag-test-result.json")


def dag_test_subprocess(env: Mapping[str, str], dag_id: str, result_file: Path, timeout_s: float | None = None,
                        log_file: Path | None = None) -> dict[str, Any]:
    """``run_dag_test`` in a fresh interpreter with ``env`` (Airflow reads its config at import).

    Output goes to ``log_file`` (else this process's stdout/stderr); the result is read back
    from ``result_file``.
    """
    result_file.unlink(missing_ok=True)
    code = ("import json, pathlib, sys; from plugins.airflow_local import run_dag_test; "
            "pathlib.Path(sys.argv[2]).write_text(json.dumps(run_dag_test(sys.argv[1])))")
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.run([sys.executable, "-c", code, dag_id, str(result_file)], env=dict(env),
                              cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT if out else None,
                              timeout=timeout_s, check=False)
    finally:
        if out:
            out.close()
    if proc.returncode or not result_file.exists():
        where = f"; output in {log_file}" if log_file else ""
        raise RuntimeError(f"dag.test() of {dag_id} exited {proc.returncode} without a result{where}")
    return json.loads(result_file.read_text())


def _dispatch(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if args.command == "up":
        result = cmd_up(settings, args.timeout)
        print(f"Airflow {result['status']}: {result['url']}  login {result['username']} / {result['password']}\n"
              f"  AIRFLOW_HOME {result['airflow_home']}, service logs {result['logs']}; stop: make airflow-down",
              file=sys.stderr)
    elif args.command == "down":
        result = cmd_down(settings)
    elif args.command == "trigger":
        result = cmd_trigger(settings, args.dag_id, args.wait, args.timeout)
    else:
        result = cmd_dag_test(settings, args.dag_id)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.airflow_local", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start scheduler, dag-processor and api-server")
    up.add_argument("--timeout", type=float, default=300)
    sub.add_parser("down", help="stop them")
    trigger = sub.add_parser("trigger", help="unpause and trigger a DAG over the REST API")
    trigger.add_argument("dag_id")
    trigger.add_argument("--wait", action="store_true", help="wait for the run to finish")
    trigger.add_argument("--timeout", type=float, default=3600)
    dag_test = sub.add_parser("dag-test", help="run a DAG once with dag.test() (no services)")
    dag_test.add_argument("dag_id")
    args = parser.parse_args(argv)
    settings = load_settings()  # JZLAKE_CONFIG / JZLAKE__* as for the DAGs
    try:
        result = _dispatch(args, settings)
    except (RuntimeError, TimeoutError, ApiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    ok = result.get("state", "success") == "success"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
