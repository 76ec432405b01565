"""A real signal in the middle of a real merge: Ctrl+C (SIGINT), a scheduler's or `timeout`'s SIGTERM, a closed
terminal's SIGHUP. The command says so in one line, exits with 128 + the signal's number, and leaves nothing behind:
no output and no temporary `.partial` file beside it."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lorabox.io.safetensors import write_tensors
from tests.helpers import random_lora
from tests.test_merge import flux_base, write_lora

# `lorabox` itself, with every tensor's write held back 50 ms (on the write-behind thread, as a slow disk does), so
# that the merge is still streaming when the signal comes
SLOW_LORABOX = """
import signal, sys, time
# start as from a terminal: a test worker that some earlier test left ignoring or blocking SIGINT would pass that on
# (once in a full parallel run, the merge ran to its end and exited 0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
signal.signal(signal.SIGINT, signal.default_int_handler)
from lorabox.io.gguf import GGUFStreamWriter
from lorabox.io.safetensors import StreamWriter

def slowed(write):
    def slow(self, *args, **kwargs):
        time.sleep(0.05)
        return write(self, *args, **kwargs)
    return slow

StreamWriter.write = slowed(StreamWriter.write)
GGUFStreamWriter.write = slowed(GGUFStreamWriter.write)
from lorabox.cli import run
sys.argv[0] = "lorabox"
run()
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    write_tensors(d / "base.safetensors", flux_base(np.random.default_rng(30)))  # some 800 tensors
    lora = random_lora("flux1", seed=31, every=3, text_encoders=False)
    return d / "base.safetensors", write_lora(d / "l.safetensors", lora, "kohya")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("out_name,extra", [("o.safetensors", []), ("o.gguf", ["--quant", "Q8_0"])],
                         ids=["safetensors", "gguf"])
def test_a_signal_mid_merge_leaves_nothing_behind(tmp_path, inputs, sig, out_name, extra):
    base, lora = inputs
    out = tmp_path / out_name
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LORABOX, "merge", str(base), "--lora", str(lora), "-o",
                             str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*.partial")):  # the stream has begun: its temporary file is there
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)  # a few tensors into the stream
    assert proc.poll() is None, "the merge ended before the signal: slow it down further"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # the progress bar aside
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("lorabox: ") and "nothing was written" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
