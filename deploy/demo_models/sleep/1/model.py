"""Sleeps SLEEP_MS per request (a stand-in for GPU work), then OUTPUT0 = INPUT0."""

import json
import time

import triton_python_backend_utils as pb_utils


def _param_ms(config, key, default):
    """A `parameters` entry as milliseconds; absent or empty -> default."""
    raw = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return float(raw) if raw.strip() else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sleep_s = _param_ms(config, "SLEEP_MS", 20.0) / 1000.0
        time.sleep(_param_ms(config, "INIT_SLEEP_MS", 0.0) / 1000.0)

    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(self.sleep_s)
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", data)]))
        return responses
