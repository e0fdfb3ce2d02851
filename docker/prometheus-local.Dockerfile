# Prometheus for machines without a registry: Debian's prometheus binary (2.42, statically linked but for libc)
# on the local debootstrap base, laid out like prom/prometheus:v2.42.0 (entrypoint, user nobody, /prometheus).
# Built by scripts/build_local_prometheus.sh from a context holding only this file and the binary.
ARG BASE_IMAGE=conveyor-base:bookworm-2
FROM ${BASE_IMAGE}
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
COPY prometheus /bin/prometheus
