# The Tern image: tern-agent, tern (operator CLI and `tern install-cni`) and
# tern-cni, as manifests/daemonset.yaml runs them.
#
#   docker build -t ghcr.io/tern-net/tern:0.1.0 .

# User space builds with stable 1.95 (the workspace's rust-version); the
# image's gcc and libc6-dev are all the C toolchain needed (ring).
FROM rust:1.95-slim-trixie AS build

# The eBPF programs build with this nightly (-Z build-std=core needs its
# rust-src), linked by bpf-linker against the same LLVM (docs/toolchain.md).
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.13.0
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src

# agent/build.rs (aya-build) runs `rustup run nightly cargo`: make the name
# "nightly" mean the pinned date instead of whatever is newest.
RUN host="$(rustc -vV | sed -n 's/^host: //p')" \
 && ln -s "$NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host" \
 && rustc +nightly -V

# No LLVM package matches the nightly's LLVM, but the nightly ships it as a
# shared library: bpf-linker links that one, and finds it at run time
# through the rpath.
RUN sysroot="$(rustc +nightly --print sysroot)" \
 && libllvm="$(ls "$sysroot"/lib/libLLVM.so.*)" \
 && llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')" \
 && mkdir -p /opt/tern-llvm/lib \
 && ln -s "$libllvm" /opt/tern-llvm/lib/libLLVM.so \
 && LLVM_PREFIX=/opt/tern-llvm RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo +nightly install bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$llvm_major" \
 && bpf-linker --version

WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tern-cni -p tern-agent \
 && mkdir /out \
 && cp target/release/tern-agent target/release/tern target/release/tern-cni /out/

# Nothing else at run time: the agent talks netlink and bpf() itself, and
# reaches the API server with the cluster's CA from the service account.
FROM debian:trixie-slim
COPY --from=build /out/ /usr/local/bin/
CMD ["tern-agent", "--help"]
