# tritonpilot sidecar image. Triton itself runs in its own container (the NGC
# tritonserver image, which has the PyTorch backend) in the same pod; the
# sidecar reaches it on localhost. See deploy/kubernetes/.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY control ./control
COPY tritonpilot ./tritonpilot
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home tritonpilot
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/policy.example.yaml /etc/tritonpilot/policy.yaml
USER 10001
# 8101: gRPC for clients; 9101: /metrics /healthz /readyz /status
EXPOSE 8101 9101
ENTRYPOINT ["tritonpilot", "serve"]
CMD ["--policy", "/etc/tritonpilot/policy.yaml", "--log-format", "json", "--metrics-listen", "0.0.0.0:9101"]
