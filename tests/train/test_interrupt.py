"""Ctrl-C and stop requests end fit cleanly: history so far marked, checkpoint kept, on_train_end told, resumable."""
from __future__ import annotations

import os
import signal
import threading

import pandas as pd
import pytest
import torch

from test_last_batch import Samples
from workbench import models
from workbench.data import digits
from workbench.losses import KD, Term
from workbench.train import Callback, Distiller, fit
from workbench.train.checkpoint import list_checkpoints

SETTINGS = dict(epochs=2, batch_size=32, lr=3e-3, device="cpu", seed=1, progress=False, schedule="cosine")


@pytest.fixture(scope="module")
def data():
    x, y = digits("train", size=8).tensors
    return (x[:134], y[:134]), (x[134:230], y[134:230])  # 134 = 4 x 32 + 6: 4 steps an epoch, the last merged


def _distiller(extra=None):
    torch.manual_seed(0)
    teacher = models.create("mlp", hidden=(32,), img_size=8).eval()
    student = models.create("mlp", hidden=(16,), img_size=8)
    return Distiller(teacher, student, {"kd": (KD(T=4), 1.0), "samples": (Samples(), 0.0), **(extra or {})})


def _weights(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class CtrlC(Callback):
    """Sends SIGINT to this process at the end of step ``at`` (``times`` in a row); records what it saw."""

    def __init__(self, at, times=1):
        self.at, self.times, self.ended = at, times, None

    def on_step_end(self, state):
        if state.step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)

    def on_train_end(self, state):
        self.ended = (state.interrupted, state.stop_reason, len(state.rows))


def test_ctrl_c_returns_the_history_so_far_with_a_checkpoint_that_resumes_exactly(data, tmp_path, capsys):
    train, test = data
    expected = fit(_distiller(), train, test, **SETTINGS)
    ctrl_c = CtrlC(at=3)
    history = fit(_distiller(), train, test, checkpoint_dir=tmp_path, callbacks=[ctrl_c], **SETTINGS)
    assert history["step"].tolist() == [1, 2, 3]  # step 3 finished, then the run ended
    pd.testing.assert_frame_equal(history.drop(columns="eval_accuracy"),
                                  expected.iloc[:3].drop(columns="eval_accuracy"))
    assert history["eval_accuracy"].isna().all()  # epoch 1 was cut short: not evaluated
    assert history.attrs["interrupted"] == {"epoch": 1, "step": 3, "reason": "KeyboardInterrupt"}
    assert ctrl_c.ended == (True, "KeyboardInterrupt", 3)
    assert "training interrupted at epoch 1, step 3: returning the history so far (3 steps)" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back

    resumed = fit(_distiller(), train, test, checkpoint_dir=tmp_path, resume=True, **SETTINGS)
    pd.testing.assert_frame_equal(resumed, expected)
    assert not resumed.attrs.get("interrupted") and not expected.attrs.get("interrupted")


def test_a_second_ctrl_c_raises_at_once(data):
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        fit(_distiller(), data[0], callbacks=[CtrlC(at=2, times=2)], **SETTINGS)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class Stop(Callback):
    def __init__(self, at, reason=None):
        self.at, self.reason = at, reason

    def on_step_end(self, state):
        if state.step == self.at:
            if self.reason is None:
                state.stop = True
            else:
                state.request_stop(self.reason)


def test_request_stop_marks_the_history_and_plain_stop_does_not(data, capsys):
    train, test = data
    stopped = fit(_distiller(), train, test, callbacks=[Stop(at=6, reason="stop button")], **SETTINGS)
    assert len(stopped) == 6 and stopped.attrs["interrupted"] == {"epoch": 2, "step": 6, "reason": "stop button"}
    assert "training interrupted at epoch 2, step 6 (stop button)" in capsys.readouterr().err
    early = fit(_distiller(), train, test, callbacks=[Stop(at=6)], **SETTINGS)
    assert len(early) == 6 and "interrupted" not in early.attrs
    assert early["eval_accuracy"].notna().tolist() == [False, False, False, True, False, True]  # early stop: evaluated
    at_epoch_end = fit(_distiller(), train, test, callbacks=[Stop(at=4, reason="budget")], **SETTINGS)
    assert at_epoch_end["eval_accuracy"].notna().tolist() == [False, False, False, True]  # a completed epoch is


