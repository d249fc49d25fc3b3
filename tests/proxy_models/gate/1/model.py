"""Holds each request until its gate file exists; see config.pbtxt."""

import os
import time

import triton_python_backend_utils as pb_utils

# Held requests give up by themselves, so a test that fails midway can't wedge the instance.
_MAX_HOLD_S = 120.0


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            gate = pb_utils.get_input_tensor_by_name(request, "GATE")
            path = gate.as_numpy().reshape(-1)[0].decode() if gate is not None else None
            error = None
            give_up = time.monotonic() + _MAX_HOLD_S
            if path is not None and not os.path.exists(path):
                open(path + ".held", "w").close()  # the test may now cancel an executing request
            while path is not None and not os.path.exists(path):
                if request.is_cancelled():
                    open(path + ".cancelled", "w").close()
                    error = pb_utils.TritonError("cancelled by the client", pb_utils.TritonError.CANCELLED)
                    break
                if time.monotonic() > give_up:
                    error = pb_utils.TritonError(f"gate {path} never opened")
                    break
                time.sleep(0.005)
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
