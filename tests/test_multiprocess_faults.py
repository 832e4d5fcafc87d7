"""Several processes that cannot train together end in bounded time, with one error line each:
processes started with different settings (status 2, naming the keys), a busy coordinator port or
a second process 0 (status 2), a process whose peers never join (a progress line while it waits,
then status 3 after distributed.init_timeout_s), a process killed while the other prepares the
corpus or saves a checkpoint (status 3, not JAX's abort). Real train.py processes on localhost
(see tests/test_multiprocess.py)."""
import socket
import time

import pytest

from tests.test_multiprocess import env, finish, free_port, start_process, start_two_processes  # noqa: F401

pytestmark = pytest.mark.slow  # real processes on localhost: the extended suite (.ci/run)

INIT_TIMEOUT_S = 11  # past one progress line (parallel.PROGRESS_S = 10)
BOUND_S = 120  # JAX's import and start on a loaded 2-core machine, well below a hang


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_error_line(output: str, *parts: str) -> None:
    lines = error_lines(output)
    assert len(lines) == 1 and all(part in lines[0] for part in parts), output[-3000:]
    assert "Traceback" not in output and "Check failure" not in output, output[-3000:]


def test_processes_started_with_other_settings_are_refused(env, tmp_path):
    """Process 1 with another learning rate and number of steps: both refuse at start (status 2),
    each naming both keys, before anything is read or compiled."""
    address = f"localhost:{free_port()}"
    runs = [start_process(env, tmp_path / "w", address, 0),
            start_process(env, tmp_path / "w", address, 1, "--config.optimizer.learning_rate=0.03",
                          "--config.num_train_steps=30")]
    outputs = finish(runs, timeout=BOUND_S)  # kills a run that hangs: status -9
    assert [run.returncode for run in runs] == [2, 2], outputs
    for output in outputs:
        assert_one_error_line(output, "started with other settings than process 0",
                              "num_train_steps (20 on process 0, 30 there)",
                              "optimizer.learning_rate (0.002 on process 0, 0.03 there)")
    assert not (tmp_path / "w" / "config.json").exists()


@pytest.fixture(scope="module")
def lonely(env, tmp_path_factory) -> dict:
    """Process 0 alone; process 1 alone at a coordinator nobody runs: {name: (status, output)}."""
    workdir, timeout = tmp_path_factory.mktemp("lonely"), f"--config.distributed.init_timeout_s={INIT_TIMEOUT_S}"
    runs = {f"process {i}": start_process(env, workdir / str(i), f"localhost:{free_port()}", i, timeout)
            for i in range(2)}
    outputs = finish(list(runs.values()), timeout=BOUND_S)
    return {name: (run.returncode, output) for (name, run), output in zip(runs.items(), outputs)}


@pytest.mark.parametrize("name", ["process 0", "process 1"])
def test_a_process_whose_peers_never_join_says_so_and_gives_up(lonely, name):
    code, output = lonely[name]
    assert code == 3, output[-3000:]  # train.PEER_LOST
    assert "waiting for the 2 processes to join at coordinator localhost:" in output
    assert_one_error_line(output, "did not all join", f"distributed.init_timeout_s={INIT_TIMEOUT_S}")


def test_a_second_process_0_is_refused(env, tmp_path):
    """Its port is taken by the first process 0's coordinator (which waits for process 1)."""
    address = f"localhost:{free_port()}"
    first = start_process(env, tmp_path / "a", address, 0, f"--config.distributed.init_timeout_s={BOUND_S}")
    try:
        wait_until_listening(address, first)
        second = start_process(env, tmp_path / "b", address, 0)
        output = finish([second], timeout=BOUND_S)[0]
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, output[-3000:]
    assert_one_error_line(output, f"distributed.coordinator_address={address}: port",
                          "is in use on this machine", "a second process with process_id=0")


def wait_until_listening(address: str, run) -> None:
    """Returns once `address` accepts connections (process 0's coordinator is up)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and run.poll() is None:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"no coordinator at {address} (process 0's status: {run.poll()})")


@pytest.mark.parametrize("fault, extra", [
    # Before the first collective, gloo waits 30 s for the dead peer: the default heartbeat (60 s)
    # is longer, so the collective's failure, not JAX's abort, ends the survivor.
    ({"S2S_KILL_IN_PREPARE": "1"}, ()),
    ({"S2S_KILL_IN_SAVE": "5"}, ("--config.checkpoint_every_steps=5",)),
], ids=["preparing", "saving"])
def test_a_peer_killed_while_preparing_or_saving_ends_the_other_with_peer_lost(env, tmp_path, fault, extra):
    runs = start_two_processes(env, tmp_path / "w", *extra, inject=({}, fault))
    output = finish(runs)[0]
    assert runs[1].returncode == -9
    assert runs[0].returncode == 3, output[-3000:]  # train.PEER_LOST
    assert_one_error_line(output, "process 0: ", "another one has stopped", "rerun every process")
