# syntax=docker/dockerfile:1
#
# streamserve container image. Two variants from this one file:
#
#   docker build -t streamserve .                      # CPU (the last stage, `cpu`): debian:bookworm-slim
#   docker build -t streamserve:gpu --target gpu .     # NVIDIA GPU: CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu
#
# fly.toml deploys the CPU image, fly.gpu.toml the `gpu` target; docs/deploy.md explains both.
# tests/deploy/ reads this file: the runtime stages' ENV and CMD are what it starts the real
# binary with, and it checks where the binary, the models and libonnxruntime end up, and that
# what the server writes (the registry cache, batch jobs' state) is at absolute paths made for
# its user: the relative defaults would land in /app, which root owns.

# The ONNX Runtime release whose C API the binary is built against (src/runtime/mod.rs
# ORT_VERSION, requirements.txt). The binary loads the library at run time (ort load-dynamic).
ARG ORT_VERSION=1.31.1

# ---- build: the release binary ---------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cargo's registry and target dir are cache mounts, so the binary is copied out in the same step.
# --strip-debug drops the line tables [profile.release] keeps for our code, but keeps symbol
# names for panic backtraces.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin streamserve \
    && strip --strip-debug -o /usr/local/bin/streamserve target/release/streamserve

# ---- ONNX Runtime: take the shared library out of the PyPI wheels -----------------------------
# --no-deps: only the wheel itself (numpy, protobuf... are for its Python API, not the library).
FROM python:3.11-slim-bookworm AS ort-cpu
ARG ORT_VERSION
RUN pip install --no-cache-dir --no-deps --target /ort onnxruntime==${ORT_VERSION}

FROM python:3.11-slim-bookworm AS ort-gpu
ARG ORT_VERSION
RUN pip install --no-cache-dir --no-deps --target /ort onnxruntime-gpu==${ORT_VERSION}

# ---- gpu: NVIDIA runtime image -----------------------------------------------------------------
# The onnxruntime-gpu 1.31.1 wheel on PyPI is built for CUDA 13 and cuDNN 9 (its `cuda` extra
# requires nvidia-cuda-runtime ~= 13.0, nvidia-cudnn-cu13 ~= 9.0), so this base is CUDA 13 +
# cuDNN 9; the host needs an NVIDIA driver that supports CUDA 13 (R580 or newer).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ARG ORT_VERSION
# The CUDA provider is loaded from the directory libonnxruntime was loaded from.
COPY --from=ort-gpu /ort/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION} /usr/local/lib/libonnxruntime.so
COPY --from=ort-gpu /ort/onnxruntime/capi/libonnxruntime_providers_shared.so /ort/onnxruntime/capi/libonnxruntime_providers_cuda.so /usr/local/lib/
COPY --from=build /usr/local/bin/streamserve /usr/local/bin/streamserve
COPY models/ /app/models/
# Every model asks for the GPU; allow_cpu_fallback = true in [defaults] keeps a model serving on
# CPU if the GPU or the CUDA provider cannot be used (with a warning in the log saying why).
RUN sed -i 's/^device = "cpu"/device = "cuda:0"/' /app/models/models.toml \
    && ldconfig \
    && groupadd --system --gid 10001 streamserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin streamserve \
    && install -d -o 10001 -g 10001 /var/cache/streamserve /var/lib/streamserve /var/lib/streamserve/jobs
WORKDIR /app
USER 10001:10001
ENV STREAMSERVE_HOST=0.0.0.0 \
    STREAMSERVE_PORT=8080 \
    STREAMSERVE_MODELS=/app/models \
    STREAMSERVE_LOG_FORMAT=json \
    STREAMSERVE_DRAIN_SECS=30 \
    STREAMSERVE_REGISTRY_CACHE=/var/cache/streamserve \
    STREAMSERVE_JOBS_DIR=/var/lib/streamserve/jobs
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
CMD ["streamserve", "serve"]

# ---- cpu (default): Debian slim ----------------------------------------------------------------
# The library needs only libc, libm, libstdc++ and libgcc_s, which the base image has.
FROM debian:bookworm-slim AS cpu
ARG ORT_VERSION
# /usr/local/lib/libonnxruntime.so is where the binary looks when neither --ort-dylib nor
# ORT_DYLIB_PATH is set (src/runtime/mod.rs), so no environment variable is needed.
COPY --from=ort-cpu /ort/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION} /usr/local/lib/libonnxruntime.so
COPY --from=build /usr/local/bin/streamserve /usr/local/bin/streamserve
COPY models/ /app/models/
RUN groupadd --system --gid 10001 streamserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin streamserve \
    && install -d -o 10001 -g 10001 /var/cache/streamserve /var/lib/streamserve /var/lib/streamserve/jobs
WORKDIR /app
USER 10001:10001
ENV STREAMSERVE_HOST=0.0.0.0 \
    STREAMSERVE_PORT=8080 \
    STREAMSERVE_MODELS=/app/models \
    STREAMSERVE_LOG_FORMAT=json \
    STREAMSERVE_DRAIN_SECS=30 \
    STREAMSERVE_REGISTRY_CACHE=/var/cache/streamserve \
    STREAMSERVE_JOBS_DIR=/var/lib/streamserve/jobs
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
# Exec form: streamserve itself receives SIGTERM and drains (a shell wrapper would not pass it on).
# No HEALTHCHECK (the image has no curl); fly.io and orchestrators probe /v2/health/ready.
CMD ["streamserve", "serve"]
