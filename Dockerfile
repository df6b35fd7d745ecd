# syntax=docker/dockerfile:1
# Tollgate's container image: built with the Rust toolchain, run on distroless
# (glibc and libgcc only: no shell, no package manager), as non-root 65532.
#
#   docker build -t tollgate:0.1.0 .
#   docker run --rm -p 50051:50051 tollgate:0.1.0 dev --listen 0.0.0.0:50051
#
# The Helm chart (helm/tollgate) runs `serve` and `migrate` from this image.
#
# Base images are pinned by digest (the tag says what it was; the digest is
# what is pulled), so a rebuild uses the bytes that were reviewed. To update,
# resolve each tag's current multi-platform digest and replace it here:
#   docker buildx imagetools inspect rust:1-bookworm --format '{{json .Manifest.Digest}}'
#   crane digest gcr.io/distroless/cc-debian12:nonroot
# then build and run the tests (`tests/helm.rs` lints this file with hadolint).

FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS builder
WORKDIR /build

# Dependencies first, in a layer of their own: rebuilt only when the manifest,
# the lock file, build.rs or the protos change, not on every source edit.
# Every target Cargo.toml declares must exist for it to parse: placeholders.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src/bin/tollgate-load benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/tollgate-load/main.rs \
 && echo 'fn main() {}' > benches/hotpath.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin tollgate \
 && rm -rf src

# Then Tollgate itself. migrations/ and profiles/default.toml are compiled in.
# `touch`: COPY keeps the files' old mtimes, which could make cargo keep the
# placeholder build above.
COPY src ./src
COPY migrations ./migrations
COPY profiles ./profiles
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin tollgate \
 && install -D -m 0755 target/release/tollgate /out/tollgate

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=builder /out/tollgate /usr/local/bin/tollgate
# The shipped product profiles, for `--profile /usr/share/tollgate/profiles/<name>.toml`.
COPY profiles /usr/share/tollgate/profiles
# Listen on every interface (the built-in default, 127.0.0.1, is unreachable
# from outside the container).
ENV TOLLGATE_LISTEN=0.0.0.0:50051
USER 65532:65532
# gRPC (tollgate.v1, Envoy ext_authz, grpc.health.v1, reflection); Prometheus metrics.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
