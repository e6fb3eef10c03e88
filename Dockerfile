# Zpanel's container image: a static-enough release build on a slim Debian base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin zpanel

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/zpanel --create-home zpanel
COPY --from=build /src/target/release/zpanel /usr/local/bin/zpanel
# mimalloc's huge pages keep ~12 MiB resident that an idle control plane never uses.
ENV MIMALLOC_ALLOW_THP=0
USER zpanel
ENTRYPOINT ["zpanel"]
CMD ["serve"]
