# microcert center image: a multi-stage build, a small runtime, a non-root
# user, the data (card, SQLite database, anchor) on a volume.
#
#   docker build -t microcert .
#   echo 'a long passphrase' > pass && docker run -d --name center \
#     -v microcert-data:/var/lib/microcert \
#     -v "$PWD/pass:/run/secrets/microcert-passphrase:ro" \
#     -e MICROCERT_PASSPHRASE_FILE=/run/secrets/microcert-passphrase \
#     -p 8080:8080 -p 5683:5683/udp microcert
#
# docker-compose.yml runs PostgreSQL and two centers on it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p microcert-cli \
 && strip target/release/microcert \
 && mkdir -p /out/man /out/completions \
 && target/release/microcert man /out/man \
 && target/release/microcert completions bash > /out/completions/microcert

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 microcert \
 && useradd --system --uid 10001 --gid microcert --home-dir /var/lib/microcert --shell /usr/sbin/nologin microcert \
 && mkdir -p /var/lib/microcert \
 && chown microcert:microcert /var/lib/microcert \
 && chmod 0700 /var/lib/microcert
COPY --from=build /src/target/release/microcert /usr/local/bin/microcert
COPY --from=build /out/man/ /usr/local/share/man/man1/
COPY --from=build /out/completions/microcert /usr/share/bash-completion/completions/microcert
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER microcert:microcert
WORKDIR /var/lib/microcert
VOLUME ["/var/lib/microcert"]
ENV MICROCERT_DATA=/var/lib/microcert
EXPOSE 8080/tcp 5683/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD []
