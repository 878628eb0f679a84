#!/usr/bin/env bash
# Install what the TVM targets need beyond `pip install 'snapc[tvm]'`: an OpenCL ICD with PoCL's
# CPU device (the OpenCL kernel check), the OpenCL loader, and the aarch64 cross linker that
# links model.so when no Android NDK is named by TVM_NDK_CC. Idempotent; run as root.
set -euo pipefail

packages=(pocl-opencl-icd ocl-icd-opencl-dev g++-aarch64-linux-gnu)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup_tvm.sh: installing ${missing[*]} needs root; rerun with sudo" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "setup_tvm.sh: ${packages[*]} installed"
