"""Leaks 48 MiB at each load of each instance, for the leak watchdog's real-Triton test.

The Python backend runs each instance in its own stub process, which exits at unload, so
memory kept by the model itself is freed at every reload. What outlives the unload here
is a helper process this model starts at each load: it stays in tritonserver's session
(the stub's process group), holds 48 MiB (touched, so resident) and exits only once
tritonserver is gone, as a leaked thread or allocation in a backend would stay until
Triton restarts. It is real memory in Triton's processes, not a simulated metric.
"""

import os
import shutil
import subprocess
import sys

import triton_python_backend_utils as pb_utils

_HOLD = """
import os, sys, time
hold = bytearray(48 << 20)
for i in range(0, len(hold), 4096):
    hold[i] = 1
while os.path.exists("/proc/%d" % int(sys.argv[1])):
    time.sleep(0.2)
"""


class TritonPythonModel:
    def initialize(self, args):
        python = shutil.which("python3") or sys.executable
        # Not a new session: the helper must stay among Triton's processes (and its group,
        # which the test's teardown signals).
        subprocess.Popen([python, "-c", _HOLD, str(os.getppid())], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
