"""Two responses per request, the second (final) one held until its gate opens; see config.pbtxt."""

import os
import time

import triton_python_backend_utils as pb_utils

_MAX_HOLD_S = 120.0


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            gate = pb_utils.get_input_tensor_by_name(request, "GATE")
            path = gate.as_numpy().reshape(-1)[0].decode() if gate is not None else None
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
            give_up = time.monotonic() + _MAX_HOLD_S
            while path is not None and not os.path.exists(path) and time.monotonic() < give_up:
                if sender.is_cancelled():
                    open(path + ".cancelled", "w").close()
                    break
                time.sleep(0.005)
            if sender.is_cancelled():
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
