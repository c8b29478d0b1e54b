"""`glm3 prefect up`: a local Prefect server (SQLite, loopback only) serving the glm3 deployments.

The server runs as a child process; this process serves `glm3/pipeline` and `glm3/finetune` (flows/pipeline.py)
and runs their flow runs. Prefect's state (database, results, logs) lives in PREFECT_HOME, by default
`<project>/.prefect`, so a project's runs and task cache stay with the project.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from glm3.io import tail_lines

HOST = "127.0.0.1"
FLOW_ENTRYPOINT = "flows/pipeline.py:glm3"


class PrefectServerError(RuntimeError):
    pass


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def server_environment(project: str, port: int) -> dict[str, str]:
    """Environment for the server, the serving process and flow runs: this project's PREFECT_HOME, the
    local API, library logs forwarded to Prefect's UI, no telemetry."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", os.path.join(project, ".prefect"))
    env.update(
        PREFECT_API_URL=api_url(port),
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="glm3",
    )
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def wait_healthy(port: int, proc: subprocess.Popen, log_path: str, timeout: float = 180.0) -> None:
    """Poll the server's health endpoint until it answers, the server exits, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PrefectServerError(f"the Prefect server exited with {proc.returncode}:\n{tail_lines(log_path, 30)}")
        try:
            with urllib.request.urlopen(f"{api_url(port)}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise PrefectServerError(
        f"the Prefect server did not answer on {api_url(port)} within {timeout:.0f} s:\n{tail_lines(log_path, 30)}"
    )


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def prefect_up(project: str | os.PathLike = ".", port: int = 4200) -> int:
    """Start the server, print its API URL on a line of its own, serve the deployments until interrupted."""
    project = os.path.abspath(project)
    if not os.path.isfile(os.path.join(project, FLOW_ENTRYPOINT.split(":")[0])):
        raise FileNotFoundError(f"{project} has no {FLOW_ENTRYPOINT.split(':')[0]}; pass the project directory")
    if not _port_free(port):
        raise OSError(f"port {port} on {HOST} is in use; pick another with --port")
    env = server_environment(project, port)
    os.makedirs(env["PREFECT_HOME"], exist_ok=True)
    log_path = os.path.join(env["PREFECT_HOME"], "server.log")
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops serving like Ctrl-C, and the server with it
    try:
        wait_healthy(port, server, log_path)
        deployments = _register_deployments(project, env)
        print(api_url(port), flush=True)  # only now: the deployments exist, runs can be created
        print(
            f"Prefect UI: http://{HOST}:{port}  (server log: {log_path})\n"
            f"In another shell:  export PREFECT_API_URL={api_url(port)}\n"
            "                   prefect deployment run glm3/finetune --param lr=1e-3 --watch\n"
            "Serving glm3/pipeline and glm3/finetune; Ctrl-C stops the server too.",
            flush=True,
        )
        from prefect import serve

        serve(*deployments, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(server)
    return 0


def _register_deployments(project: str, env: dict[str, str]) -> list:
    """glm3/pipeline and glm3/finetune, created on the server (serving them re-applies the same)."""
    os.chdir(project)  # deployments record the flow's entrypoint relative to here; flow runs start here
    os.environ.update(env)
    sys.path.insert(0, project)
    from prefect.flows import load_flow_from_entrypoint

    from glm3.pipeline.flow_support import RUNS

    pipeline = load_flow_from_entrypoint(FLOW_ENTRYPOINT)
    deployments = [
        pipeline.to_deployment(
            name=run, parameters={"run": run, "project": project}, description=f"glm3 {run}: {', '.join(stages)}"
        )
        for run, stages in RUNS.items()
    ]
    for deployment in deployments:
        deployment.apply()
    return deployments


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
