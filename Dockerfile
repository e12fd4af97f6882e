# roomcast: a multi-stage build. Dependencies are compiled in their own
# layer (rebuilt only when Cargo.toml or Cargo.lock change), the binary runs
# as a non-root user in a slim image, configured by environment only.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependency layer: a stub crate with the real manifest and lock file.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY static ./static
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home roomcast
COPY --from=build /src/target/release/roomcast /usr/local/bin/roomcast
USER roomcast
# Inside a container the node must listen on all interfaces; give it
# JWT_SECRET or JWT_PUBLIC_KEY (dev mode refuses a public address).
ENV BIND=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["roomcast", "healthcheck"]
# roomcast is PID 1 and handles SIGTERM itself: it drains (1012 to every
# client over DRAIN_TIMEOUT, default 10 s) and exits. Give it that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["roomcast"]