class InterruptInForward(Term):
    """Raises KeyboardInterrupt in its ``at``-th training call: a Ctrl-C landing inside a step's forward."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, student, teacher, targets=None):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return student.float().sum() * 0


class Snapshot(Callback):
    def __init__(self):
        self.weights = None

    def on_step_end(self, state):
        self.weights = _weights(state.model)


def test_a_keyboard_interrupt_inside_a_step_discards_it_and_leaves_the_weights(data, tmp_path):
    train, _ = data
    distiller, snapshot = _distiller({"boom": (InterruptInForward(at=5), 1.0)}), Snapshot()
    history = fit(distiller, train, checkpoint_dir=tmp_path, callbacks=[snapshot], **SETTINGS)
    assert history["step"].tolist() == [1, 2, 3, 4]  # step 5 was discarded
    assert history.attrs["interrupted"] == {"epoch": 2, "step": 4, "reason": "KeyboardInterrupt"}
    after = _weights(distiller)
    assert all(torch.equal(after[key], value) for key, value in snapshot.weights.items())
    assert all(p.grad is None for p in distiller.parameters())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004"]  # epoch 1's end (written again on the stop)
    expected = fit(_distiller({"boom": (InterruptInForward(at=0), 1.0)}), train, **SETTINGS)
    resumed = fit(_distiller({"boom": (InterruptInForward(at=0), 1.0)}), train, checkpoint_dir=tmp_path,
                  resume=True, **SETTINGS)
    pd.testing.assert_frame_equal(resumed, expected)


class InterruptAfterUpdate(torch.optim.SGD):
    """SGD whose ``at``-th step updates the weights, then raises KeyboardInterrupt (it landed mid-update)."""

    def __init__(self, params, at):
        super().__init__(params, lr=0.1)
        self.at, self.calls = at, 0

    def step(self, closure=None):
        super().step(closure)
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_a_keyboard_interrupt_once_the_update_began_counts_the_step(data):
    train, _ = data
    distiller, snapshot = _distiller(), Snapshot()
    history = fit(distiller, train, optimizer=lambda params: InterruptAfterUpdate(params, at=3), callbacks=[snapshot],
                  **{**SETTINGS, "schedule": "constant"})
    assert history["step"].tolist() == [1, 2, 3] and history.attrs["interrupted"]["step"] == 3
    assert all(torch.equal(_weights(distiller)[key], value) for key, value in snapshot.weights.items())


def test_another_sigint_handler_and_another_thread_are_left_alone(data):
    seen = []

    class Look(Callback):
        def on_step_end(self, state):
            seen.append(signal.getsignal(signal.SIGINT))

    def mine(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, mine)
    try:
        fit(_distiller(), data[0], callbacks=[Look()], **{**SETTINGS, "epochs": 1})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen and all(handler is mine for handler in seen)
    seen.clear()
    thread = threading.Thread(target=fit, args=(_distiller(), data[0]), kwargs={**SETTINGS, "epochs": 1,
                                                                                  "callbacks": [Look()]})
    thread.start()
    thread.join()
    assert seen and all(handler is signal.default_int_handler for handler in seen)


KERNEL_CELL = """
import pathlib, torch
from workbench.train import Callback, fit

class Started(Callback):
    def on_step_end(self, state):
        if state.step == 1:
            pathlib.Path({flag!r}).write_text("started")

torch.manual_seed(0)
x, y = torch.randn(4096, 8), torch.randint(0, 2, (4096,))
history = fit(torch.nn.Linear(8, 2), (x, y), epochs=10_000, batch_size=16, device="cpu", progress=False,
              callbacks=[Started()])
"""


def _reply(client, message_id, timeout=30):
    reply = client.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != message_id:  # e.g. wait_for_ready's kernel_info reply
        reply = client.get_shell_msg(timeout=timeout)
    return reply


def _finish(client, message_id, timeout=30):
    """Wait for the cell ``message_id``; return (reply status, its iopub messages)."""
    reply = _reply(client, message_id, timeout)
    messages = []
    while True:
        message = client.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != message_id:
            continue
        messages.append(message)
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return reply["content"]["status"], messages


def _text(messages, stream):
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream" and m["content"]["name"] == stream)


def test_the_jupyter_interrupt_button_ends_fit_without_a_traceback(tmp_path):
    """A real ipykernel of this interpreter: interrupt_kernel() (SIGINT) while fit runs in a cell."""
    import sys
    import time

    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelManager):
        @property
        def kernel_spec(self):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              name="python3", display_name="Python 3", language="python",
                              env={"OMP_NUM_THREADS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})

    flag = tmp_path / "started"
    manager = ThisInterpreter(connection_file=str(tmp_path / "kernel.json"))
    manager.start_kernel(cwd=str(tmp_path))
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        message_id = client.execute(KERNEL_CELL.format(flag=str(flag)))
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert time.monotonic() < deadline, "fit did not start in the kernel"
            time.sleep(0.05)
        manager.interrupt_kernel()
        status, messages = _finish(client, message_id)
        assert status == "ok" and not [m for m in messages if m["msg_type"] == "error"]
        assert "training interrupted at epoch " in _text(messages, "stderr")
        status, messages = _finish(client, client.execute("print(history.attrs['interrupted'], len(history))"))
        assert status == "ok"
        mark, steps = _text(messages, "stdout").rsplit(" ", 1)
        assert mark.startswith("{'epoch': ") and mark.endswith("'reason': 'KeyboardInterrupt'}")
        assert int(steps) >= 1
        status, messages = _finish(client, client.execute("import signal; print(signal.getsignal(signal.SIGINT).__name__)"))
        assert _text(messages, "stdout").strip() == "default_int_handler"  # ipykernel's handler is back
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the Gloo backend")
def test_under_torchrun_a_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Without agreeing, rank 1 would start step 7 alone and wait forever in its all-reduce."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun) if torchrun.exists() else shutil.which("torchrun") or "torchrun",
               "--nproc_per_node=2", "--standalone", str(here / "ddp_stop_worker.py"), str(tmp_path / "rank")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here)])}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert finished.returncode == 0, finished.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank.{rank}.json").read_text()) for rank in (0, 1)]
    for found in ranks:
        assert found["samples"] == [16, 16, 16, 19, 16, 16]  # each rank's share, the tail merged
    assert ranks[0]["interrupted"] == {"epoch": 2, "step": 6, "reason": "stop button"}
    assert ranks[1]["interrupted"] == {"epoch": 2, "step": 6, "reason": "stopped on another rank"}
