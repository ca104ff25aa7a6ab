"""The local Ray that reb starts: reachable from this machine only; stopped by SIGTERM as by Ctrl-C."""

import signal
import socket
import subprocess
import sys
import time

import pytest
import ray


def external_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_a_local_ray_listens_on_the_loopback_interface_only(local_ray):
    external = external_address()
    if external is None:
        pytest.skip("this machine has no interface but loopback")
    node = next(n for n in ray.nodes() if n["Alive"])
    assert node["NodeManagerAddress"] == "127.0.0.1"
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    for port in (gcs_port, node["NodeManagerPort"], node["ObjectManagerPort"]):
        assert accepts("127.0.0.1", port), port
        # by default Ray listens on every interface: anyone who can reach this machine could talk to it
        assert not accepts(external, port), f"port {port} answers on {external}"


WAIT_IN_RAY = """
import signal, sys, time
import ray
from reb_dist.distributed.runtime import ray_session, sigterm_count

def own_handler(signum, frame):
    raise SystemExit(7)

@ray.remote
def wait():
    time.sleep(300)

# as a process normally starts, whatever started the tests; or with a handler of its own
signal.signal(signal.SIGTERM, own_handler if sys.argv[1] == "own" else signal.SIG_DFL)
with ray_session(num_cpus=1):
    task = wait.remote()
    print("ready", flush=True)
    try:
        ray.get(task)
    except KeyboardInterrupt:  # inside ray.get, Ray raises a bare one in place of the handler's Terminated
        print("terminated" if sigterm_count() else "interrupted", flush=True)
        sys.exit(143)
    except SystemExit:  # Ray turns the own handler's SystemExit(7) into SystemExit(1) inside ray.get
        print("own handler", flush=True)
        sys.exit(7)
"""


@pytest.mark.parametrize("handler, expected", [("ray's", (143, "terminated")), ("own", (7, "own handler"))])
def test_sigterm_to_a_process_waiting_on_ray_interrupts_it_instead_of_a_native_abort(tmp_path, handler, expected):
    # `ray job stop` sends SIGTERM: Ray's core worker handler printed a native stack dump and aborted
    # (exit 134), where reb's commands stop as on Ctrl-C (one line, exit 143, MLflow runs FAILED); a
    # handler the program set before Ray started (the sweep's stop between cells) is kept, not Ray's
    proc = subprocess.Popen([sys.executable, "-c", WAIT_IN_RAY, handler], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "SIGTERM received" not in err, err[-2000:]
    assert (proc.returncode, out.strip()) == expected, err[-2000:]


class _SlowFinaliser:
    """An object whose finaliser says it has begun, then takes its time: where Python cannot raise."""

    def __init__(self, marker: str):
        self.marker = marker

    def __del__(self):
        from pathlib import Path

        Path(self.marker).touch()
        time.sleep(60)


@ray.remote(num_cpus=0.25)
class _Holder:
    def pid(self) -> int:
        import os

        return os.getpid()

    def drop(self, marker: str) -> None:
        obj = _SlowFinaliser(marker)
        del obj  # its finaliser runs here, in the actor's main thread


def test_a_worker_stopped_by_sigterm_inside_a_finaliser_exits_at_once_without_a_traceback(local_ray, tmp_path):
    # how Ray stops the actors Tune no longer needs: SIGTERM, whose handler raises SystemExit. Inside a
    # finaliser (or a weakref or import-lock callback) Python printed "Exception ignored in ...
    # SystemExit: 1" on the worker's stderr, which reached `reb tune`'s console, and the worker ran on
    import os
    from pathlib import Path

    holder = _Holder.remote()
    pid = ray.get(holder.pid.remote())
    marker = tmp_path / "finalising"
    holder.drop.remote(str(marker))
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the finaliser never ran"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the worker ran on after SIGTERM (its SystemExit was ignored)"
        time.sleep(0.05)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    stderr = "".join(p.read_text(errors="replace") for p in logs.glob(f"worker-*-{pid}.err"))
    assert "SystemExit" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
