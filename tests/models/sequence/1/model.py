"""Sequence accumulator: OUTPUT0 = sum of INPUT0 so far for this correlation id.

Triton fills the START/END/READY/CORRID control tensors ([1, 1] each); the
Python backend keeps no state for us, so the sums live in a dict keyed by CORRID.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            corrid = int(_scalar(request, "CORRID"))
            value = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if _scalar(request, "START"):
                self.sums[corrid] = 0
            # READY = 0 marks an empty slot (direct strategy): nothing to add.
            if _scalar(request, "READY"):
                self.sums[corrid] = self.sums.get(corrid, 0) + int(value.sum())
            total = self.sums.get(corrid, 0)
            if _scalar(request, "END"):
                self.sums.pop(corrid, None)
            out = np.full(value.shape, total, dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out)]))
        return responses
