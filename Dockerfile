# syntax=docker/dockerfile:1
# Tollgate's container image: built with the Rust toolchain, run on distroless
# (glibc and libgcc only: no shell, no package manager), as non-root 65532.
#
#   docker build -t tollgate:0.1.0 .
#   docker run --rm -p 50051:50051 tollgate:0.1.0 dev --listen 0.0.0.0:50051
#
# The Helm chart (helm/tollgate) runs `serve` and `migrate` from this image.

FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, in a layer of their own: rebuilt only when the manifest,
# the lock file, build.rs or the protos change, not on every source edit.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# Then Tollgate itself. migrations/ and profiles/default.toml are compiled in.
# `touch`: COPY keeps the files' old mtimes, which could make cargo keep the
# placeholder build above.
COPY src ./src
COPY migrations ./migrations
COPY profiles ./profiles
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/tollgate /out/tollgate

FROM gcr.io/distroless/cc-debian12:nonroot
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
